"""``fisher_map.json``: the contract between the analysis and training.

A :class:`FisherMap` holds, for every candidate module of the analysed model, its Fisher score
(with uncertainty) and the LoRA rank it gets, or that it gets no adapter; plus how the map was
made (rank budget, alpha policy, analysis record, model and dataset fingerprints, versions).

The module records are the source of truth. ``target_modules``, ``rank_pattern`` and
``alpha_pattern`` are derived from them with keys that select exactly one module each under
PEFT's matching rules (see :mod:`lightning_fisher.fisher_map.patterns`); they are written to the file so
that PEFT users can read them directly, and checked against the records when a file is read.

Where the rest lives: the records are :mod:`lightning_fisher.fisher_map.records`; the file (name
rule, JSON document, schema, consistency checks, atomic write) is
:mod:`lightning_fisher.fisher_map.codec`. Their names are importable from here too.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from lightning_fisher._version import __version__
from lightning_fisher.allocation.trace_rule import flat_lora_parameters, lora_parameters
from lightning_fisher.allocation.settings import (
    ALLOCATION_OPTIONS,
    AllocationSettings,
    allocation_from_options,
    other_spellings,
    settings_or_options,
)
from lightning_fisher.allocation.criteria import criterion_named
from lightning_fisher.analysis.spectrum import ModuleSpectrum
from lightning_fisher.analysis.candidates import module_type_name, rank_cost, weight_shape
from lightning_fisher.analysis.fingerprint import model_fingerprint, parameter_count
from lightning_fisher.analysis.module_names import named_modules, unwrapped_model
from lightning_fisher.fisher_map.codec import (
    FISHER_MAP_FILENAME,
    SCHEMA_VERSION,
    check_consistency,
    document_of,
    read_document,
    records_of,
    resolve_map_path,
    validate_document,
    write_document,
)
from lightning_fisher.fisher_map.records import (
    AlphaPolicy,
    AnalysisRecord,
    DatasetRecord,
    ModelRecord,
    ModuleRecord,
    RankBudget,
    StabilityRecord,
    TimestepFocusRecord,
    alphas_of,
    rank_costs_of,
    ranks_of,
)
from lightning_fisher.fisher_map.summary import summary_line
from lightning_fisher.fisher_map.patterns import exact_keys, exact_target_regex

__all__ = [
    "FISHER_MAP_FILENAME",
    "SCHEMA_VERSION",
    "AlphaPolicy",
    "AnalysisRecord",
    "DatasetRecord",
    "FisherMap",
    "ModelRecord",
    "ModuleRecord",
    "RankBudget",
    "StabilityRecord",
    "TimestepFocusRecord",
    "resolve_map_path",
]

PathLike = Union[str, os.PathLike]


def _current_versions() -> dict[str, Optional[str]]:
    # From the installed package's metadata, not by importing peft: building a map (a plain
    # PyTorch analysis) must not take the seconds, and the optional-kernel notes, of that import.
    try:
        peft_version: Optional[str] = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - peft is a hard dependency
        peft_version = None
    # str(): torch.__version__ is a TorchVersion, which weights_only checkpoint loading refuses
    return {"lightning_fisher": __version__, "torch": str(torch.__version__), "peft": peft_version}


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class FisherMap:
    """In-memory form of ``fisher_map.json``. Build with :meth:`from_scores`, read with :meth:`load`."""

    modules: tuple[ModuleRecord, ...]
    budget: RankBudget
    alpha: AlphaPolicy
    model: ModelRecord
    analysis: Optional[AnalysisRecord] = None
    dataset: Optional[DatasetRecord] = None
    versions: Mapping[str, Optional[str]] = field(default_factory=_current_versions)
    created: str = field(default_factory=_utc_now)
    path: Optional[Path] = field(default=None, compare=False)
    """File this map was read from or last written to (not part of the map)."""

    # ------------------------------------------------------------------ building
    @classmethod
    @other_spellings(rank_mode="mode")
    @settings_or_options("allocation", AllocationSettings, ALLOCATION_OPTIONS)
    def from_scores(
        cls,
        scores: Mapping[str, float],
        model: nn.Module,
        *,
        rank: int = AllocationSettings.rank,
        rank_min: int = AllocationSettings.rank_min,
        rank_max: int = AllocationSettings.rank_max,
        mode: Literal["median", "budget"] = AllocationSettings.mode,
        score_power: float = AllocationSettings.score_power,
        exclude_threshold: float = AllocationSettings.exclude_threshold,
        criterion: str = AllocationSettings.criterion,
        lora_alpha: Optional[float] = None,
        use_rslora: bool = False,
        score_stderr: Optional[Mapping[str, Optional[float]]] = None,
        analysis: Optional[AnalysisRecord] = None,
        dataset: Optional[DatasetRecord] = None,
        allocation: Optional[AllocationSettings] = None,
        spectra: Optional[Mapping[str, ModuleSpectrum]] = None,
    ) -> "FisherMap":
        """Allocate ranks from per-module scores and describe the result for ``model``.

        Args:
            scores: ``{full module name: score}`` for every candidate module of ``model``.
            model: the model the names refer to; its module shapes and fingerprint are recorded.
            rank: base rank: the median (``mode="median"``) or flat-equivalent budget
                (``mode="budget"``) rank.
            rank_min: smallest rank of an adapted module.
            rank_max: largest rank of an adapted module.
            mode: ``"median"`` or ``"budget"``; see :func:`~lightning_fisher.allocate_ranks`.
            score_power: exponent of the score-to-rank rule.
            exclude_threshold: relative score below which a module gets no adapter.
            criterion: how ranks follow from the analysis, a registered criterion's name
                (:mod:`lightning_fisher.allocation.criteria`); ``"spectrum"`` needs ``spectra``.
            lora_alpha: alpha at the base rank; default ``2 * rank``.
            use_rslora: alpha policy, see :class:`AlphaPolicy`.
            score_stderr: standard error of each score, when known (``None`` entries allowed).
            analysis: how the scores were measured.
            dataset: the analysed dataset folder.
            allocation: the allocation options above as one
                :class:`~lightning_fisher.AllocationSettings` (then pass none of them).
            spectra: per module, its mean-gradient spectrum and noise floor
                (:class:`~lightning_fisher.analysis.spectrum.ModuleSpectrum`); required by the
                ``spectrum`` criterion, recorded in the map whatever the criterion.

        Raises:
            ValueError: a name in ``scores`` is not a module of ``model``, or an allocation
                argument is invalid (the message names it).
        """
        settings = allocation_from_options(
            allocation, "FisherMap.from_scores", rank, rank_min, rank_max, mode, score_power, exclude_threshold,
            criterion,
        )
        named = dict(named_modules(model))
        unknown = [name for name in scores if name not in named]
        if unknown:
            raise ValueError(
                f"scores: {len(unknown)} name(s) are not modules of {type(model).__name__}, "
                f"e.g. {unknown[:3]}; use full names from model.named_modules()"
            )
        spectra = spectra or {}
        records = tuple(
            ModuleRecord(
                name=name,
                type=module_type_name(named[name]),
                shape=tuple(weight_shape(named[name])),
                rank_cost=rank_cost(named[name]),
                score=float(score),
                score_stderr=None if score_stderr is None or score_stderr[name] is None else float(score_stderr[name]),
                sigma_sq=None if name not in spectra else tuple(float(v) for v in spectra[name].sigma_sq),
                noise_floor=None if name not in spectra else float(spectra[name].floor),
            )
            for name, score in scores.items()
        )
        model_record = ModelRecord(
            fingerprint=model_fingerprint(model),
            class_name=type(unwrapped_model(model)).__name__,
            num_parameters=parameter_count(model),
        )
        alpha = float(2 * settings.rank if lora_alpha is None else lora_alpha)
        return cls._allocated(
            records, settings, AlphaPolicy(lora_alpha=alpha, use_rslora=use_rslora), model_record,
            analysis=analysis, dataset=dataset,
        )

    def reallocate(
        self, allocation: AllocationSettings, *, lora_alpha: Optional[float] = None
    ) -> "FisherMap":
        """The same analysis allocated with other settings (budget, bounds, mode or criterion).

        No model and no new analysis are needed: the scores, and for the ``spectrum``
        criterion the spectra, are in the map. A spectrum keeps as many values as the
        analysis' ``rank_max``, so a module cannot get more ranks than that.

        Args:
            allocation: the new settings (e.g. ``dataclasses.replace(fisher_map.allocation,
                rank=4, mode="budget")``).
            lora_alpha: alpha at the new base rank; default: the map's alpha policy carried
                to it (alpha/rank kept, or alpha kept under rsLoRA).

        Returns:
            A new map (not written; ``path`` unset), with this map's analysis and provenance.

        Raises:
            ValueError: the ``spectrum`` criterion on a map analysed without spectra (re-run
                the analysis with ``criterion="spectrum"``), or a bad setting.
        """
        if lora_alpha is None:
            lora_alpha = self.alpha.alpha_for(allocation.rank, self.budget.rank)
        base = tuple(
            dataclasses.replace(m, rank=None, alpha=None, exclusion_reason=None) for m in self.modules
        )
        policy = AlphaPolicy(lora_alpha=float(lora_alpha), use_rslora=self.alpha.use_rslora)
        return self._allocated(
            base, allocation, policy, self.model, analysis=self.analysis, dataset=self.dataset,
        )

    @classmethod
    def _allocated(
        cls,
        records: tuple[ModuleRecord, ...],
        settings: AllocationSettings,
        policy: AlphaPolicy,
        model: ModelRecord,
        *,
        analysis: Optional[AnalysisRecord],
        dataset: Optional[DatasetRecord],
    ) -> "FisherMap":
        """Records with ranks, alphas and reasons from ``settings``; the map around them."""
        if not (math.isfinite(policy.lora_alpha) and policy.lora_alpha > 0):
            raise ValueError(f"lora_alpha: must be a positive number, got {policy.lora_alpha!r}")
        costs = {m.name: m.rank_cost for m in records}
        result = criterion_named(settings.criterion).allocate(records, settings)
        ranks, reasons = result.ranks, result.excluded
        allocated = tuple(
            dataclasses.replace(
                m,
                rank=ranks.get(m.name),
                alpha=None if m.name not in ranks else policy.alpha_for(ranks[m.name], settings.rank),
                exclusion_reason=None if m.name in ranks else reasons[m.name],
            )
            for m in records
        )
        budget = RankBudget(
            **settings.as_dict(),
            lora_parameters=lora_parameters(ranks, costs),
            flat_lora_parameters=flat_lora_parameters(settings.rank, costs),
        )
        return cls(allocated, budget, policy, model, analysis=analysis, dataset=dataset)

    @property
    def spectra(self) -> dict[str, ModuleSpectrum]:
        """``{module: its recorded spectrum and noise floor}`` (maps analysed with ``criterion="spectrum"``)."""
        samples = 0 if self.analysis is None else self.analysis.samples
        return {
            m.name: ModuleSpectrum(m.name, m.sigma_sq, m.noise_floor, samples)
            for m in self.modules if m.sigma_sq is not None and m.noise_floor is not None
        }

    @property
    def allocation(self) -> AllocationSettings:
        """The allocation settings this map was made with."""
        return self.budget.settings()

    # ------------------------------------------------------------------ read access
    @property
    def scores(self) -> dict[str, float]:
        """``{module name: score}`` for every candidate module."""
        return {m.name: m.score for m in self.modules}

    @property
    def score_stderrs(self) -> dict[str, Optional[float]]:
        """``{module name: standard error of its score}`` (``None`` when unknown)."""
        return {m.name: m.score_stderr for m in self.modules}

    @property
    def ranks(self) -> dict[str, int]:
        """``{module name: rank}`` for the modules that get an adapter."""
        return ranks_of(self.modules)

    @property
    def alphas(self) -> dict[str, float]:
        """``{module name: alpha}`` for the modules that get an adapter."""
        return alphas_of(self.modules)

    @property
    def excluded(self) -> list[str]:
        """Candidate modules that get no adapter."""
        return [m.name for m in self.modules if m.excluded]

    @property
    def rank_costs(self) -> dict[str, int]:
        """``{module name: adapter parameters per unit of rank}`` for every candidate."""
        return rank_costs_of(self.modules)

    @property
    def target_modules(self) -> str:
        """PEFT ``target_modules``: a full-match regex selecting exactly the adapted modules."""
        return exact_target_regex(self.ranks)

    @property
    def rank_pattern(self) -> dict[str, int]:
        """PEFT ``rank_pattern`` with one exact key per adapted module."""
        return exact_keys(self.ranks)

    @property
    def alpha_pattern(self) -> dict[str, float]:
        """PEFT ``alpha_pattern`` with one exact key per adapted module."""
        return exact_keys(self.alphas)

    def summary(self) -> str:
        """One line: adapted modules, rank range and median, parameters versus flat LoRA."""
        return summary_line(self)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The JSON document of this map (schema version :data:`SCHEMA_VERSION`)."""
        return document_of(self)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, path: Optional[PathLike] = None) -> "FisherMap":
        """Validate a JSON document and build the map.

        Raises:
            FisherMapVersionError: the document has a schema version this library cannot read.
            FisherMapSchemaError: the document violates the schema or contradicts itself; the
                message names the file (when given) and the JSON path of the field.
        """
        validate_document(document, path)
        fisher_map = cls(**records_of(document, path))
        check_consistency(fisher_map, document, path)
        return fisher_map

    @classmethod
    def load(cls, path: PathLike) -> "FisherMap":
        """Read and validate a map file, or ``DIR/fisher_map.json`` when given a folder.

        Raises:
            FisherMapNotFoundError, FisherMapDecodeError, FisherMapVersionError,
            FisherMapSchemaError: all subclasses of :class:`~lightning_fisher.FisherMapError`,
            with the file in the message.
        """
        file, document = read_document(path)
        return cls.from_dict(document, path=file)

    def save(self, path: PathLike) -> Path:
        """Validate and write the map atomically; a folder gets ``fisher_map.json`` inside it.

        Returns:
            The file written.

        Raises:
            FisherMapWriteError: the destination cannot be written (any existing map there is
                left as it was).
        """
        return write_document(self.to_dict(), path)

    def with_path(self, path: Optional[PathLike]) -> "FisherMap":
        """A copy of this map that remembers ``path`` as its file."""
        return dataclasses.replace(self, path=None if path is None else Path(path))
