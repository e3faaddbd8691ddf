"""allocate_ranks_from_spectra: worked examples and properties (bounds, budget, monotonicity, floors)."""

from __future__ import annotations

import dataclasses
import re
import statistics

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_fisher.allocation.settings import AllocationSettings
from lightning_fisher.allocation.spectrum_rule import NO_DIRECTION, OUT_OF_BUDGET, allocate_ranks_from_spectra

value = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)


@st.composite
def problems(draw):
    rank_min = draw(st.integers(min_value=1, max_value=4))
    rank_max = draw(st.integers(min_value=rank_min, max_value=12))
    rank = draw(st.integers(min_value=rank_min, max_value=rank_max))
    count = draw(st.integers(min_value=1, max_value=12))
    spectra, floors, costs = {}, {}, {}
    for i in range(count):
        name = f"layers.{i}.proj"
        spectra[name] = sorted(draw(st.lists(value, min_size=0, max_size=rank_max + 2)), reverse=True)
        floors[name] = draw(value)
        costs[name] = draw(st.sampled_from([48, 80, 160, 4096 + 11008]))
    return spectra, floors, costs, AllocationSettings(rank=rank, rank_min=rank_min, rank_max=rank_max)


common = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def above(spectra, floors, name):
    return sum(1 for s in spectra[name] if s > floors[name])


def usable(spectra, floors, cfg, name):
    """Directions a module can get: those above its floor, and in budget mode, once adapted, every
    recorded direction (the budget goes on below the floor rather than stay unspent)."""
    count = above(spectra, floors, name)
    return len(spectra[name]) if cfg.mode == "budget" and count else count


def next_step(spectra, floors, costs, cfg, name, rank):
    """Parameters the module's next unit would add, or None when it has none left."""
    if rank == 0:
        return cfg.rank_min * costs[name] if above(spectra, floors, name) else None
    return costs[name] if rank < min(cfg.rank_max, usable(spectra, floors, cfg, name)) else None


@common
@given(problems(), st.sampled_from(["median", "budget"]))
def test_bounds_floors_reasons_and_determinism(problem, mode):
    spectra, floors, costs, cfg = problem
    cfg = dataclasses.replace(cfg, mode=mode)
    result = allocate_ranks_from_spectra(spectra, floors, costs, settings=cfg)
    assert result == allocate_ranks_from_spectra(spectra, floors, costs, settings=cfg)
    # every module is adapted or excluded, never both, each part in input order
    assert sorted(list(result.ranks) + list(result.excluded)) == sorted(spectra)
    assert list(result.ranks) == [n for n in spectra if n in result.ranks]
    assert list(result.excluded) == [n for n in spectra if n in result.excluded]
    for name, rank in result.ranks.items():
        # no unit past the entry for a direction below the floor, except budget mode's fill
        assert cfg.rank_min <= rank <= cfg.rank_max and rank <= max(cfg.rank_min, usable(spectra, floors, cfg, name))
        if mode == "budget" and rank > max(cfg.rank_min, above(spectra, floors, name)):
            # a module filled below its floor means every direction above every floor was taken
            assert all(result.ranks.get(n, 0) >= min(cfg.rank_max, above(spectra, floors, n)) for n in spectra)
    for name, reason in result.excluded.items():
        assert reason == (NO_DIRECTION if above(spectra, floors, name) == 0 else OUT_OF_BUDGET)
    assert result.parameters == sum(r * costs[n] for n, r in result.ranks.items())
    if mode == "median":
        assert OUT_OF_BUDGET not in result.excluded.values()


@common
@given(problems())
def test_budget_is_never_exceeded_and_spent_to_within_one_step(problem):
    spectra, floors, costs, cfg = problem
    result = allocate_ranks_from_spectra(spectra, floors, costs, settings=dataclasses.replace(cfg, mode="budget"))
    assert result.budget == cfg.rank * sum(costs.values())
    left = result.budget - result.parameters
    assert left >= 0
    cfg = dataclasses.replace(cfg, mode="budget")
    steps = [next_step(spectra, floors, costs, cfg, n, result.ranks.get(n, 0)) for n in spectra]
    steps = [s for s in steps if s is not None]
    if steps:  # otherwise every usable direction is taken
        assert left < max(steps)


@common
@given(problems(), st.integers(min_value=0, max_value=11))
def test_ranks_are_monotone_in_the_budget(problem, extra):
    spectra, floors, costs, cfg = problem
    low = dataclasses.replace(cfg, mode="budget")
    high = dataclasses.replace(low, rank=min(cfg.rank_max, cfg.rank + extra))
    small = allocate_ranks_from_spectra(spectra, floors, costs, settings=low).ranks
    large = allocate_ranks_from_spectra(spectra, floors, costs, settings=high).ranks
    assert all(large.get(name, 0) >= rank for name, rank in small.items())


