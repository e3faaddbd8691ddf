"""Rank allocation from gradient spectra: each rank unit goes where it captures the most signal per parameter.

Pure functions over dictionaries and floats; no model, no torch. The inputs come from
:mod:`lightning_fisher.analysis.spectrum`: for each module ``m`` the squared singular values
``sigma_1^2 >= sigma_2^2 >= ...`` of its mean weight gradient ``G`` and its noise floor ``f_m``.

A rank-``r`` adapter can follow the top ``r`` singular directions of ``G``; direction ``j``
is worth ``gain_j = max(0, sigma_j^2 - f_m)`` (nothing once it is no longer above the noise)
and costs ``cost_m = d_in + d_out`` parameters. The rule:

1. **Auto-targeting.** A module none of whose directions clears its floor
   (``sigma_1^2 <= f_m``) gets no adapter: reason :data:`NO_DIRECTION`.
2. **Units.** An adapter starts at ``rank_min``, so a module's first unit is its first
   ``rank_min`` directions together (gain ``sum_{j <= rank_min} gain_j``, cost
   ``rank_min * cost_m``); each further unit is one direction ``j`` with ``gain_j > 0`` up to
   ``rank_max``. Units are ordered by gain per parameter, highest first, ties in input order
   (then by direction). Because the ``sigma_j^2`` are non-increasing, a module's units come
   in order of its directions, so every prefix of that order is a valid allocation.
3. **How far down the order**, by ``settings.mode`` (``rank``, ``rank_min``, ``rank_max`` as in
   :class:`~lightning_fisher.allocation.settings.AllocationSettings`; ``score_power`` and
   ``exclude_threshold`` are not used, the noise floor takes their place):

   - ``"budget"``: units are taken in order while they fit in the parameters of flat LoRA at
     ``rank`` on **all** candidates (``rank * sum(cost_m)``); the first unit that does not
     fit ends the allocation, so the budget is never exceeded and is spent to within that
     unit's cost. Once every direction above a floor is taken, the order goes on into the
     adapted modules' directions below their floors (``sigma_j^2 - f_m <= 0``, least negative
     per parameter first), so a map compared with flat LoRA has its parameters; modules with
     no direction above their floor still get nothing. The budget stays unspent only when
     every adapted module is at ``rank_max`` or out of recorded directions. Taking a prefix
     makes every module's rank non-decreasing in the budget. A module with directions above
     its floor that the budget did not reach gets reason :data:`OUT_OF_BUDGET`.
   - ``"median"``: every module with a direction above its floor enters at ``rank_min``;
     further units are taken in order until at least half of the adapted modules have
     rank ``rank`` or more (the median adapted module gets ``rank``), or no unit is left.
     The gain per parameter of the last unit taken is the threshold that defines the ranks.

The result is deterministic: no randomness, ties broken by input order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from lightning_fisher.allocation.trace_rule import flat_lora_parameters
from lightning_fisher.allocation.settings import AllocationSettings

__all__ = ["NO_DIRECTION", "OUT_OF_BUDGET", "SpectrumAllocation", "allocate_ranks_from_spectra"]

NO_DIRECTION = "no direction above the noise floor"
OUT_OF_BUDGET = "the rank budget was spent before its first rank_min directions"


@dataclass(frozen=True)
class SpectrumAllocation:
    """Ranks chosen from spectra, and why the other modules got none.

    Attributes:
        ranks: ``{module: rank}`` for the adapted modules, in input order.
        excluded: ``{module: reason}`` for the others, in input order.
        parameters: adapter parameters of ``ranks`` (``sum(rank_m * cost_m)``).
        budget: the parameter budget (``mode="budget"``), else ``None``.
        threshold: gain per parameter of the last unit taken (``0.0`` when none was).
    """

    ranks: dict[str, int]
    excluded: dict[str, str]
    parameters: int
    budget: Optional[int]
    threshold: float


@dataclass(frozen=True, eq=False)
class _Unit:
    per_param: float
    module: int
    first: bool  # the module's entry: its first rank_min directions
    size: int  # ranks it adds
    cost: int  # parameters it adds


def allocate_ranks_from_spectra(
    spectra: Mapping[str, Sequence[float]],
    floors: Mapping[str, float],
    rank_costs: Mapping[str, int],
    *,
    settings: AllocationSettings = AllocationSettings(),
    rank_limits: Optional[Mapping[str, int]] = None,
) -> SpectrumAllocation:
    """Assign integer LoRA ranks greedily by gain per parameter (see the module docstring).

    Args:
        spectra: per module, its top squared singular values of the mean gradient, descending.
        floors: per module, its noise floor (same units as ``spectra``).
        rank_costs: per module, adapter parameters per unit of rank (``d_in + d_out``).
        settings: ``rank``, ``rank_min``, ``rank_max`` and ``mode``.
        rank_limits: per module, the largest rank that fits it, ``min(d_in, d_out)``; its
            ``rank_min`` and ``rank_max`` are cut to it (default: no limit beyond its spectrum).

    Returns:
        A :class:`SpectrumAllocation`; every module of ``spectra`` is in ``ranks`` or ``excluded``.

    Raises:
        ValueError: naming the offending argument and module.
    """
    _check_inputs(spectra, floors, rank_costs, settings)
    names = list(spectra)
    units, excluded = _units(names, spectra, floors, rank_costs, settings, rank_limits or {})
    ranks = [0] * len(names)
    budget = flat_lora_parameters(settings.rank, {name: rank_costs[name] for name in names}) if settings.mode == "budget" else None
    if budget is not None:
        taken = _budget_prefix(units, budget)
    else:
        taken = _median_prefix(units, len(names), settings.rank)
    for unit in taken:
        ranks[unit.module] += unit.size
    for i, name in enumerate(names):
        if ranks[i] == 0 and name not in excluded:
            excluded[name] = OUT_OF_BUDGET
    adapted = {name: ranks[i] for i, name in enumerate(names) if ranks[i] > 0}
    return SpectrumAllocation(
        ranks=adapted,
        excluded={name: excluded[name] for name in names if name in excluded},
        parameters=sum(r * rank_costs[name] for name, r in adapted.items()),
        budget=budget,
        threshold=taken[-1].per_param if taken else 0.0,
    )


def _units(
    names: list[str], spectra: Mapping[str, Sequence[float]], floors: Mapping[str, float],
    rank_costs: Mapping[str, int], settings: AllocationSettings, rank_limits: Mapping[str, int],
) -> tuple[list[_Unit], dict[str, str]]:
    units, excluded = [], {}
    for i, name in enumerate(names):
        hi = min(settings.rank_max, rank_limits.get(name, settings.rank_max))
        lo = min(settings.rank_min, hi)
        margins = [s - floors[name] for s in list(spectra[name])[:hi]]
        gains = [max(0.0, m) for m in margins]
        if not gains or gains[0] <= 0.0:
            excluded[name] = NO_DIRECTION
            continue
        cost = rank_costs[name]
        entry = sum(gains[:lo]) / (lo * cost)
        units.append(_Unit(entry, i, True, lo, lo * cost))
        # min(): the mean of equal gains can round below one of them; the entry must sort first.
        units.extend(_Unit(min(gain / cost, entry), i, False, 1, cost) for gain in gains[lo:] if gain > 0.0)
        if settings.mode == "budget":
            # Below the floor, an adapted module's next directions still come in the same order
            # (least negative margin per parameter first): they spend what the signal left.
            units.extend(_Unit(m / cost, i, False, 1, cost) for m in margins[lo:] if m <= 0.0)
    # sorted() is stable: equal gains keep input order, and a module's directions their order.
    return sorted(units, key=lambda u: -u.per_param), excluded


def _budget_prefix(units: list[_Unit], budget: int) -> list[_Unit]:
    spent = 0
    for count, unit in enumerate(units):
        if spent + unit.cost > budget:
            return units[:count]
        spent += unit.cost
    return units


def _median_prefix(units: list[_Unit], modules: int, rank: int) -> list[_Unit]:
    taken = [u for u in units if u.first]
    ranks = [0] * modules
    for unit in taken:
        ranks[unit.module] = unit.size
    adapted, reached = len(taken), sum(1 for r in ranks if r >= rank)
    for unit in units:
        if 2 * reached >= adapted:
            break
        if not unit.first:
            ranks[unit.module] += 1
            reached += ranks[unit.module] == rank
            taken.append(unit)
    return taken


def _check_inputs(
    spectra: Mapping[str, Sequence[float]], floors: Mapping[str, float], rank_costs: Mapping[str, int],
    settings: AllocationSettings,
) -> None:
    if not isinstance(settings, AllocationSettings):
        raise TypeError(f"settings: expected an AllocationSettings, got {type(settings).__name__}")
    if not isinstance(spectra, Mapping) or not spectra:
        raise ValueError("spectra: need a non-empty mapping of module name to squared singular values")
    for name, values in spectra.items():
        values = list(values)
        if not all(_non_negative(v) for v in values):
            raise ValueError(f"spectra[{name!r}]: values must be finite non-negative numbers, got {values[:5]!r}...")
        if any(b > a for a, b in zip(values, values[1:])):
            raise ValueError(f"spectra[{name!r}]: values must be in descending order (largest singular value first)")
        if name not in floors or not _non_negative(floors[name]):
            raise ValueError(f"floors[{name!r}]: need a finite non-negative noise floor, got {floors.get(name)!r}")
        cost = rank_costs.get(name)
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ValueError(f"rank_costs[{name!r}]: must be a positive integer (d_in + d_out), got {cost!r}")


def _non_negative(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
