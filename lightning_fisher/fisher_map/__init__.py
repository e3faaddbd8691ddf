"""``fisher_map.json``: the map object, its records, the file, and the map in words.

* ``map``: :class:`FisherMap`, built from scores or read from a file, with read access and the
  PEFT keys derived from its records;
* ``records``: the frozen records the map is made of, field for field the file's objects;
* ``codec``: the file (name rule, JSON document, schema, consistency checks, atomic write);
* ``patterns``: PEFT keys that select exactly one module each;
* ``summary``: every printed summary of a map;
* ``backup``: replacing a map without losing the previous one (``.bak``).
"""

from lightning_fisher.fisher_map.map import (
    FISHER_MAP_FILENAME,
    SCHEMA_VERSION,
    AlphaPolicy,
    AnalysisRecord,
    DatasetRecord,
    FisherMap,
    ModelRecord,
    ModuleRecord,
    RankBudget,
    StabilityRecord,
    TimestepFocusRecord,
    resolve_map_path,
)

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
