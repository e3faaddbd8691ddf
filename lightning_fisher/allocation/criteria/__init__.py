"""Allocation criteria: how an analysis becomes adapter ranks, one module per criterion.

* :mod:`~lightning_fisher.allocation.criteria.base`: the :class:`Criterion` interface and its one result
  type, :class:`CriterionAllocation`;
* :mod:`~lightning_fisher.allocation.criteria.registry`: the criteria by name (the only place that maps
  ``AllocationSettings.criterion`` to behaviour);
* :mod:`~lightning_fisher.allocation.criteria.trace`, :mod:`~lightning_fisher.allocation.criteria.spectrum`: the two
  built-in criteria.

Adding a criterion::

    from lightning_fisher.allocation.criteria import Criterion, CriterionAllocation, register_criterion

    class Uniform(Criterion):
        name = "uniform"
        help = "every module with a gradient at the base rank"
        stopping_method = "split-half spearman over all modules (uniform)"
        def split_half_correlation(self, accumulator, statistics, settings, reduce): ...
        def allocate(self, records, settings): ...

    register_criterion(Uniform())
    analyze(task, data, allocation=AllocationSettings(criterion="uniform"))
"""

from lightning_fisher.allocation.criteria.base import AnalysisStatistics, Criterion, CriterionAllocation, Reduce, rank_agreement
from lightning_fisher.allocation.criteria.registry import (
    STOPPING_METHODS,
    criterion_for_stopping_method,
    criterion_named,
    criterion_names,
    register_criterion,
    unregister_criterion,
)

__all__ = [
    "STOPPING_METHODS",
    "AnalysisStatistics",
    "Criterion",
    "CriterionAllocation",
    "Reduce",
    "criterion_for_stopping_method",
    "criterion_named",
    "criterion_names",
    "rank_agreement",
    "register_criterion",
    "unregister_criterion",
]
