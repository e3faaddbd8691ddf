"""The arms of a comparison of flat LoRA with a fisher map, planned without training anything.

- ``flat``: LoRA at the map's base rank ``r`` on exactly the map's candidate modules (those
  under ``adapter_root``), so it covers what the analysis covered and nothing else.
- ``fisher``: the map's scores allocated in budget mode at rank ``r``: its adapter parameters
  equal flat's, less at most one rank step of one module.
- ``fisher@F``: one per extra budget fraction ``F``, budget mode at ``round(r * F)`` (half up,
  at least the map's ``rank_min``).
- ``flat@F``: the twin of ``fisher@F``: flat LoRA on the same candidates at ``fisher@F``'s budget
  rank, so it spends what ``fisher@F`` spends (``F`` times flat's parameters when ``r * F`` is a
  whole rank). One twin per budget, shared by the criteria (``fisher@0.5`` and
  ``fisher-spectrum@0.5`` are both judged against ``flat@0.5``); at ``F = 1`` the twin is ``flat``.

Every arm keeps the map's alpha / rank, so the arms differ only in where the adapters go
and how large they are. :mod:`lightning_fisher.training.compare_runner` runs the arms;
:mod:`lightning_fisher.compare.results` summarises the runs. No Lightning here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from lightning_fisher.allocation.criteria import criterion_named, criterion_names
from lightning_fisher.errors import CompareError
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.peft_factory.adapter_root import rebase_names

__all__ = ["CompareArm", "check_budgets", "check_lrs", "check_seeds", "plan_arms"]


@dataclass(frozen=True)
class CompareArm:
    """One training setup of the comparison.

    Attributes:
        name: ``"flat"``, ``"flat@<fraction>"``, ``"fisher"``, ``"fisher@<fraction>"``, or with
            another criterion ``"fisher-<criterion>"`` / ``"fisher-<criterion>@<fraction>"``.
        rank: base rank: flat LoRA's rank, or the flat-equivalent budget rank of a fisher arm.
        budget_fraction: ``rank`` relative to the map's base rank, as asked for.
        fisher_map: the map the arm applies (``None`` for flat).
        modules: ``{module name relative to adapter_root: rank}`` of the adapters it injects.
        expected_parameters: LoRA parameters of those adapters, ``sum(rank * (d_in + d_out))``.
        twin: the flat arm of the same budget that a fisher arm is judged against (``"flat"`` or
            ``"flat@<fraction>"``); ``None`` for flat arms. A fisher arm planned without one is
            judged against ``"flat"``.
    """

    name: str
    rank: int
    budget_fraction: float
    fisher_map: Optional[FisherMap]
    modules: Mapping[str, int]
    expected_parameters: int
    twin: Optional[str] = None

    @property
    def is_flat(self) -> bool:
        return self.fisher_map is None

    @property
    def family(self) -> str:
        """The arm's name without its budget: ``flat``, ``fisher`` or ``fisher-<criterion>``."""
        return self.name.partition("@")[0]

    @property
    def baseline(self) -> Optional[str]:
        """The flat arm this arm's verdict is against: its twin (``None`` for a flat arm)."""
        return None if self.is_flat else self.twin or "flat"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rank": self.rank,
            "budget_fraction": self.budget_fraction,
            "expected_lora_parameters": self.expected_parameters,
            "modules": dict(self.modules),
            "family": self.family,
            "twin": self.twin,
        }


def _budget_rank(fisher_map: FisherMap, fraction: float) -> int:
    budget = fisher_map.budget
    if fraction == 1.0:
        return budget.rank
    # Half up, not round()'s half to even: 0.5 of rank 5 is 3, as a reader expects.
    return max(budget.rank_min, int(math.floor(budget.rank * fraction + 0.5)))


def check_budgets(fisher_map: FisherMap, budgets: Sequence[float]) -> list[tuple[float, int]]:
    """``[(fraction, rank)]`` of the fisher arms, the same-budget arm ``(1.0, r)`` first.

    Args:
        fisher_map: its budget gives the base rank ``r``, ``rank_min`` and ``rank_max``.
        budgets: rank budgets as fractions of ``r``; duplicates are dropped, ``1.0`` added.

    Raises:
        CompareError: a fraction is not a positive number, gives a rank above ``rank_max``, or
            gives the same rank as another one.
    """
    fractions: list[float] = []
    for value in budgets:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CompareError(f"budgets: each must be a positive fraction of the map's rank budget, got {value!r}")
        if float(value) not in fractions:
            fractions.append(float(value))
    if 1.0 in fractions:
        fractions.remove(1.0)
    fractions.insert(0, 1.0)  # the same-budget arm always runs: it answers the question
    budget = fisher_map.budget
    planned: list[tuple[float, int]] = []
    for fraction in fractions:
        rank = _budget_rank(fisher_map, fraction)
        if rank > budget.rank_max:
            raise CompareError(
                f"budgets: {fraction:g} of rank {budget.rank} is rank {rank}, above the map's rank_max "
                f"{budget.rank_max}; use fractions up to {budget.rank_max / budget.rank:g}"
            )
        same = [f for f, r in planned if r == rank]
        if same:
            raise CompareError(
                f"budgets: {fraction:g} and {same[0]:g} both give rank {rank} (map rank {budget.rank}, "
                f"rank_min {budget.rank_min}); drop one of them"
            )
        planned.append((fraction, rank))
    return planned


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """``seeds`` as a list, checked: one or more distinct integers.

    Raises:
        CompareError: naming the ``seeds`` option and the values given.
    """
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise CompareError(f"seeds: need one or more distinct integers, got {seeds!r}")
    return seeds


