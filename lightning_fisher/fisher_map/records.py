"""The records a :class:`~lightning_fisher.FisherMap` is made of, one per part of the file.

Plain frozen dataclasses, field for field the objects of ``fisher_map.json`` (see
``lightning_fisher/schema/fisher_map.v1.json``): per-module scores and ranks, the rank budget,
the alpha policy, how the analysis ran, and what was analysed. Reading and writing them is
:mod:`lightning_fisher.fisher_map.codec`; the map itself is :mod:`lightning_fisher.fisher_map.map`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Protocol

from lightning_fisher.allocation.settings import AllocationSettings
from lightning_fisher.analysis.timesteps import TimestepFocus

__all__ = [
    "MapContent",
    "alphas_of",
    "rank_costs_of",
    "ranks_of",
    "AlphaPolicy",
    "AnalysisRecord",
    "DatasetRecord",
    "ModelRecord",
    "ModuleRecord",
    "RankBudget",
    "StabilityRecord",
    "TimestepFocusRecord",
]


@dataclass(frozen=True)
class ModuleRecord:
    """One candidate module: its score and, unless excluded, its adapter rank and alpha.

    Attributes:
        sigma_sq: top squared singular values of the mean weight gradient, descending (maps
            analysed with the ``spectrum`` criterion; ``None`` otherwise).
        noise_floor: the squared singular value noise alone would reach (same units).
        exclusion_reason: why an excluded module got no adapter, in words.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    rank_cost: int
    score: float
    score_stderr: Optional[float] = None
    rank: Optional[int] = None
    alpha: Optional[float] = None
    sigma_sq: Optional[tuple[float, ...]] = None
    noise_floor: Optional[float] = None
    exclusion_reason: Optional[str] = None

    @property
    def excluded(self) -> bool:
        """True when the module gets no adapter."""
        return self.rank is None

    @property
    def above_floor(self) -> Optional[int]:
        """How many recorded directions clear the noise floor (``None`` without a spectrum)."""
        if self.sigma_sq is None or self.noise_floor is None:
            return None
        return sum(value > self.noise_floor for value in self.sigma_sq)

    @property
    def rank_limit(self) -> int:
        """The largest rank that fits the module, ``min(d_in, d_out)``: an adapter of higher rank
        has more parameters than the layer it adapts and can express nothing more."""
        return min(self.shape)


@dataclass(frozen=True)
class RankBudget(AllocationSettings):
    """The allocation settings a map was made with, and the parameter counts they gave.

    The settings fields (``rank``, ``rank_min``, ``rank_max``, ``mode``, ...) and their defaults
    and checks are :class:`~lightning_fisher.allocation.settings.AllocationSettings`'; the
    budget adds what the allocation spent.

    Args:
        lora_parameters: trainable adapter parameters of the map's ranks.
        flat_lora_parameters: those of flat LoRA at ``rank`` on every candidate.
    """

    lora_parameters: int = 0
    flat_lora_parameters: int = 0


@dataclass(frozen=True)
class AlphaPolicy:
    """How each module's LoRA alpha follows from its rank.

    Args:
        lora_alpha: alpha at the base rank (``RankBudget.rank``).
        use_rslora: without rsLoRA alpha/r is kept constant, so every module has PEFT scaling
            ``lora_alpha / rank``; with rsLoRA alpha itself is constant and each module is
            scaled by ``lora_alpha / sqrt(rank_m)``, as rsLoRA prescribes for its rank.
    """

    lora_alpha: float
    use_rslora: bool = False

    def alpha_for(self, module_rank: int, base_rank: int) -> float:
        """Alpha of a module with rank ``module_rank`` when the base rank is ``base_rank``."""
        if self.use_rslora:
            return float(self.lora_alpha)
        return float(self.lora_alpha) * module_rank / base_rank


@dataclass(frozen=True)
class TimestepFocusRecord:
    """The timestep focus the analysis ran with, and the timesteps it actually drew."""

    name: str = "balanced"
    range: Optional[tuple[float, float]] = None
    applied: bool = False
    observed_range: Optional[tuple[float, float]] = None

    @classmethod
    def of(
        cls, focus: TimestepFocus, *, applied: bool, observed_range: Optional[tuple[float, float]] = None
    ) -> "TimestepFocusRecord":
        """The record of an analysis that ran with ``focus``."""
        return cls(name=focus.name, range=focus.range, applied=applied, observed_range=observed_range)

    @property
    def focus(self) -> TimestepFocus:
        """The focus setting itself (for :meth:`TimestepFocus.describe` and the like)."""
        return TimestepFocus(self.name, self.range)




@dataclass(frozen=True)
class StabilityRecord:
    """The stopping rule's settings and its last readings."""

    method: str
    threshold: float
    patience: int
    last_correlation: Optional[float]
    min_batches: int = 0
    max_batches: Optional[int] = None
    history: tuple[Optional[float], ...] = ()


@dataclass(frozen=True)
class AnalysisRecord:
    """What the analysis did: samples and batches used, whether and why it stopped."""

    score: str
    loss_reduction: Literal["mean", "sum"]
    timestep_focus: TimestepFocusRecord
    batches: int
    samples: int
    skipped_samples: int
    converged: bool
    stop_reason: Literal["converged", "max_batches", "data_exhausted", "interrupted"]
    seed: Optional[int]
    stability: Optional[StabilityRecord] = None
    world_size: int = 1
    seconds: Optional[float] = None


@dataclass(frozen=True)
class DatasetRecord:
    """The dataset folder that was analysed."""

    path: str
    fingerprint: str
    num_files: int


@dataclass(frozen=True)
class ModelRecord:
    """Identity of the analysed model."""

    fingerprint: str
    class_name: str
    num_parameters: int



class MapContent(Protocol):
    """What a fisher map is made of: its records. The file codec and the printed summaries read
    these and nothing else, so they do not depend on :class:`~lightning_fisher.FisherMap` (which
    uses them)."""

    modules: tuple[ModuleRecord, ...]
    budget: RankBudget
    alpha: AlphaPolicy
    model: ModelRecord
    analysis: Optional[AnalysisRecord]
    dataset: Optional[DatasetRecord]
    versions: Mapping[str, Optional[str]]
    created: str
    path: Optional[Path]


def ranks_of(modules: Iterable[ModuleRecord]) -> dict[str, int]:
    """``{module: rank}`` of the adapted modules, in record order."""
    return {m.name: m.rank for m in modules if m.rank is not None}


def alphas_of(modules: Iterable[ModuleRecord]) -> dict[str, float]:
    """``{module: alpha}`` of the adapted modules, in record order."""
    return {m.name: m.alpha for m in modules if m.alpha is not None}


def rank_costs_of(modules: Iterable[ModuleRecord]) -> dict[str, int]:
    """``{module: adapter parameters per unit of rank}`` of every candidate."""
    return {m.name: m.rank_cost for m in modules}

def __getattr__(name: str):
    # STOPPING_METHODS moved to the criteria registry (each criterion names its stopping rule);
    # kept importable from here, looked up only when asked so the records load no criterion.
    if name == "STOPPING_METHODS":
        from lightning_fisher.allocation.criteria import STOPPING_METHODS

        return STOPPING_METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
