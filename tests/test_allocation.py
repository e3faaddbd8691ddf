import math
import statistics
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_fisher import allocate_ranks
from lightning_fisher.allocation.trace_rule import _round_within_budget, flat_lora_parameters, lora_parameters

positive = st.floats(min_value=1e-4, max_value=1e4, allow_nan=False, allow_infinity=False)


@st.composite
def score_sets(draw, min_size=2, max_size=40, distinct=True):
    values = draw(st.lists(positive, min_size=min_size, max_size=max_size, unique=distinct))
    zeros = draw(st.integers(min_value=0, max_value=3))
    scores = {f"layers.{i}.proj": v for i, v in enumerate(values)}
    scores.update({f"unused.{i}": 0.0 for i in range(zeros)})
    costs = {name: draw(st.sampled_from([768, 1920, 2 * 4096, 4096 + 11008])) for name in scores}
    return scores, costs


@st.composite
def budgets(draw):
    rank_min = draw(st.integers(min_value=1, max_value=32))
    rank_max = draw(st.integers(min_value=rank_min, max_value=256))
    rank = draw(st.integers(min_value=rank_min, max_value=rank_max))
    return rank, rank_min, rank_max


common = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_monotone(scores, ranks):
    kept = sorted(ranks, key=lambda n: scores[n])
    for low, high in zip(kept, kept[1:]):
        assert ranks[low] <= ranks[high], (low, high)
        if scores[low] == scores[high]:
            assert ranks[low] == ranks[high]
    # exclusion is monotone too: every module scoring at least a kept one is kept
    if ranks:
        lowest_kept = min(scores[n] for n in ranks)
        assert all(name in ranks for name, s in scores.items() if s >= lowest_kept)


@common
@given(score_sets(distinct=False), budgets(), st.sampled_from(["median", "budget"]), st.sampled_from([0.5, 1.0, 0.25]))
def test_bounds_monotonicity_and_determinism(data, budget, mode, power):
    scores, costs = data
    rank, rank_min, rank_max = budget
    kwargs = dict(rank=rank, rank_min=rank_min, rank_max=rank_max, mode=mode, rank_costs=costs, score_power=power)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unreachable budgets warn; checked separately
        ranks = allocate_ranks(scores, **kwargs)
        again = allocate_ranks(dict(reversed(list(scores.items()))), **kwargs)
    assert ranks == again  # deterministic and independent of input order
    assert list(ranks) == [name for name in scores if name in ranks]
    assert all(isinstance(r, int) and rank_min <= r <= rank_max for r in ranks.values())
    assert all(scores[name] > 0 for name in ranks)  # zero-score modules never get an adapter
    assert_monotone(scores, ranks)


@common
@given(score_sets(), budgets())
def test_median_mode_centres_on_rank(data, budget):
    scores, _ = data
    positive_scores = {name: s for name, s in scores.items() if s > 0}
    if len(positive_scores) % 2 == 0:  # odd count: the median module is a real module
        positive_scores.pop(next(iter(positive_scores)))
    rank, rank_min, rank_max = budget
    ranks = allocate_ranks(positive_scores, rank=rank, rank_min=rank_min, rank_max=rank_max, exclude_threshold=0.0)
    assert statistics.median(ranks.values()) == rank