@common
@given(problems())
def test_median_mode_stops_once_half_the_modules_reach_rank(problem):
    spectra, floors, costs, cfg = problem
    result = allocate_ranks_from_spectra(spectra, floors, costs, settings=cfg)
    adapted = [n for n in spectra if above(spectra, floors, n)]
    assert set(result.ranks) == set(adapted)
    reached = sum(1 for r in result.ranks.values() if r >= cfg.rank)
    left = any(next_step(spectra, floors, costs, cfg, n, r) for n, r in result.ranks.items())
    if left:  # stopped by the rule, not by running out of directions
        assert 2 * reached >= len(adapted)


def test_worked_example_greedy_by_gain_per_parameter():
    spectra = {"wide": [100.0, 60.0, 30.0, 5.0], "narrow": [40.0, 35.0, 2.0], "dead": [3.0, 1.0]}
    floors = {"wide": 4.0, "narrow": 4.0, "dead": 4.0}
    costs = {"wide": 20, "narrow": 5, "dead": 10}
    # gains per parameter: wide 4.8, 2.8, 1.3, 0.05; narrow 7.2, 6.2; dead none.
    # budget 2 * 35 = 70: narrow 7.2 (5), narrow 6.2 (5), wide 4.8, 2.8, 1.3 (20 each); 0.05 does not fit
    result = allocate_ranks_from_spectra(
        spectra, floors, costs, settings=AllocationSettings(rank=2, rank_min=1, rank_max=8, mode="budget")
    )
    assert result.ranks == {"wide": 3, "narrow": 2}
    assert result.excluded == {"dead": NO_DIRECTION}
    assert (result.parameters, result.budget, result.threshold) == (70, 70, pytest.approx(26 / 20))
    # rank_min=2: entries (7.2 + 6.2) / 2 = 6.7 (10) and (4.8 + 2.8) / 2 = 3.8 (40), then wide 1.3 (20)
    entry = allocate_ranks_from_spectra(
        spectra, floors, costs, settings=AllocationSettings(rank=2, rank_min=2, rank_max=8, mode="budget")
    )
    assert entry.ranks == {"wide": 3, "narrow": 2} and entry.threshold == pytest.approx(1.3)
    # half the budget (35 parameters): narrow 7.2, 6.2 and wide 4.8 fit; wide 2.8 (20) would not
    less = allocate_ranks_from_spectra(
        spectra, floors, costs, settings=AllocationSettings(rank=1, rank_min=1, rank_max=8, mode="budget")
    )
    assert less.ranks == {"narrow": 2, "wide": 1} and less.parameters == 30


def test_worked_example_median_mode():
    spectra = {f"m{i}": [10.0 * (i + 1)] * 6 for i in range(3)}
    floors = {name: 1.0 for name in spectra}
    costs = {name: 10 for name in spectra}
    cfg = AllocationSettings(rank=4, rank_min=1, rank_max=6)
    result = allocate_ranks_from_spectra(spectra, floors, costs, settings=cfg)
    # the strongest modules fill first; stops when two of three have rank 4
    assert result.ranks == {"m0": 1, "m1": 4, "m2": 6}
    assert statistics.median(result.ranks.values()) == 4


def test_budget_reached_only_by_strong_modules_gives_a_reason():
    spectra = {"strong": [100.0] * 8, "weak": [5.0]}
    floors, costs = {"strong": 1.0, "weak": 1.0}, {"strong": 10, "weak": 10}
    result = allocate_ranks_from_spectra(
        spectra, floors, costs, settings=AllocationSettings(rank=4, rank_min=1, rank_max=8, mode="budget")
    )
    assert result.ranks == {"strong": 8} and result.excluded == {"weak": OUT_OF_BUDGET}