def check_lrs(lrs: Optional[Sequence[float]]) -> Optional[list[float]]:
    """``lrs`` as a sorted list of floats, checked: distinct positive finite numbers; ``None`` stays ``None``.

    Raises:
        CompareError: naming the ``lrs`` option and the values given.
    """
    if lrs is None:
        return None
    lrs = list(lrs)
    valid = all(not isinstance(lr, bool) and isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0 for lr in lrs)
    if not lrs or not valid or len(set(lrs)) != len(lrs):
        raise CompareError(f"lrs: need one or more distinct positive learning rates, got {lrs!r}")
    return sorted(float(lr) for lr in lrs)


def plan_arms(
    fisher_map: FisherMap,
    model: nn.Module,
    *,
    budgets: Sequence[float] = (1.0,),
    adapter_root: Optional[str] = None,
    criteria: Optional[Sequence[str]] = None,
) -> list[CompareArm]:
    """The arms of a comparison: ``flat``, one ``flat@F`` twin per extra budget fraction, ``fisher`` and ``fisher@F``.

    Flat arms come first (``flat``, then the twins in budget order), then the fisher arms
    criterion by criterion. Every fisher arm names its twin: the flat arm at its own budget
    rank, so the two spend the same parameters, give or take one rank step of one module.

    Args:
        fisher_map: the map to compare against flat LoRA.
        model: the model the map was made for (its module shapes give the parameter counts).
        budgets: rank budgets as fractions of the map's base rank; ``1.0`` (the ``fisher`` arm)
            is always included.
        adapter_root: as in :class:`~lightning_fisher.AdaptiveLoRA`; only candidates under it take part.
        criteria: allocation criteria of the fisher arms (registered names: ``trace``,
            ``spectrum``, ...); default the
            map's own. The map's criterion keeps the names ``fisher`` / ``fisher@F``; another
            criterion's arms are ``fisher-CRITERION`` / ``fisher-CRITERION@F``. ``spectrum``
            needs a map analysed with it.

    Raises:
        CompareError: a budget fraction is not positive, exceeds ``rank_max``, or duplicates
            another's rank; or no candidate of the map lies under ``adapter_root``.
    """
    planned = check_budgets(fisher_map, budgets)
    own = fisher_map.budget.criterion
    criteria = list(dict.fromkeys(criteria or (own,)))
    for criterion in criteria:
        if criterion not in criterion_names():
            raise CompareError(f"--criteria: {criterion!r} is not one of {', '.join(criterion_names())}")
        missing = criterion_named(criterion).missing_statistics(fisher_map.modules)
        if missing is not None:
            raise CompareError(f"--criteria {criterion}: the map cannot be allocated this way: {missing}")
    candidates, _ = rebase_names(fisher_map.scores, adapter_root)
    if not candidates:
        raise CompareError(
            f"adapter_root={adapter_root!r}: none of the map's {len(fisher_map.modules)} candidate modules lies "
            f"under it (e.g. {list(fisher_map.scores)[:2]}); use the dotted name of the submodule that holds them"
        )
    costs = fisher_map.rank_costs
    budget = fisher_map.budget
    rank = budget.rank
    width = sum(costs[full] for full in candidates.values())
    twins = {fraction: "flat" if fraction == 1.0 else f"flat@{fraction:g}" for fraction, _ in planned}
    # The twin takes the fisher arm's budget rank (rank_min included), so both spend the same.
    arms = [
        CompareArm(
            name=twins[fraction],
            rank=arm_rank,
            budget_fraction=fraction,
            fisher_map=None,
            modules={relative: arm_rank for relative in candidates},
            expected_parameters=arm_rank * width,
        )
        for fraction, arm_rank in planned
    ]
    # Candidates outside adapter_root get no adapter in either arm, so the budget is taken over
    # the ones inside it: the fisher arm then spends what flat spends.
    scores = {full: fisher_map.scores[full] for full in candidates.values()}
    stderr = {full: fisher_map.score_stderrs[full] for full in candidates.values()}
    spectra = {full: spectrum for full, spectrum in fisher_map.spectra.items() if full in scores}
    for criterion, (fraction, arm_rank) in ((c, p) for c in criteria for p in planned):
        reuse = (fraction == 1.0 and budget.mode == "budget" and len(scores) == len(fisher_map.modules)
                 and criterion == own)
        if reuse:
            arm_map = fisher_map
        else:
            arm_map = FisherMap.from_scores(
                scores,
                model,
                allocation=dataclasses.replace(fisher_map.allocation, rank=arm_rank, mode="budget", criterion=criterion),
                spectra=spectra,
                # alpha / rank stays what the map prescribes, whatever the budget
                lora_alpha=fisher_map.alpha.alpha_for(arm_rank, rank),
                use_rslora=fisher_map.alpha.use_rslora,
                score_stderr=stderr,
                analysis=fisher_map.analysis,
                dataset=fisher_map.dataset,
            )
            # Same model as the map on disk: keep its identity so the model check behaves as in fit.
            arm_map = dataclasses.replace(arm_map, model=fisher_map.model)
        ranks, _ = rebase_names(arm_map.ranks, adapter_root)
        arms.append(
            CompareArm(
                name=("fisher" if criterion == own else f"fisher-{criterion}") + ("" if fraction == 1.0 else f"@{fraction:g}"),
                rank=arm_rank,
                budget_fraction=fraction,
                fisher_map=arm_map,
                modules={relative: arm_map.ranks[full] for relative, full in ranks.items()},
                expected_parameters=sum(arm_map.ranks[full] * costs[full] for full in ranks.values()),
                twin=twins[fraction],
            )
        )
    return arms
