"""Rank allocation: from per-module Fisher scores to which modules get an adapter, at what rank.

Pure functions over dictionaries; no model, no torch.

The rule, in three steps:

1. **Auto-targeting.** A module whose score is below ``exclude_threshold`` times the median of
   the positive scores gets no adapter at all; so does a module with score 0 (the loss does
   not depend on it on this data). With the default ``0.05`` a module is dropped when the data
   moves it less than a twentieth as much as a typical module: under the square-root rule
   below it would sit far below ``rank_min`` anyway, so an adapter there mostly spends
   parameters.
2. **Shape.** Kept modules get a continuous rank proportional to ``score ** score_power``
   (default ``0.5``: a module with 4x the median score gets 2x the median rank), clamped to
   ``[rank_min, rank_max]``.
3. **Scale**, by ``mode``:

   - ``"median"`` (Side-Step's meaning of ``rank``): the median kept module gets ``rank``;
     the total number of adapter parameters follows from the scores.
   - ``"budget"``: the scale is chosen so that the total adapter parameters,
     ``sum(rank_m * cost_m)`` with ``cost_m = d_in + d_out`` of module ``m``, equal those of flat
     LoRA at ``rank`` on **all** candidates (excluded ones included, so the kept modules absorb
     their share). This is the fair comparison against flat LoRA. The integer ranks never
     exceed the budget and fall short of it by less than one rank step of one module (unless
     modules with exactly equal scores must move together, or ``rank_max`` makes the budget
     unreachable, which warns).

Ranks are integers in ``[rank_min, rank_max]`` and non-decreasing in score: modules with equal
scores get equal ranks. One exception to both: given ``rank_limits`` (``min(d_in, d_out)``,
as the map always gives them), no module gets a rank above its own limit, however high it
scores: a rank-16 adapter on a 64 x 4 layer has more parameters than the layer and can
express nothing a rank-4 one cannot. The result is deterministic (no randomness, no dependence on dict
order beyond the order of the returned dict, which follows the input).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping
from typing import Literal, Optional

from lightning_fisher.allocation.settings import (
    ALLOCATION_MODES,
    ALLOCATION_OPTIONS,
    AllocationSettings,
    allocation_from_options,
    other_spellings,
    settings_or_options,
)

__all__ = [
    "ALLOCATION_MODES",
    "AllocationSettings",
    "allocate_ranks",
    "flat_lora_parameters",
    "lora_parameters",
]

_D = AllocationSettings  # the defaults below are the settings' own


@other_spellings(rank_mode="mode")
@settings_or_options("settings", AllocationSettings, ALLOCATION_OPTIONS)
def allocate_ranks(
    scores: Mapping[str, float],
    *,
    rank: int = _D.rank,
    rank_min: int = _D.rank_min,
    rank_max: int = _D.rank_max,
    mode: Literal["median", "budget"] = _D.mode,
    rank_costs: Optional[Mapping[str, int]] = None,
    score_power: float = _D.score_power,
    exclude_threshold: float = _D.exclude_threshold,
    settings: Optional[AllocationSettings] = None,
    rank_limits: Optional[Mapping[str, int]] = None,
) -> dict[str, int]:
    """Assign an integer LoRA rank to each module worth adapting.

    Args:
        scores: per-module scores (non-negative, finite), keyed by full module name.
        rank: the median rank (``mode="median"``) or the flat rank whose parameter count is
            matched (``mode="budget"``). Must lie in ``[rank_min, rank_max]``.
        rank_min: smallest rank any adapted module gets.
        rank_max: largest rank any adapted module gets.
        mode: ``"median"`` or ``"budget"`` (see the module docstring).
        rank_costs: adapter parameters per unit of rank for each module (``d_in + d_out``
            for a linear layer). Required for ``mode="budget"``; unused otherwise.
        score_power: exponent of the score-to-rank rule; ``1`` is proportional, ``0.5``
            square root.
        exclude_threshold: modules scoring below this fraction of the median positive score
            get no adapter; ``0`` keeps every module with a positive score.
        settings: all of the above as one :class:`AllocationSettings` (then pass none of the
            individual options).
        rank_limits: the largest rank each module can use, ``min(d_in, d_out)`` (a larger
            adapter is bigger than the layer it adapts); a module's ``rank_min`` and
            ``rank_max`` are cut to it, and in budget mode what it cannot take goes to the
            others. Default: no limit.

    Returns:
        ``{module name: rank}`` for the modules that get an adapter, in input order. Modules
        absent from it are excluded.

    Raises:
        ValueError: naming the offending argument (and module, for a bad score).
    """
    settings = allocation_from_options(
        settings, "allocate_ranks", rank, rank_min, rank_max, mode, score_power, exclude_threshold
    )
    return _allocate(scores, settings, rank_costs, rank_limits or {})


def _allocate(
    scores: Mapping[str, float], settings: AllocationSettings, rank_costs: Optional[Mapping[str, int]],
    rank_limits: Mapping[str, int],
) -> dict[str, int]:
    _check_inputs(scores, settings.mode, rank_costs)
    _check_limits(scores, rank_limits)
    kept = _auto_target(scores, settings.exclude_threshold)
    weights = {name: scores[name] ** settings.score_power for name in kept}
    hi = {name: min(settings.rank_max, rank_limits.get(name, settings.rank_max)) for name in kept}
    lo = {name: min(settings.rank_min, hi[name]) for name in kept}
    if settings.mode == "median":
        continuous = _median_scaled(weights, settings.rank, lo, hi)
        ranks = {name: _round_half_up(x) for name, x in continuous.items()}
    else:
        assert rank_costs is not None
        budget = flat_lora_parameters(settings.rank, {name: rank_costs[name] for name in scores})
        ranks = _budget_scaled(weights, {n: rank_costs[n] for n in kept}, budget, lo, hi)
    return {name: ranks[name] for name in scores if name in ranks}


def lora_parameters(ranks: Mapping[str, int], rank_costs: Mapping[str, int]) -> int:
    """Trainable adapter parameters of an allocation: ``sum(rank_m * cost_m)``."""
    return sum(int(r) * int(rank_costs[name]) for name, r in ranks.items())


def flat_lora_parameters(rank: int, rank_costs: Mapping[str, int]) -> int:
    """Trainable parameters of flat LoRA at ``rank`` on every module in ``rank_costs``."""
    return int(rank) * sum(int(c) for c in rank_costs.values())


def _check_limits(scores: Mapping[str, float], rank_limits: Mapping[str, int]) -> None:
    for name in scores:
        limit = rank_limits.get(name, 1)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"rank_limits[{name!r}]: must be a positive integer (min(d_in, d_out)), got {limit!r}")


def _check_inputs(scores: Mapping[str, float], mode: str, rank_costs: Optional[Mapping[str, int]]) -> None:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores: need a non-empty mapping of module name to score")
    for name, value in scores.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"scores[{name!r}]: must be a finite non-negative number, got {value!r}")
    if not any(value > 0 for value in scores.values()):
        raise ValueError(
            "scores: every score is zero, so the loss does not depend on any candidate module; "
            "check that the analysed loss reaches the candidates"
        )
    if mode == "budget":
        if rank_costs is None:
            raise ValueError("rank_costs: required for mode='budget' (d_in + d_out of each module)")
        missing = [name for name in scores if name not in rank_costs]
        if missing:
            raise ValueError(f"rank_costs: no cost for {len(missing)} scored module(s), e.g. {missing[:3]}")
        for name in scores:
            cost = rank_costs[name]
            if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
                raise ValueError(f"rank_costs[{name!r}]: must be a positive integer, got {cost!r}")


def _auto_target(scores: Mapping[str, float], exclude_threshold: float) -> list[str]:
    reference = statistics.median(value for value in scores.values() if value > 0)
    cutoff = exclude_threshold * reference
    return [name for name, value in scores.items() if value > 0 and value >= cutoff]


def _median_scaled(
    weights: Mapping[str, float], rank: int, lo: Mapping[str, int], hi: Mapping[str, int]
) -> dict[str, float]:
    median_weight = statistics.median(weights.values())
    return {name: min(hi[name], max(lo[name], rank * w / median_weight)) for name, w in weights.items()}


def _round_half_up(x: float) -> int:
    # round() rounds half to even, which is not monotone in x; floor(x + 0.5) is.
    return int(math.floor(x + 0.5))


def _budget_scaled(
    weights: Mapping[str, float], costs: Mapping[str, int], budget: int, lo: Mapping[str, int],
    hi: Mapping[str, int],
) -> dict[str, int]:
    ceiling = sum(hi[n] * c for n, c in costs.items())
    if ceiling < budget:
        limited = sum(1 for n in hi if hi[n] < max(hi.values()))
        why = f" ({limited} module(s) at their size, min(d_in, d_out))" if limited else ""
        warnings.warn(
            f"rank budget of {budget} adapter parameters is out of reach: every kept module at "
            f"rank_max={max(hi.values())}{why} gives only {ceiling}; raise rank_max or lower exclude_threshold",
            UserWarning,
            stacklevel=3,
        )
        return dict(hi)

    scale = _scale_for_budget(weights, costs, budget, lo, hi)
    continuous = {n: min(hi[n], max(lo[n], scale * w)) for n, w in weights.items()}
    return _round_within_budget(continuous, costs, budget, hi)


def _scale_for_budget(
    weights: Mapping[str, float], costs: Mapping[str, int], budget: int, lo: Mapping[str, int],
    hi: Mapping[str, int],
) -> float:
    """The scale ``c`` at which ``sum(cost_m * clamp(c * w_m, lo_m, hi_m))`` equals the budget.

    The spend is piecewise linear in ``c`` with breakpoints where a module leaves ``lo_m``
    (``c = lo_m / w``) or reaches ``hi_m`` (``c = hi_m / w``): sweep the sorted breakpoints keeping
    the spend as ``fixed + c * slope`` and solve on the segment that crosses the budget.
    O(n log n), exact up to float rounding.
    """
    events = []
    for name, w in weights.items():
        events.append((lo[name] / w, 0, name))  # leaves the floor: starts to grow with c
        events.append((hi[name] / w, 1, name))  # reaches the ceiling: stops growing
    events.sort()
    fixed = float(sum(lo[n] * c for n, c in costs.items()))
    slope = 0.0
    previous = 0.0
    for c, kind, name in events:
        if fixed + slope * c >= budget:
            break
        w, cost = weights[name], costs[name]
        if kind == 0:
            fixed -= lo[name] * cost
            slope += w * cost
        else:
            fixed += hi[name] * cost
            slope -= w * cost
        previous = c
    if slope <= 0:  # flat where the budget is crossed: any scale there gives the same spend
        return previous
    return max(previous, (budget - fixed) / slope)


def _round_within_budget(
    continuous: Mapping[str, float], costs: Mapping[str, int], budget: int, hi: Mapping[str, int]
) -> dict[str, int]:
    """Largest-remainder rounding that stays within the budget and keeps ranks monotone.

    Modules with the same continuous rank move together, so equal scores keep equal ranks.
    Groups are raised by one step in order of their fractional part; once a group at floor
    ``f`` does not fit, no group at floor ``f`` with a smaller value is raised either, which
    is what keeps the ranks non-decreasing in score.
    """
    ranks = {name: int(math.floor(x)) for name, x in continuous.items()}
    remaining = budget - sum(ranks[n] * costs[n] for n in ranks)

    groups: dict[float, list[str]] = {}
    for name, x in continuous.items():
        groups.setdefault(x, []).append(name)
    order = sorted(groups, key=lambda x: (-(x - math.floor(x)), -x))

    blocked_floors: set[int] = set()
    for x in order:
        floor = int(math.floor(x))
        members = [name for name in groups[x] if floor < hi[name]]  # one at its ceiling stays there
        if not members or floor in blocked_floors:
            continue
        cost = sum(costs[n] for n in members)
        if cost <= remaining:
            for name in members:
                ranks[name] += 1
            remaining -= cost
        else:
            blocked_floors.add(floor)
    return ranks