@common
@given(score_sets(), budgets(), st.sampled_from([0.0, 0.05, 0.3]))
def test_budget_mode_matches_flat_lora_parameters(data, budget, threshold):
    scores, costs = data
    rank, rank_min, rank_max = budget
    flat = flat_lora_parameters(rank, costs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranks = allocate_ranks(
            scores, rank=rank, rank_min=rank_min, rank_max=rank_max, mode="budget", rank_costs=costs,
            exclude_threshold=threshold,
        )
    spent = lora_parameters(ranks, costs)
    if any("out of reach" in str(w.message) for w in caught):
        assert all(r == rank_max for r in ranks.values())
        assert spent < flat
        return
    # never above the flat budget, short of it by less than one rank step of one module
    assert 0 <= flat - spent < max(costs[name] for name in ranks)


def test_budget_mode_gives_excluded_modules_share_to_the_rest():
    scores = {"a": 100.0, "b": 1.0, "c": 1.0, "dead": 0.0}
    costs = {"a": 1000, "b": 1000, "c": 1000, "dead": 1000}
    ranks = allocate_ranks(scores, rank=8, rank_min=2, rank_max=32, mode="budget", rank_costs=costs)
    assert "dead" not in ranks
    assert lora_parameters(ranks, costs) == 8 * 4000
    assert ranks["b"] == ranks["c"] < ranks["a"]


def test_auto_targeting_rule_and_threshold():
    scores = {"big": 10.0, "mid": 1.0, "mid2": 1.0, "small": 0.04, "tiny": 0.001}
    # median of positive scores is 1.0: 0.05 drops 0.04 and 0.001
    assert set(allocate_ranks(scores, rank=8, rank_min=1, rank_max=64)) == {"big", "mid", "mid2"}
    assert set(allocate_ranks(scores, rank=8, rank_min=1, rank_max=64, exclude_threshold=0.01)) == {
        "big", "mid", "mid2", "small"
    }
    assert set(allocate_ranks(scores, rank=8, rank_min=1, rank_max=64, exclude_threshold=0.0)) == set(scores)


def test_square_root_rule_values():
    scores = {"a": 1.0, "b": 4.0, "c": 16.0}
    assert allocate_ranks(scores, rank=8, rank_min=1, rank_max=64) == {"a": 4, "b": 8, "c": 16}
    assert allocate_ranks(scores, rank=8, rank_min=6, rank_max=12) == {"a": 6, "b": 8, "c": 12}
    assert allocate_ranks(scores, rank=8, rank_min=1, rank_max=64, score_power=1.0) == {"a": 2, "b": 8, "c": 32}


@pytest.mark.parametrize(
    "kwargs, scores, message",
    [
        (dict(rank_min=32, rank_max=16, rank=16), {"a": 1.0}, "rank_min"),
        (dict(rank=0), {"a": 1.0}, "rank"),
        (dict(rank_min=-1), {"a": 1.0}, "rank_min"),
        (dict(rank_max=8.5), {"a": 1.0}, "rank_max"),
        (dict(rank=200), {"a": 1.0}, "rank (200)"),
        (dict(), {}, "scores"),
        (dict(), {"a": float("nan")}, "scores['a']"),
        (dict(), {"a": -1.0}, "scores['a']"),
        (dict(), {"a": math.inf}, "scores['a']"),
        (dict(), {"a": 0.0, "b": 0.0}, "every score is zero"),
        (dict(mode="flat"), {"a": 1.0}, "mode"),
        (dict(mode="budget"), {"a": 1.0}, "rank_costs"),
        (dict(mode="budget", rank_costs={"b": 3}), {"a": 1.0}, "rank_costs"),
        (dict(score_power=0), {"a": 1.0}, "score_power"),
        (dict(exclude_threshold=1.5), {"a": 1.0}, "exclude_threshold"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, scores, message):
    with pytest.raises(ValueError) as excinfo:
        allocate_ranks(scores, **kwargs)
    assert message in str(excinfo.value)


def test_unreachable_budget_warns_and_caps():
    scores = {"a": 1.0, "b": 1e-6}
    with pytest.warns(UserWarning, match="out of reach"):
        ranks = allocate_ranks(scores, rank=64, rank_min=16, rank_max=64, mode="budget", rank_costs={"a": 10, "b": 10})
    assert ranks == {"a": 64}


# ---------------------------------------------------------------------------- rank limits
def test_no_module_gets_a_rank_above_its_limit_in_median_mode():
    scores = {"wide": 1.0, "narrow": 16.0, "other": 1.0}
    ranks = allocate_ranks(scores, rank=8, rank_min=2, rank_max=64, rank_limits={"wide": 64, "narrow": 4, "other": 64})
    # without the limit "narrow" would get 8 * sqrt(16) = 32
    assert ranks == {"wide": 8, "narrow": 4, "other": 8}
    assert allocate_ranks(scores, rank=8, rank_min=2, rank_max=64)["narrow"] == 32


def test_a_limit_below_rank_min_cuts_rank_min_too():
    ranks = allocate_ranks({"a": 1.0, "b": 1.0, "tiny": 1.0}, rank=8, rank_min=8, rank_max=16,
                           rank_limits={"a": 32, "b": 32, "tiny": 2})
    assert ranks == {"a": 8, "b": 8, "tiny": 2}


def test_in_budget_mode_what_a_limited_module_cannot_take_goes_to_the_others():
    scores = {"narrow": 9.0, "a": 1.0, "b": 1.0}
    costs = {"narrow": 68, "a": 128, "b": 128}  # 64 x 4 and two 64 x 64 layers
    limits = {"narrow": 4, "a": 64, "b": 64}
    ranks = allocate_ranks(scores, rank=8, rank_min=1, rank_max=32, mode="budget", rank_costs=costs, rank_limits=limits)
    budget = 8 * sum(costs.values())
    spent = lora_parameters(ranks, costs)
    assert ranks["narrow"] == 4 and ranks["a"] == ranks["b"]
    assert budget - min(costs.values()) < spent <= budget  # the budget is still spent, to within one step
    unlimited = allocate_ranks(scores, rank=8, rank_min=1, rank_max=32, mode="budget", rank_costs=costs)
    assert unlimited["narrow"] > 4 and unlimited["a"] < ranks["a"]


def test_a_budget_out_of_reach_because_of_limits_says_so():
    with pytest.warns(UserWarning, match=r"out of reach: .*\(1 module\(s\) at their size, min\(d_in, d_out\)\)"):
        ranks = allocate_ranks({"a": 1.0, "narrow": 1.0}, rank=8, rank_min=1, rank_max=8, mode="budget",
                               rank_costs={"a": 16, "narrow": 68}, rank_limits={"a": 8, "narrow": 4})
    assert ranks == {"a": 8, "narrow": 4}


@pytest.mark.parametrize("limit", [0, -1, 2.5, True, "4"])
def test_a_bad_rank_limit_is_refused_by_name(limit):
    with pytest.raises(ValueError, match=r"rank_limits\['a'\]: must be a positive integer"):
        allocate_ranks({"a": 1.0, "b": 2.0}, rank=4, rank_min=1, rank_max=8, rank_limits={"a": limit})


# --- what mutation testing (benchmarks/mutation.py) found untested -----------------------------



def test_only_a_mapping_of_finite_non_negative_numbers_is_a_score_set():
    with pytest.raises(ValueError, match="scores: need a non-empty mapping"):
        allocate_ranks([("a", 1.0), ("b", 2.0)])
    with pytest.raises(ValueError, match=r"scores\['a'\]"):
        allocate_ranks({"a": True, "b": 2.0})


@pytest.mark.parametrize("cost", [8.0, True, 0])
def test_a_rank_cost_must_be_a_positive_integer(cost):
    with pytest.raises(ValueError, match=r"rank_costs\['a'\]"):
        allocate_ranks({"a": 1.0, "b": 2.0}, mode="budget", rank_costs={"a": cost, "b": 8})


def test_a_rank_cost_of_one_is_valid():
    assert allocate_ranks({"a": 1.0, "b": 1.0}, mode="budget", rank=4, rank_min=1, rank_max=8,
                          rank_costs={"a": 1, "b": 1}) == {"a": 4, "b": 4}


def test_the_exclusion_reference_is_the_median_of_the_positive_scores_only():
    # positive median 1 -> cutoff 0.5 drops f; with the zeros in, the median would be 0.2 and keep it
    scores = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 1.0, "e": 10.0, "f": 0.4}
    assert set(allocate_ranks(scores, exclude_threshold=0.5, rank=4, rank_min=1, rank_max=16)) == {"d", "e"}


def test_a_score_exactly_at_the_cutoff_is_kept():
    ranks = allocate_ranks({"a": 1.0, "b": 2.0, "c": 4.0}, exclude_threshold=0.5, rank=4, rank_min=1, rank_max=16)
    assert set(ranks) == {"a", "b", "c"}  # cutoff 0.5 x median 2 = 1.0 = a's score


def test_the_budget_is_met_exactly_with_tiny_scores_and_costs():
    # weight x cost far below 1: the scale must still be solved on its segment, not left at a breakpoint
    scores = {"a": 0.01, "b": 0.01}
    assert allocate_ranks(scores, mode="budget", rank=5, rank_min=1, rank_max=100, score_power=1.0,
                          rank_costs={"a": 1, "b": 1}) == {"a": 5, "b": 5}


def test_an_unreachable_budget_warning_names_module_sizes_only_when_they_bind():
    with pytest.warns(UserWarning) as caught:
        allocate_ranks({"a": 1.0, "b": 2.0}, mode="budget", rank=4, rank_min=1, rank_max=4, exclude_threshold=0.9,
                       rank_costs={"a": 10, "b": 10})
    assert "every kept module at rank_max=4 gives only 40;" in str(caught[0].message)
    with pytest.warns(UserWarning) as caught:
        allocate_ranks({"a": 1.0, "b": 2.0, "c": 3.0}, mode="budget", rank=4, rank_min=1, rank_max=4,
                       rank_costs={"a": 10, "b": 10, "c": 10}, rank_limits={"a": 2, "b": 1, "c": 4})
    assert "rank_max=4 (2 module(s) at their size, min(d_in, d_out)) gives only 70;" in str(caught[0].message)


def test_rounding_raises_the_larger_of_two_equal_remainders_first():
    # 2.5 and 3.5, room for one step: the higher-scoring module gets it (ranks stay in score order)
    assert _round_within_budget({"a": 2.5, "b": 3.5}, {"a": 1, "b": 1}, 6, {"a": 8, "b": 8}) == {"a": 2, "b": 4}


def test_rounding_goes_on_past_a_group_that_cannot_move():
    # a does not fit (cost 10), b shares a's floor so waits, c on another floor still takes the last unit
    continuous = {"a": 2.9, "b": 2.5, "c": 3.4}
    costs = {"a": 10, "b": 1, "c": 1}
    assert _round_within_budget(continuous, costs, 26, {n: 8 for n in continuous}) == {"a": 2, "b": 2, "c": 4}


def test_rounding_never_lifts_a_module_past_its_ceiling():
    # a sits at its ceiling 4 (no fraction left); the spare unit after b's step must not go to a
    assert _round_within_budget({"a": 4.0, "b": 2.5}, {"a": 1, "b": 1}, 8, {"a": 4, "b": 8}) == {"a": 4, "b": 3}


def test_allocate_ranks_names_itself_when_settings_is_not_a_settings_object():
    with pytest.raises(TypeError, match=r"^allocate_ranks: expected an AllocationSettings, got dict$"):
        allocate_ranks({"a": 1.0}, rank_costs={"a": 10}, settings={"rank": 8})
