"""PEFT keys that select exactly one module, checked with PEFT's own matching rules."""

import re

import pytest

from lightning_fisher.fisher_map.patterns import exact_keys, exact_module_key, exact_target_regex, peft_patterns


def peft_pattern_selects(key, name):
    """How PEFT applies a rank_pattern / alpha_pattern key to a module name."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def test_a_module_key_is_anchored_and_escaped():
    key = exact_module_key("layers.1.q")
    assert key == r"^layers\.1\.q"
    assert peft_pattern_selects(key, "layers.1.q")
    assert not peft_pattern_selects(key, "inner.layers.1.q")  # a bare key would select it too
    assert not peft_pattern_selects(key, "layersX1.q")  # an unescaped dot would


def test_a_target_regex_full_matches_exactly_the_names():
    regex = exact_target_regex(name for name in ["layers.1.q", "dense"])  # any iterable, a generator too
    assert regex == r"(?:layers\.1\.q|dense)"
    assert [n for n in ["layers.1.q", "dense", "pooler.dense", "layersX1.q", "dense2"] if re.fullmatch(regex, n)] == [
        "layers.1.q", "dense",
    ]
    assert exact_target_regex(["a"]) == "(?:a)"


def test_a_target_regex_needs_a_name():
    with pytest.raises(ValueError, match="at least one module name"):
        exact_target_regex([])
    with pytest.raises(ValueError, match="at least one module name"):
        exact_target_regex(iter([]))


def test_peft_patterns_gives_the_three_keys_from_ranks_and_alphas():
    patterns = peft_patterns({"layers.1.q": 8, "dense": 0}, {"layers.1.q": 16.0, "dense": 0.0})  # zero: falsy but kept
    assert patterns == {
        "target_modules": r"(?:layers\.1\.q|dense)",
        "rank_pattern": {r"^layers\.1\.q": 8, "^dense": 0},
        "alpha_pattern": {r"^layers\.1\.q": 16.0, "^dense": 0.0},
    }
    assert exact_keys({}) == {}
    assert exact_keys({"a.b": 3}) == {r"^a\.b": 3}
