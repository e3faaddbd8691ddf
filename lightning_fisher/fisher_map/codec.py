"""Reading and writing ``fisher_map.json``: the file name rule, the JSON document, the schema
and the checks the schema cannot express.

Documents are validated against the versioned JSON Schema shipped in
``lightning_fisher/schema/fisher_map.v<N>.json`` on write and on read, and written atomically:
a crash or error while saving leaves any previous map untouched and no temporary file behind.
Every error names the file and, for a bad field, its JSON path (``$.modules[3].rank``).

The functions here turn records (:mod:`lightning_fisher.fisher_map.records`) into a document and
back; :class:`~lightning_fisher.FisherMap` calls them from ``to_dict`` / ``from_dict`` /
``load`` / ``save``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import jsonschema

from lightning_fisher._version import __version__
from lightning_fisher.allocation.trace_rule import lora_parameters
from lightning_fisher.data.atomic_io import write_text_atomic
from lightning_fisher.errors import (
    FisherMapDecodeError,
    FisherMapNotFoundError,
    FisherMapSchemaError,
    FisherMapVersionError,
    FisherMapWriteError,
    SettingsError,
)
import lightning_fisher.fisher_map.records as records
from lightning_fisher.fisher_map.patterns import exact_module_key, peft_patterns

__all__ = [
    "FISHER_MAP_FILENAME",
    "SCHEMA_VERSION",
    "check_consistency",
    "document_of",
    "read_document",
    "records_of",
    "resolve_map_path",
    "validate_document",
    "write_document",
]

FISHER_MAP_FILENAME = "fisher_map.json"
SCHEMA_VERSION = 2
#: Maps of schema version 1 predate the criterion field: every one was allocated by the trace rule.
V1_CRITERION = "trace"
#: Versions this library reads. Version 1 maps (no criterion, no spectra) read as ``trace`` maps.
READABLE_VERSIONS = (1, 2)
_V1_EXCLUSION = "excluded by the trace allocation (the map predates recorded reasons)"

PathLike = Union[str, os.PathLike]


def resolve_map_path(path: PathLike) -> Path:
    """``path`` itself for a ``.json`` file name, else ``path / "fisher_map.json"``."""
    path = Path(path)
    if path.suffix.lower() == ".json" and not path.is_dir():
        return path
    return path / FISHER_MAP_FILENAME


# ---------------------------------------------------------------------------- records <-> JSON
def document_of(fisher_map: records.MapContent) -> dict[str, Any]:
    """The JSON document of a map (schema version :data:`SCHEMA_VERSION`)."""
    analysis = None
    if fisher_map.analysis is not None:
        analysis = dataclasses.asdict(fisher_map.analysis)
        focus = analysis["timestep_focus"]
        for key in ("range", "observed_range"):
            focus[key] = None if focus[key] is None else list(focus[key])
        if analysis["stability"] is not None:
            analysis["stability"]["history"] = list(analysis["stability"]["history"])
        if analysis["seconds"] is None:
            del analysis["seconds"]
    modules = []
    for m in fisher_map.modules:
        record = dataclasses.asdict(m)
        record["shape"] = list(m.shape)
        record["sigma_sq"] = None if m.sigma_sq is None else list(m.sigma_sq)
        record["excluded"] = m.excluded
        modules.append(record)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": fisher_map.created,
        "versions": dict(fisher_map.versions),
        "model": dataclasses.asdict(fisher_map.model),
        "dataset": None if fisher_map.dataset is None else dataclasses.asdict(fisher_map.dataset),
        "budget": dataclasses.asdict(fisher_map.budget),
        "alpha": dataclasses.asdict(fisher_map.alpha),
        "analysis": analysis,
        "modules": modules,
        **peft_patterns(records.ranks_of(fisher_map.modules), records.alphas_of(fisher_map.modules)),
    }


def records_of(document: Mapping[str, Any], path: Optional[PathLike] = None) -> dict[str, Any]:
    """The keyword arguments of ``FisherMap(...)`` from a document that passed the schema.

    Raises:
        FisherMapSchemaError: a budget setting is out of range (``$.budget.<field>``).
    """
    modules = tuple(
        records.ModuleRecord(
            name=m["name"],
            type=m["type"],
            shape=tuple(m["shape"]),
            rank_cost=m["rank_cost"],
            score=float(m["score"]),
            score_stderr=None if m["score_stderr"] is None else float(m["score_stderr"]),
            rank=m["rank"],
            alpha=None if m["alpha"] is None else float(m["alpha"]),
            sigma_sq=None if m.get("sigma_sq") is None else tuple(float(v) for v in m["sigma_sq"]),
            noise_floor=None if m.get("noise_floor") is None else float(m["noise_floor"]),
            exclusion_reason=m.get("exclusion_reason", _V1_EXCLUSION if m["rank"] is None else None),
        )
        for m in document["modules"]
    )
    analysis = None
    if document["analysis"] is not None:
        raw = dict(document["analysis"])
        focus = raw["timestep_focus"]
        raw["timestep_focus"] = records.TimestepFocusRecord(
            name=focus["name"],
            range=None if focus["range"] is None else tuple(focus["range"]),
            applied=focus["applied"],
            observed_range=None if focus["observed_range"] is None else tuple(focus["observed_range"]),
        )
        stability = raw.get("stability")
        if stability is not None:
            stability = dict(stability)
            stability["history"] = tuple(stability.get("history", ()))
            raw["stability"] = records.StabilityRecord(**stability)
        analysis = records.AnalysisRecord(**raw)
    try:
        budget = records.RankBudget(**{"criterion": V1_CRITERION, **document["budget"]})
    except SettingsError as error:
        json_path = f"$.budget.{error.field}"
        raise FisherMapSchemaError(f"{_where(path)}: {json_path}: {error}", path=path, json_path=json_path) from None
    return dict(
        modules=modules,
        budget=budget,
        alpha=records.AlphaPolicy(**document["alpha"]),
        model=records.ModelRecord(**document["model"]),
        analysis=analysis,
        dataset=None if document["dataset"] is None else records.DatasetRecord(**document["dataset"]),
        versions=dict(document["versions"]),
        created=document["created"],
        path=None if path is None else Path(path),
    )


# ---------------------------------------------------------------------------- files
def read_document(path: PathLike) -> tuple[Path, Any]:
    """Read a map file (or ``DIR/fisher_map.json``) as JSON, without validating it.

    Returns:
        ``(file, document)``.

    Raises:
        FisherMapNotFoundError, FisherMapDecodeError: naming the file.
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
        return file, json.loads(text)
    except json.JSONDecodeError as error:
        raise FisherMapDecodeError(
            f"{file}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}). "
            "The file is truncated or was edited by hand; re-run the analysis to regenerate it",
            path=file,
        ) from error


