"""The ``spectrum`` criterion: rank units go where the data's mean gradient has signal per parameter.

Statistics: :class:`~lightning_fisher.analysis.spectrum.SpectrumSet` (each module's mean weight gradient's
top singular values and their noise floor, in the same pass as the trace). Allocation:
:mod:`lightning_fisher.allocation.spectrum_rule` (greedy by gain per parameter above the floor).
Stopping: the Spearman correlation of the ranks that allocation gives each sample half
(:func:`spectrum_split_half_correlation`), each half with its own floor, checked every
:data:`~lightning_fisher.analysis.spectrum.STOP_CHECK_EVERY` batches (the latest verdict counts
in between).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch

from lightning_fisher.allocation.criteria.base import AnalysisStatistics, Criterion, CriterionAllocation, Reduce, rank_agreement
from lightning_fisher.allocation.spectrum_rule import allocate_ranks_from_spectra

if TYPE_CHECKING:
    from torch import nn

    from lightning_fisher.analysis.accumulator import FisherAccumulator
    from lightning_fisher.allocation.settings import AllocationSettings
    from lightning_fisher.fisher_map.records import ModuleRecord
    from lightning_fisher.analysis.spectrum import ModuleSpectrum, SpectrumSet

__all__ = ["SpectrumCriterion", "spectrum_split_half_correlation"]


def spectrum_split_half_correlation(
    halves: Optional[Mapping[str, tuple["ModuleSpectrum", "ModuleSpectrum"]]],
    rank_costs: Mapping[str, int],
    settings: "AllocationSettings",
    rank_limits: Optional[Mapping[str, int]] = None,
) -> Optional[float]:
    """Spearman correlation between the ranks the spectrum allocation gives each half.

    Args:
        halves: ``{module: (half_1, half_2)}`` spectra with each half's own floor, as
            :meth:`~lightning_fisher.analysis.spectrum.SpectrumSet.half_spectra` gives them (``None``
            while a half holds no sample).
        rank_costs: ``{module: d_in + d_out}``.
        settings: the allocation settings the map will use (rank, bounds, mode).
        rank_limits: per module, ``min(d_in, d_out)``, as the map's allocation uses them.

    Returns:
        The correlation of the two rank vectors (``0`` for a module without adapter); ``1.0``
        when the two allocations are identical and give some module an adapter, or when there
        are fewer than three modules; ``0.0`` when one half's ranks are all equal and the
        other's are not (no agreement to measure). ``None`` while no half gives any module an
        adapter (nothing clears the noise yet) or a half holds no sample.
    """
    if halves is None:
        return None
    names = list(halves)
    ranks = []
    for h in (0, 1):
        spectra = {name: halves[name][h].sigma_sq for name in names}
        floors = {name: halves[name][h].floor for name in names}
        allocation = allocate_ranks_from_spectra(spectra, floors, rank_costs, settings=settings, rank_limits=rank_limits)
        ranks.append(torch.tensor([float(allocation.ranks.get(name, 0)) for name in names], dtype=torch.float64))
    if not bool(ranks[0].any()) and not bool(ranks[1].any()):
        return None
    if len(names) < 3 or bool((ranks[0] == ranks[1]).all()):
        return 1.0
    if bool((ranks[0] == ranks[0][0]).all()) or bool((ranks[1] == ranks[1][0]).all()):
        return 0.0
    return rank_agreement(ranks[0], ranks[1])


def _warn_if_short(records: Sequence["ModuleRecord"], settings: "AllocationSettings", result: Any) -> None:
    """Warn when a module stopped at the end of its recorded spectrum, below what it could take.

    A map keeps as many singular values per module as its analysis' ``rank_max``: reallocated
    with a higher ``rank_max``, a module cannot go past them, and the budget may be left unspent.
    """
    short = {m.name: len(m.sigma_sq) for m in records
             if len(m.sigma_sq) < min(settings.rank_max, m.rank_limit) and result.ranks.get(m.name) == len(m.sigma_sq)}
    if not short:
        return
    stored = max(short.values())
    reached = "" if result.budget is None else (
        f"; the budget reaches {result.parameters:,} of {result.budget:,} parameters "
        f"({result.parameters / result.budget:.2f}x)"
    )
    warnings.warn(
        f"criterion 'spectrum': the map stores {stored} singular values per module (its analysis' rank_max), so "
        f"{len(short)} module(s) stop at {stored} below rank_max {settings.rank_max} "
        f"(e.g. {', '.join(list(short)[:3])}){reached}. Analyse again with --rank-max {settings.rank_max} to "
        "allocate beyond the stored values",
        UserWarning,
        stacklevel=2,
    )


class SpectrumCriterion(Criterion):
    """Greedy by gain per parameter: squared singular values of the mean gradient above their noise floor."""

    name = "spectrum"
    help = (
        "rank units go by gain per parameter, the squared singular values of the mean gradient above their "
        "noise floor (modules with none get no adapter)"
    )
    stopping_method = "split-half spearman of the spectrum allocation's ranks over all modules"
    correlation_of = "the halves' spectrum ranks"

    def statistics(
        self, candidates: Mapping[str, "nn.Module"], settings: "AllocationSettings", *, seed: int, loss_reduction: str
    ) -> "SpectrumSet":
        from lightning_fisher.analysis.spectrum import SpectrumSet

        return SpectrumSet(candidates, rank_max=settings.rank_max, seed=seed, loss_reduction=loss_reduction)

    def map_statistics(self, statistics: Optional[AnalysisStatistics]) -> dict[str, Any]:
        return {"spectra": statistics.spectra()}

    def split_half_correlation(
        self, accumulator: "FisherAccumulator", statistics: Optional[AnalysisStatistics],
        settings: "AllocationSettings", reduce: Reduce,
    ) -> Optional[float]:
        # Checked every statistics.check_every batches (its reconstructions and allocations would
        # otherwise dominate a small model's batch); the latest verdict counts in between.
        if not statistics.check_due():
            return statistics.last_correlation
        # Only the halves' sketches cross processes per check: a rank-k adapter's size per module.
        halves = statistics.half_spectra(reduce(statistics.half_sketch()))
        statistics.last_correlation = spectrum_split_half_correlation(
            halves, statistics.rank_costs, settings, statistics.rank_limits
        )
        return statistics.last_correlation

    def missing_statistics(self, records: Sequence["ModuleRecord"]) -> Optional[str]:
        missing = [m.name for m in records if m.sigma_sq is None or m.noise_floor is None]
        if not missing:
            return None
        return (
            f"criterion 'spectrum': {len(missing)} module(s) have no recorded spectrum, e.g. {missing[:3]}; "
            "run the analysis with criterion='spectrum' (lightning-fisher analyze --criterion spectrum)"
        )

    def allocate(self, records: Sequence["ModuleRecord"], settings: "AllocationSettings") -> CriterionAllocation:
        problem = self.missing_statistics(records)
        if problem is not None:
            raise ValueError(problem)
        result = allocate_ranks_from_spectra(
            {m.name: m.sigma_sq for m in records}, {m.name: m.noise_floor for m in records},
            {m.name: m.rank_cost for m in records}, settings=settings,
            rank_limits={m.name: m.rank_limit for m in records},
        )
        _warn_if_short(records, settings, result)
        if not result.ranks:
            raise ValueError(
                "criterion 'spectrum': no module has a direction above its noise floor, so the data's mean gradient "
                "cannot be told from noise on these samples; analyse more samples (raise min_batches / "
                "--min-batches, or convergence_patience) or use criterion='trace'"
            )
        return CriterionAllocation(ranks=dict(result.ranks), excluded=dict(result.excluded))

    def describe_settings(self, settings: "AllocationSettings") -> str:
        return "greedy by gain per parameter above each module's noise floor"
