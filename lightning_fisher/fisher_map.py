"""``fisher_map.json``: the contract between the analysis and training.

A :class:`FisherMap` holds, for every candidate module of the analysed model, its Fisher score
(with uncertainty) and the LoRA rank it gets, or that it gets no adapter; plus how the map was
made (rank budget, alpha policy, analysis record, model and dataset fingerprints, versions).

The module records are the source of truth. ``target_modules``, ``rank_pattern`` and
``alpha_pattern`` are derived from them with keys that select exactly one module each under
PEFT's matching rules (see :mod:`lightning_fisher.patterns`); they are written to the file so
that PEFT users can read them directly, and checked against the records when a file is read.

Files are validated against the versioned JSON Schema shipped in
``lightning_fisher/schema/fisher_map.v<N>.json`` on write and on read, and written atomically:
a crash or error during :meth:`FisherMap.save` leaves any previous map untouched and no
temporary file behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import jsonschema
import torch
from torch import nn

from lightning_fisher._version import __version__
from lightning_fisher.allocation import allocate_ranks, flat_lora_parameters, lora_parameters
from lightning_fisher.atomic_io import write_text_atomic
from lightning_fisher.candidates import module_type_name, rank_cost, weight_shape
from lightning_fisher.errors import (
    FisherMapDecodeError,
    FisherMapNotFoundError,
    FisherMapSchemaError,
    FisherMapVersionError,
    FisherMapWriteError,
)
from lightning_fisher.fingerprint import model_fingerprint
from lightning_fisher.patterns import exact_module_key, exact_target_regex

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

FISHER_MAP_FILENAME = "fisher_map.json"
SCHEMA_VERSION = 1

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ModuleRecord:
    """One candidate module: its score and, unless excluded, its adapter rank and alpha."""

    name: str
    type: str
    shape: tuple[int, ...]
    rank_cost: int
    score: float
    score_stderr: Optional[float] = None
    rank: Optional[int] = None
    alpha: Optional[float] = None

    @property
    def excluded(self) -> bool:
        """True when the module gets no adapter."""
        return self.rank is None


@dataclass(frozen=True)
class RankBudget:
    """The rank settings a map was allocated with, and the parameter counts they gave."""

    rank: int = 64
    rank_min: int = 16
    rank_max: int = 128
    mode: Literal["median", "budget"] = "median"
    score_power: float = 0.5
    exclude_threshold: float = 0.05
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


def _current_versions() -> dict[str, Optional[str]]:
    try:
        import peft

        peft_version: Optional[str] = peft.__version__
    except ImportError:  # pragma: no cover - peft is a hard dependency, but keep the map writable
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
    def from_scores(
        cls,
        scores: Mapping[str, float],
        model: nn.Module,
        *,
        rank: int = 64,
        rank_min: int = 16,
        rank_max: int = 128,
        mode: Literal["median", "budget"] = "median",
        score_power: float = 0.5,
        exclude_threshold: float = 0.05,
        lora_alpha: Optional[float] = None,
        use_rslora: bool = False,
        score_stderr: Optional[Mapping[str, Optional[float]]] = None,
        analysis: Optional[AnalysisRecord] = None,
        dataset: Optional[DatasetRecord] = None,
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
            lora_alpha: alpha at the base rank; default ``2 * rank``.
            use_rslora: alpha policy, see :class:`AlphaPolicy`.
            score_stderr: standard error of each score, when known (``None`` entries allowed).
            analysis: how the scores were measured.
            dataset: the analysed dataset folder.

        Raises:
            ValueError: a name in ``scores`` is not a module of ``model``, or an allocation
                argument is invalid (the message names it).
        """
        named = dict(model.named_modules())
        unknown = [name for name in scores if name not in named]
        if unknown:
            raise ValueError(
                f"scores: {len(unknown)} name(s) are not modules of {type(model).__name__}, "
                f"e.g. {unknown[:3]}; use full names from model.named_modules()"
            )
        costs = {name: rank_cost(named[name]) for name in scores}
        ranks = allocate_ranks(
            scores,
            rank=rank,
            rank_min=rank_min,
            rank_max=rank_max,
            mode=mode,
            rank_costs=costs,
            score_power=score_power,
            exclude_threshold=exclude_threshold,
        )
        policy = AlphaPolicy(lora_alpha=float(2 * rank if lora_alpha is None else lora_alpha), use_rslora=use_rslora)
        if not (math.isfinite(policy.lora_alpha) and policy.lora_alpha > 0):
            raise ValueError(f"lora_alpha: must be a positive number, got {lora_alpha!r}")
        records = tuple(
            ModuleRecord(
                name=name,
                type=module_type_name(named[name]),
                shape=tuple(weight_shape(named[name])),
                rank_cost=costs[name],
                score=float(score),
                score_stderr=None if score_stderr is None or score_stderr[name] is None else float(score_stderr[name]),
                rank=ranks.get(name),
                alpha=None if name not in ranks else policy.alpha_for(ranks[name], rank),
            )
            for name, score in scores.items()
        )
        budget = RankBudget(
            rank=rank,
            rank_min=rank_min,
            rank_max=rank_max,
            mode=mode,
            score_power=float(score_power),
            exclude_threshold=float(exclude_threshold),
            lora_parameters=lora_parameters(ranks, costs),
            flat_lora_parameters=flat_lora_parameters(rank, costs),
        )
        model_record = ModelRecord(
            fingerprint=model_fingerprint(model),
            class_name=type(model).__name__,
            num_parameters=sum(p.numel() for p in model.parameters()),
        )
        return cls(records, budget, policy, model_record, analysis=analysis, dataset=dataset)

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
        return {m.name: m.rank for m in self.modules if m.rank is not None}

    @property
    def alphas(self) -> dict[str, float]:
        """``{module name: alpha}`` for the modules that get an adapter."""
        return {m.name: m.alpha for m in self.modules if m.alpha is not None}

    @property
    def excluded(self) -> list[str]:
        """Candidate modules that get no adapter."""
        return [m.name for m in self.modules if m.excluded]

    @property
    def rank_costs(self) -> dict[str, int]:
        """``{module name: adapter parameters per unit of rank}`` for every candidate."""
        return {m.name: m.rank_cost for m in self.modules}

    @property
    def target_modules(self) -> str:
        """PEFT ``target_modules``: a full-match regex selecting exactly the adapted modules."""
        return exact_target_regex(self.ranks)

    @property
    def rank_pattern(self) -> dict[str, int]:
        """PEFT ``rank_pattern`` with one exact key per adapted module."""
        return {exact_module_key(name): r for name, r in self.ranks.items()}

    @property
    def alpha_pattern(self) -> dict[str, float]:
        """PEFT ``alpha_pattern`` with one exact key per adapted module."""
        return {exact_module_key(name): a for name, a in self.alphas.items()}

    def summary(self) -> str:
        """One line: adapted modules, rank range and median, parameters versus flat LoRA."""
        ranks = sorted(self.ranks.values())
        median = ranks[len(ranks) // 2] if len(ranks) % 2 else 0.5 * (ranks[len(ranks) // 2 - 1] + ranks[len(ranks) // 2])
        ratio = self.budget.lora_parameters / max(1, self.budget.flat_lora_parameters)
        return (
            f"{len(ranks)}/{len(self.modules)} modules adapted, ranks {ranks[0]}-{ranks[-1]} "
            f"(median {median:g}), {self.budget.lora_parameters:,} LoRA parameters = "
            f"{ratio:.2f}x flat rank {self.budget.rank} ({self.budget.flat_lora_parameters:,})"
        )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The JSON document of this map (schema version :data:`SCHEMA_VERSION`)."""
        analysis = None
        if self.analysis is not None:
            analysis = dataclasses.asdict(self.analysis)
            focus = analysis["timestep_focus"]
            for key in ("range", "observed_range"):
                focus[key] = None if focus[key] is None else list(focus[key])
            if analysis["stability"] is not None:
                analysis["stability"]["history"] = list(analysis["stability"]["history"])
            if analysis["seconds"] is None:
                del analysis["seconds"]
        modules = []
        for m in self.modules:
            record = dataclasses.asdict(m)
            record["shape"] = list(m.shape)
            record["excluded"] = m.excluded
            modules.append(record)
        return {
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "versions": dict(self.versions),
            "model": dataclasses.asdict(self.model),
            "dataset": None if self.dataset is None else dataclasses.asdict(self.dataset),
            "budget": dataclasses.asdict(self.budget),
            "alpha": dataclasses.asdict(self.alpha),
            "analysis": analysis,
            "modules": modules,
            "target_modules": self.target_modules,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, path: Optional[PathLike] = None) -> "FisherMap":
        """Validate a JSON document and build the map.

        Raises:
            FisherMapVersionError: the document has a schema version this library cannot read.
            FisherMapSchemaError: the document violates the schema or contradicts itself; the
                message names the file (when given) and the JSON path of the field.
        """
        _validate_document(document, path)
        modules = tuple(
            ModuleRecord(
                name=m["name"],
                type=m["type"],
                shape=tuple(m["shape"]),
                rank_cost=m["rank_cost"],
                score=float(m["score"]),
                score_stderr=None if m["score_stderr"] is None else float(m["score_stderr"]),
                rank=m["rank"],
                alpha=None if m["alpha"] is None else float(m["alpha"]),
            )
            for m in document["modules"]
        )
        analysis = None
        if document["analysis"] is not None:
            raw = dict(document["analysis"])
            focus = raw["timestep_focus"]
            raw["timestep_focus"] = TimestepFocusRecord(
                name=focus["name"],
                range=None if focus["range"] is None else tuple(focus["range"]),
                applied=focus["applied"],
                observed_range=None if focus["observed_range"] is None else tuple(focus["observed_range"]),
            )
            stability = raw.get("stability")
            if stability is not None:
                stability = dict(stability)
                stability["history"] = tuple(stability.get("history", ()))
                raw["stability"] = StabilityRecord(**stability)
            analysis = AnalysisRecord(**raw)
        fisher_map = cls(
            modules=modules,
            budget=RankBudget(**document["budget"]),
            alpha=AlphaPolicy(**document["alpha"]),
            model=ModelRecord(**document["model"]),
            analysis=analysis,
            dataset=None if document["dataset"] is None else DatasetRecord(**document["dataset"]),
            versions=dict(document["versions"]),
            created=document["created"],
            path=None if path is None else Path(path),
        )
        _check_consistency(fisher_map, document, path)
        return fisher_map

    @classmethod
    def load(cls, path: PathLike) -> "FisherMap":
        """Read and validate a map file, or ``DIR/fisher_map.json`` when given a folder.

        Raises:
            FisherMapNotFoundError, FisherMapDecodeError, FisherMapVersionError,
            FisherMapSchemaError: all subclasses of :class:`~lightning_fisher.FisherMapError`,
            with the file in the message.
        """
        file = resolve_map_path(path)
        if not file.is_file():
            raise FisherMapNotFoundError(
                f"{file}: no fisher map here. Create one with `lightning-fisher analyze "
                f"--dataset-dir {file.parent}` or lightning_fisher.analyze(...)",
                path=file,
            )
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise FisherMapDecodeError(f"{file}: cannot be read ({error})", path=file) from error
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise FisherMapDecodeError(
                f"{file}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}). "
                "The file is truncated or was edited by hand; re-run the analysis to regenerate it",
                path=file,
            ) from error
        return cls.from_dict(document, path=file)

    def save(self, path: PathLike) -> Path:
        """Validate and write the map atomically; a folder gets ``fisher_map.json`` inside it.

        Returns:
            The file written.

        Raises:
            FisherMapWriteError: the destination cannot be written (any existing map there is
                left as it was).
        """
        file = resolve_map_path(path)
        document = self.to_dict()
        _validate_document(document, file)
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise FisherMapWriteError(f"{file}: cannot create folder {file.parent} ({error})", path=file) from error
        _atomic_write_text(file, text)
        return file

    def with_path(self, path: Optional[PathLike]) -> "FisherMap":
        """A copy of this map that remembers ``path`` as its file."""
        return dataclasses.replace(self, path=None if path is None else Path(path))


def resolve_map_path(path: PathLike) -> Path:
    """``path`` itself for a ``.json`` file name, else ``path / "fisher_map.json"``."""
    path = Path(path)
    if path.suffix.lower() == ".json" and not path.is_dir():
        return path
    return path / FISHER_MAP_FILENAME


def _atomic_write_text(file: Path, text: str) -> None:
    try:
        write_text_atomic(file, text)
    except OSError as error:
        raise FisherMapWriteError(f"{file}: cannot write the fisher map ({error})", path=file) from error


@lru_cache(maxsize=None)
def _schema(version: int) -> dict[str, Any]:
    text = resources.files("lightning_fisher").joinpath("schema", f"fisher_map.v{version}.json").read_text("utf-8")
    return json.loads(text)


def _where(path: Optional[PathLike]) -> str:
    return str(path) if path is not None else "fisher map"


def _validate_document(document: Any, path: Optional[PathLike]) -> None:
    where = _where(path)
    if not isinstance(document, Mapping):
        raise FisherMapSchemaError(f"{where}: $: expected a JSON object, got {type(document).__name__}", path=path)
    version = document.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version != SCHEMA_VERSION:
        newer = version > SCHEMA_VERSION
        raise FisherMapVersionError(
            f"{where}: $.schema_version is {version}, this lightning_fisher {__version__} reads version "
            f"{SCHEMA_VERSION}. "
            + ("Upgrade lightning-fisher to read it." if newer else "Re-run the analysis to regenerate the map."),
            path=path,
        )
    validator = jsonschema.Draft202012Validator(_schema(SCHEMA_VERSION))
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        raise FisherMapSchemaError(
            f"{where}: {error.json_path}: {error.message}", path=path, json_path=error.json_path
        )


def _check_consistency(fisher_map: FisherMap, document: Mapping[str, Any], path: Optional[PathLike]) -> None:
    """Checks the schema cannot express: unique names, ranks in bounds, derived fields agree."""
    where = _where(path)

    def fail(json_path: str, message: str) -> None:
        raise FisherMapSchemaError(f"{where}: {json_path}: {message}", path=path, json_path=json_path)

    budget = fisher_map.budget
    if budget.rank_min > budget.rank_max:
        fail("$.budget.rank_min", f"rank_min {budget.rank_min} is greater than rank_max {budget.rank_max}")
    seen: set[str] = set()
    for index, module in enumerate(fisher_map.modules):
        if module.name in seen:
            fail(f"$.modules[{index}].name", f"duplicate module name {module.name!r}")
        seen.add(module.name)
        if module.rank is None:
            continue
        if not budget.rank_min <= module.rank <= budget.rank_max:
            fail(
                f"$.modules[{index}].rank",
                f"rank {module.rank} of {module.name!r} is outside [rank_min, rank_max] = "
                f"[{budget.rank_min}, {budget.rank_max}]",
            )
        expected_alpha = fisher_map.alpha.alpha_for(module.rank, budget.rank)
        if not math.isclose(module.alpha, expected_alpha, rel_tol=1e-9):
            fail(
                f"$.modules[{index}].alpha",
                f"alpha {module.alpha} of {module.name!r} does not follow the alpha policy in $.alpha "
                f"(expected {expected_alpha:g})",
            )
    if not fisher_map.ranks:
        fail("$.modules", "every module is excluded; a map must adapt at least one module")
    hint = "does not agree with the module records; regenerate the map, or edit the records and this field together"
    if document["target_modules"] != fisher_map.target_modules:
        fail("$.target_modules", hint)
    for key in ("rank_pattern", "alpha_pattern"):
        expected = getattr(fisher_map, key)
        actual = document[key]
        if set(actual) != set(expected) or any(not math.isclose(actual[k], expected[k], rel_tol=1e-9) for k in actual):
            wrong = sorted(k for k in set(actual) ^ set(expected)) or sorted(
                k for k in actual if not math.isclose(actual[k], expected[k], rel_tol=1e-9)
            )
            fail(f"$.{key}", f"{hint} (keys {wrong[:3]})")
    lora = lora_parameters(fisher_map.ranks, fisher_map.rank_costs)
    if lora != budget.lora_parameters:
        fail("$.budget.lora_parameters", f"is {budget.lora_parameters} but the module ranks give {lora}")