def write_document(document: Mapping[str, Any], path: PathLike) -> Path:
    """Validate ``document`` and write it atomically to ``path`` (a folder gets ``fisher_map.json``).

    Raises:
        FisherMapSchemaError: the document is not a valid map (nothing is written).
        FisherMapWriteError: the destination cannot be written (a map already there is kept).
    """
    file = resolve_map_path(path)
    validate_document(document, file)
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FisherMapWriteError(f"{file}: cannot create folder {file.parent} ({error})", path=file) from error
    try:
        write_text_atomic(file, text)
    except OSError as error:
        raise FisherMapWriteError(f"{file}: cannot write the fisher map ({error})", path=file) from error
    return file


# ---------------------------------------------------------------------------- checks
def _recorded_rank(document: Mapping[str, Any], name: str) -> Optional[int]:
    """The rank ``$.rank_pattern`` records for module ``name``, if it is a number there."""
    pattern = document.get("rank_pattern")
    value = pattern.get(exact_module_key(name)) if isinstance(pattern, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@lru_cache(maxsize=None)
def _schema(version: int) -> dict[str, Any]:
    text = resources.files("lightning_fisher").joinpath("schema", f"fisher_map.v{version}.json").read_text("utf-8")
    return json.loads(text)


def _where(path: Optional[PathLike]) -> str:
    return str(path) if path is not None else "fisher map"


def validate_document(document: Any, path: Optional[PathLike]) -> None:
    """Check the schema version and validate against the schema.

    Raises:
        FisherMapVersionError: a schema version this library cannot read.
        FisherMapSchemaError: naming the file and the JSON path of the first bad field.
    """
    where = _where(path)
    if not isinstance(document, Mapping):
        raise FisherMapSchemaError(f"{where}: $: expected a JSON object, got {type(document).__name__}", path=path)
    version = document.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version not in READABLE_VERSIONS:
        newer = version > SCHEMA_VERSION
        raise FisherMapVersionError(
            f"{where}: $.schema_version is {version}, this lightning_fisher {__version__} reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. "
            + ("Upgrade lightning-fisher to read it." if newer else "Re-run the analysis to regenerate the map."),
            path=path,
        )
    readable = isinstance(version, int) and not isinstance(version, bool) and version in READABLE_VERSIONS
    validator = jsonschema.Draft202012Validator(_schema(version if readable else SCHEMA_VERSION))
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        raise FisherMapSchemaError(
            f"{where}: {error.json_path}: {error.message}", path=path, json_path=error.json_path
        )


def check_consistency(fisher_map: records.MapContent, document: Mapping[str, Any], path: Optional[PathLike]) -> None:
    """Checks the schema cannot express: unique names, ranks in bounds, derived fields agree.

    Raises:
        FisherMapSchemaError: naming the file and the JSON path of the contradiction.
    """
    where = _where(path)

    def fail(json_path: str, message: str) -> None:
        raise FisherMapSchemaError(f"{where}: {json_path}: {message}", path=path, json_path=json_path)

    budget = fisher_map.budget
    seen: set[str] = set()
    oversized: list[str] = []
    for index, module in enumerate(fisher_map.modules):
        if module.name in seen:
            fail(f"$.modules[{index}].name", f"duplicate module name {module.name!r}")
        seen.add(module.name)
        if module.rank is None:
            continue
        # A module narrower than the bounds is cut to its size, min(d_in, d_out); a rank above the
        # size but within the bounds is a map from before that rule: it loads, with a warning below.
        low, high = min(budget.rank_min, module.rank_limit), budget.rank_max
        if module.rank_limit < module.rank <= high:
            oversized.append(f"{module.name} {module.rank} > {module.rank_limit}")
        if not low <= module.rank <= high:
            limit = f"; the module's size min(d_in, d_out) is {module.rank_limit}" if module.rank_limit < budget.rank_max else ""
            fail(
                f"$.modules[{index}].rank",
                f"rank {module.rank} of {module.name!r} is outside [rank_min, rank_max] = "
                f"[{budget.rank_min}, {budget.rank_max}]{limit}",
            )
        expected_alpha = fisher_map.alpha.alpha_for(module.rank, budget.rank)
        recorded = _recorded_rank(document, module.name)
        if (
            recorded is not None
            and recorded != module.rank
            and math.isclose(module.alpha, fisher_map.alpha.alpha_for(recorded, budget.rank), rel_tol=1e-9)
        ):
            # The alpha and $.rank_pattern both still give the old rank: the rank is what changed.
            fail(
                f"$.modules[{index}].rank",
                f"rank {module.rank} of {module.name!r} was changed alone: its alpha {module.alpha:g} and "
                f"$.rank_pattern still give rank {recorded}. Change a rank with `lightning-fisher reallocate` "
                "(or edit the rank, alpha, rank_pattern, alpha_pattern and budget.lora_parameters together)",
            )
        if not math.isclose(module.alpha, expected_alpha, rel_tol=1e-9):
            fail(
                f"$.modules[{index}].alpha",
                f"alpha {module.alpha} of {module.name!r} does not follow the alpha policy in $.alpha "
                f"(expected {expected_alpha:g})",
            )
    ranks = records.ranks_of(fisher_map.modules)
    if not ranks:
        fail("$.modules", "every module is excluded; a map must adapt at least one module")
    hint = "does not agree with the module records; regenerate the map, or edit the records and this field together"
    derived = peft_patterns(ranks, records.alphas_of(fisher_map.modules))
    if document["target_modules"] != derived["target_modules"]:
        fail("$.target_modules", hint)
    for key in ("rank_pattern", "alpha_pattern"):
        expected = derived[key]
        actual = document[key]
        if set(actual) != set(expected) or any(not math.isclose(actual[k], expected[k], rel_tol=1e-9) for k in actual):
            wrong = sorted(k for k in set(actual) ^ set(expected)) or sorted(
                k for k in actual if not math.isclose(actual[k], expected[k], rel_tol=1e-9)
            )
            fail(f"$.{key}", f"{hint} (keys {wrong[:3]})")
    lora = lora_parameters(ranks, records.rank_costs_of(fisher_map.modules))
    if lora != budget.lora_parameters:
        fail("$.budget.lora_parameters", f"is {budget.lora_parameters} but the module ranks give {lora}")
    if oversized:
        warnings.warn(
            f"{where}: {len(oversized)} module(s) with a rank above their size min(d_in, d_out) "
            f"({', '.join(oversized[:5])}{', ...' if len(oversized) > 5 else ''}): a map written before ranks were "
            "capped at a module's size. It applies as written (the rank above the size adds parameters, not "
            "capacity); `lightning-fisher reallocate` on it writes the capped ranks",
            UserWarning,
            stacklevel=2,
        )