@pytest.mark.parametrize(
    "spectra, floors, costs, message",
    [
        ({}, {}, {}, "spectra"),
        ({"a": [1.0, 2.0]}, {"a": 0.0}, {"a": 3}, "spectra['a']: values must be in descending order"),
        ({"a": [float("nan")]}, {"a": 0.0}, {"a": 3}, "spectra['a']"),
        ({"a": [1.0]}, {}, {"a": 3}, "floors['a']"),
        ({"a": [1.0]}, {"a": -1.0}, {"a": 3}, "floors['a']"),
        ({"a": [1.0]}, {"a": 0.0}, {"a": 0}, "rank_costs['a']"),
        ({"a": [1.0]}, {"a": 0.0}, {}, "rank_costs['a']"),
    ],
)
def test_invalid_inputs_name_the_argument_and_module(spectra, floors, costs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        allocate_ranks_from_spectra(spectra, floors, costs)


def test_equal_gains_keep_the_entry_first_despite_rounding():
    # (1.9 + 1.9 + 1.9) / 3 rounds below 1.9: a later direction must still not come before the entry
    spectra, floors, costs = {"a": [2.9] * 6}, {"a": 1.0}, {"a": 80}
    for rank in range(3, 7):
        cfg = AllocationSettings(rank=rank, rank_min=3, rank_max=6, mode="budget")
        assert allocate_ranks_from_spectra(spectra, floors, costs, settings=cfg).ranks == {"a": rank}


def test_rank_limits_cut_a_module_to_its_size_and_its_entry_unit_too():
    spectra = {"wide": [9.0, 8.0, 7.0, 6.0, 5.0, 4.0], "narrow": [20.0, 19.0, 18.0, 17.0, 16.0, 15.0]}
    floors = {"wide": 1.0, "narrow": 1.0}
    costs = {"wide": 128, "narrow": 68}
    settings = AllocationSettings(rank=4, rank_min=4, rank_max=6, mode="budget")
    free = allocate_ranks_from_spectra(spectra, floors, costs, settings=settings)
    limited = allocate_ranks_from_spectra(spectra, floors, costs, settings=settings, rank_limits={"narrow": 3})
    assert free.ranks["narrow"] == 6 and limited.ranks["narrow"] == 3  # below rank_min: the module has 3
    # what the narrow module cannot take lets the wide one in (without the limit it stayed out)
    assert "wide" not in free.ranks and limited.ranks["wide"] == 4
    assert limited.parameters == 3 * 68 + 4 * 128 <= limited.budget


# --- what mutation testing (benchmarks/mutation.py) found untested -----------------------------


def median(rank, rank_min=1, rank_max=8):
    return AllocationSettings(rank=rank, rank_min=rank_min, rank_max=rank_max, mode="median")


def test_below_the_floor_the_budget_goes_by_margin_per_parameter():
    # a's second direction is 4 below its floor over 10 parameters (-0.4 each), b's 8 below over 40
    # (-0.2 each): b's comes first, and only one fits (c, excluded, still counts in the budget)
    result = allocate_ranks_from_spectra(
        {"a": [9, 1], "b": [20, 1], "c": [0.0]}, {"a": 5, "b": 9, "c": 1}, {"a": 10, "b": 40, "c": 40},
        settings=AllocationSettings(rank=1, rank_min=1, rank_max=8, mode="budget"),
    )
    assert (result.ranks, result.parameters, result.threshold) == ({"a": 1, "b": 2}, 90, -0.2)


def test_median_mode_stops_as_soon_as_half_the_modules_reach_rank():
    # two modules: one at rank 2 is half of them already
    result = allocate_ranks_from_spectra({"a": [9, 8, 7, 6], "b": [9, 8, 7, 6]}, {"a": 1, "b": 1}, {"a": 10, "b": 10},
                                         settings=median(2))
    assert result.ranks == {"a": 2, "b": 1}


def test_median_mode_with_rank_min_at_rank_takes_nothing_more():
    spectra = {name: [9, 8, 7, 6, 5] for name in "abc"}
    result = allocate_ranks_from_spectra(spectra, dict.fromkeys(spectra, 1), dict.fromkeys(spectra, 10),
                                         settings=median(2, rank_min=2))
    assert result.ranks == {"a": 2, "b": 2, "c": 2}


def test_median_mode_goes_on_while_modules_too_small_for_rank_keep_half_out_of_reach():
    # a, b, c fit rank 1 only: one module at rank 2 of four is not half, so d takes every direction it has
    spectra = {name: [9, 8, 7, 6, 5] for name in "abcd"}
    result = allocate_ranks_from_spectra(spectra, dict.fromkeys(spectra, 1), dict.fromkeys(spectra, 10),
                                         settings=median(2, rank_min=2), rank_limits={"a": 1, "b": 1, "c": 1})
    assert result.ranks == {"a": 1, "b": 1, "c": 1, "d": 5}


def test_nothing_taken_has_threshold_zero_and_a_cost_of_one_is_valid():
    assert allocate_ranks_from_spectra({"a": [0.5]}, {"a": 1}, {"a": 1}, settings=median(2)).threshold == 0.0
    result = allocate_ranks_from_spectra({"a": [3.0, 2.0]}, {"a": 1}, {"a": 1},
                                         settings=AllocationSettings(rank=2, rank_min=1, rank_max=8, mode="budget"))
    assert (result.ranks, result.threshold) == ({"a": 2}, 1.0)


def test_budget_mode_spends_on_a_direction_exactly_at_the_floor():
    # margin 0.0 (sigma^2 == floor): no signal, but a below-floor direction like the negative ones
    from lightning_fisher.allocation.settings import AllocationSettings
    from lightning_fisher.allocation.spectrum_rule import allocate_ranks_from_spectra

    result = allocate_ranks_from_spectra({"m": (5.0, 1.0, 0.5)}, {"m": 1.0}, {"m": 10},
                                         settings=AllocationSettings(rank=3, rank_min=1, rank_max=3, mode="budget"))
    assert result.ranks == {"m": 3}
