"""The ``trace`` criterion: rank grows with each module's Fisher trace per parameter.

Allocation: :mod:`lightning_fisher.allocation.trace_rule` (auto-targeting below ``exclude_threshold`` of
the median score, rank proportional to ``score ** score_power``, scaled to the median rank or
to the flat-LoRA budget). Stopping: the Spearman correlation of the two sample halves' module
scores (:func:`split_half_correlation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from lightning_fisher.allocation.trace_rule import allocate_ranks
from lightning_fisher.allocation.criteria.base import AnalysisStatistics, Criterion, CriterionAllocation, Reduce, rank_agreement

if TYPE_CHECKING:
    from lightning_fisher.analysis.accumulator import FisherAccumulator
    from lightning_fisher.allocation.settings import AllocationSettings
    from lightning_fisher.fisher_map.records import ModuleRecord

__all__ = ["NO_GRADIENT", "TraceCriterion", "split_half_correlation"]

NO_GRADIENT = "no gradient reached it on this data (score 0)"


def split_half_correlation(accumulator: "FisherAccumulator") -> Optional[float]:
    """Spearman correlation between the module scores of the two sample halves.

    Returns:
        The correlation, ``1.0`` when there are fewer than three modules (any ranking of one or
        two modules is trivially reproducible), or ``None`` while a half has no sample or a
        half's scores are all equal (no ranking to compare yet).
    """
    if len(accumulator.names) < 3:
        return 1.0
    halves = accumulator.half_scores()
    if accumulator.half_counts().min() < 1:
        return None
    if bool((halves[0] == halves[0, 0]).all()) or bool((halves[1] == halves[1, 0]).all()):
        return None
    return rank_agreement(halves[0], halves[1])


class TraceCriterion(Criterion):
    """Rank from the score: ``score ** score_power``, modules below ``exclude_threshold`` x median left out."""

    name = "trace"
    help = "rank grows with the module's Fisher trace per parameter (score_power, exclude_threshold)"
    stopping_method = "split-half spearman over all modules"
    settings_used = ("score_power", "exclude_threshold")

    def split_half_correlation(
        self, accumulator: "FisherAccumulator", statistics: Optional[AnalysisStatistics],
        settings: "AllocationSettings", reduce: Reduce,
    ) -> Optional[float]:
        return split_half_correlation(accumulator)

    def allocate(self, records: Sequence["ModuleRecord"], settings: "AllocationSettings") -> CriterionAllocation:
        scores = {m.name: m.score for m in records}
        ranks = allocate_ranks(
            scores, rank_costs={m.name: m.rank_cost for m in records}, settings=settings,
            rank_limits={m.name: m.rank_limit for m in records},
        )
        below = f"score below exclude_threshold ({settings.exclude_threshold:g}) x the median score"
        excluded = {name: NO_GRADIENT if score == 0 else below for name, score in scores.items() if name not in ranks}
        return CriterionAllocation(ranks=ranks, excluded=excluded)

    def describe_settings(self, settings: "AllocationSettings") -> str:
        return f"score power {settings.score_power:g}, exclude below {settings.exclude_threshold:g}x median"
