"""natural_key: numbers compare by value, the order is total and the same everywhere."""

from lightning_fisher.data.natural_sort import natural_key


def test_numbers_compare_by_value():
    names = ["layers.10.q", "layers.2.q", "layers.1.q", "head", "sample_10.pt", "sample_9.pt"]
    assert sorted(names, key=natural_key) == [
        "head", "layers.1.q", "layers.2.q", "layers.10.q", "sample_9.pt", "sample_10.pt"
    ]


def test_equal_numbers_written_differently_are_ordered_by_text():
    assert sorted(["7", "007", "07"], key=natural_key) == ["007", "07", "7"]
    assert sorted(["x7", "x007"], key=natural_key) == sorted(["x007", "x7"], key=natural_key)


def test_text_and_numbers_never_compare_with_each_other():
    # a leading digit run and a leading letter sit at different positions of the key
    assert sorted(["a1", "1a", "", "10", "b"], key=natural_key) == ["", "1a", "10", "a1", "b"]
