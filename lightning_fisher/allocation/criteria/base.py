"""What an allocation criterion is: the interface every criterion implements.

A criterion decides how one analysis becomes adapter ranks. The analysis always measures the
per-module Fisher trace (the map's ``score`` of every module, whatever the criterion); a
criterion may gather more in the same pass (``spectrum``: the mean gradient's singular values).
It then answers four questions, each where the library needs it:

* **Gather** (:meth:`Criterion.statistics`): extra statistics fed by the collector's observer
  during the analysis, summed over processes at the end (``None``: the trace alone).
* **Stop** (:meth:`Criterion.split_half_correlation`, :attr:`Criterion.stopping_method`): how
  reproducible its result is after each batch, as the split-half agreement the stopping rule
  (:mod:`lightning_fisher.analysis.stability`) tracks; the method's name is recorded in the map.
* **Allocate** (:meth:`Criterion.allocate`): ``{module: rank}`` and, for every other module, why
  it gets no adapter: one result type, :class:`CriterionAllocation`, for every criterion.
* **Describe** (:meth:`Criterion.describe_settings`, :attr:`Criterion.correlation_of`): what
  ``show`` and the analysis' closing line say about it.

A criterion is registered by name (:func:`~lightning_fisher.allocation.criteria.register_criterion`);
``AllocationSettings(criterion=NAME)`` and ``--criterion NAME`` then select it.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Protocol

import torch

if TYPE_CHECKING:
    from torch import nn

    from lightning_fisher.analysis.accumulator import FisherAccumulator
    from lightning_fisher.allocation.settings import AllocationSettings
    from lightning_fisher.fisher_map.records import ModuleRecord

__all__ = ["AnalysisStatistics", "Criterion", "CriterionAllocation", "Reduce", "rank_agreement"]

#: Sums a tensor over the analysis' processes (the identity in one process).
Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CriterionAllocation:
    """The ranks a criterion gives, and why the other modules get none.

    Attributes:
        ranks: ``{module: rank}`` for the adapted modules, in input order.
        excluded: ``{module: reason in words}`` for every other module, in input order.
    """

    ranks: dict[str, int]
    excluded: dict[str, str]


class AnalysisStatistics(Protocol):
    """Statistics a criterion gathers during the analysis, beyond the per-module trace."""

    def observe(self, name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        """The collector's observer: one batch of module ``name``'s inputs and output gradients."""

    def state_tensor(self, device: Any = None) -> torch.Tensor:
        """The whole state as one tensor (summed over processes at the end of the analysis)."""

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace the state from :meth:`state_tensor`'s (summed) tensor."""


class Criterion(abc.ABC):
    """How an analysis becomes adapter ranks (see the module docstring).

    Attributes:
        name: the value of ``AllocationSettings.criterion`` / ``--criterion``.
        help: one sentence for ``--help`` and the wizard.
        stopping_method: the stopping rule's name, recorded in the map's ``analysis.stability``.
        correlation_of: what the split-half correlation compares, in words (the closing line).
        settings_used: the :class:`~lightning_fisher.AllocationSettings` fields it reads beyond
            ``rank``, ``rank_min``, ``rank_max`` and ``mode``.
    """

    name: ClassVar[str]
    help: ClassVar[str]
    stopping_method: ClassVar[str]
    correlation_of: ClassVar[str] = "module scores"
    settings_used: ClassVar[tuple[str, ...]] = ()

    def statistics(
        self, candidates: Mapping[str, "nn.Module"], settings: "AllocationSettings", *, seed: int, loss_reduction: str
    ) -> Optional[AnalysisStatistics]:
        """Extra statistics to gather during the analysis; ``None`` (the default): the trace alone."""
        return None

    def map_statistics(self, statistics: Optional[AnalysisStatistics]) -> dict[str, Any]:
        """What :meth:`FisherMap.from_scores <lightning_fisher.FisherMap.from_scores>` records of
        :meth:`statistics` (its keyword arguments); ``{}`` by default."""
        return {}

    @abc.abstractmethod
    def split_half_correlation(
        self, accumulator: "FisherAccumulator", statistics: Optional[AnalysisStatistics],
        settings: "AllocationSettings", reduce: Reduce,
    ) -> Optional[float]:
        """The agreement of the two sample halves after the latest batch; ``None`` while undefined.

        ``accumulator`` holds the trace statistics of every process already; ``statistics`` are
        this process's own, and anything read from them for the check goes through ``reduce``
        (every process calls this, so a collective inside is safe).
        """

    def missing_statistics(self, records: Sequence["ModuleRecord"]) -> Optional[str]:
        """Why :meth:`allocate` cannot run on these records (what the map lacks), or ``None``."""
        return None

    @abc.abstractmethod
    def allocate(self, records: Sequence["ModuleRecord"], settings: "AllocationSettings") -> CriterionAllocation:
        """Ranks for the records' modules under ``settings`` (every module ranked or excluded).

        Raises:
            ValueError: the records lack what the criterion needs, or no module can be adapted;
                the message says what to do.
        """

    def describe_settings(self, settings: "AllocationSettings") -> str:
        """The settings it reads beyond the ranks and mode, for people (``show``'s budget line)."""
        return ", ".join(f"{name.replace('_', ' ')} {getattr(settings, name):g}" for name in self.settings_used)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def rank_agreement(first: torch.Tensor, second: torch.Tensor) -> Optional[float]:
    """Spearman correlation of two vectors over the same modules; ``None`` when not finite."""
    # Imported here: torchmetrics takes seconds to import, and only the analysis needs it.
    from torchmetrics.functional import spearman_corrcoef

    rho = float(spearman_corrcoef(first.to(torch.float64), second.to(torch.float64)))
    return rho if math.isfinite(rho) else None
