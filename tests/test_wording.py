"""Counts in messages agree with their nouns."""

from lightning_fisher.wording import a_or_an, plural


def test_plural_agrees_with_the_count():
    assert [plural(n, "batch") for n in (0, 1, 2, 1024)] == ["0 batches", "1 batch", "2 batches", "1,024 batches"]
    assert plural(1, "step") == "1 step" and plural(3, "step") == "3 steps"
    assert plural(2, "candidate module") == "2 candidate modules" and plural(2, "index", "indices") == "2 indices"


def test_a_or_an():
    assert [a_or_an(w) for w in ("Tensor", "int", "OrderedDict", "str")] == ["a Tensor", "an int", "an OrderedDict",
                                                                             "a str"]
