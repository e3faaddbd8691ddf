"""The results file: every finished run and baseline, rewritten atomically after each addition."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from lightning_fisher.data.atomic_io import write_text_atomic
from lightning_fisher.fisher_map.records import STOPPING_METHODS

from quality_bench.protocol import TaskSpec


#: What a re-measured run keeps of the run it replaces, to show whether it reproduced it.
PREVIOUS_FIELDS = ("val_loss", "test_loss", "val_acc", "test_acc", "lora_parameters", "map_lora_parameters", "finished", "ranks",
                   "analysis_batches", "analysis_stop", "analysis_stop_method")


def run_key(record: dict[str, Any]) -> tuple:
    """Identity of a run: (task, arm, lr, seed, focus)."""
    return (record["task"], record["arm"], float(record["lr"]), int(record["seed"]), record.get("focus") or "")


class ResultStore:
    """The JSON results file: runs and baselines, rewritten atomically after every addition."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"runs": [], "baselines": {}, "protocols": {}, "invocations": []}
        if path.is_file():
            self.data.update(json.loads(path.read_text(encoding="utf-8")))
        self._keys = {run_key(r) for r in self.data["runs"]}

    def check_protocol(self, task: TaskSpec) -> None:
        """Refuse to mix runs made under different settings in one file."""
        stored = self.data["protocols"].get(task.name)
        current = task.protocol()
        if stored is not None and stored != current:
            raise SystemExit(
                f"{self.path}: its {task.name} runs were made with {stored}, this invocation uses {current}. "
                "Move the file away (or pass --results OTHER.json) to start afresh."
            )
        self.data["protocols"][task.name] = current

    def has(self, key: tuple) -> bool:
        return key in self._keys

    def add_run(self, record: dict[str, Any]) -> None:
        """Store a finished run; a run with the same key (re-measured) is replaced, its numbers kept under ``previous``."""
        key = run_key(record)
        if key in self._keys:
            index = next(i for i, r in enumerate(self.data["runs"]) if run_key(r) == key)
            old = self.data["runs"][index]
            record = {**record, "previous": {k: old[k] for k in PREVIOUS_FIELDS if k in old}}
            self.data["runs"][index] = record
        else:
            self.data["runs"].append(record)
            self._keys.add(key)
        self.save()

    def lacks(self, key: tuple, fields: tuple[str, ...]) -> bool:
        """The stored run ``key`` was made before ``fields`` were measured (a measured value may be ``None``)."""
        return any(run_key(r) == key and not all(f in r for f in fields) for r in self.data["runs"])

    def allocated_otherwise(self, key: tuple, current: dict[str, Any]) -> bool:
        """The stored Fisher run ``key`` trained a map other than the one this version allocates.

        ``current``: what a run records of its map (:func:`quality_bench.runs.allocation_facts`):
        the rank summary, the map's LoRA parameters and, for runs recorded since, every rank. A
        stored run is compared on the fields it has (older runs lack ``map_ranks``).
        """
        return any(run_key(r) == key and any(field in r and r[field] != value for field, value in current.items())
                   for r in self.data["runs"])

    def stopped_by_another_rule(self, key: tuple, method: str) -> bool:
        """The stored Fisher run ``key`` used a map whose analysis stopped by another rule than ``method``.

        Runs recorded before the method was (``analysis_stop_method`` absent) used the trace
        ranking's split-half rule, the only one there was.
        """
        return any(run_key(r) == key and r.get("analysis_stop_method", STOPPING_METHODS["trace"]) != method
                   for r in self.data["runs"])

    def set_baseline(self, task: str, name: str, value: Any) -> None:
        self.data["baselines"].setdefault(task, {})[name] = value
        self.save()

    def baseline(self, task: str, name: str) -> Any:
        return self.data["baselines"].get(task, {}).get(name)

    def runs(self, task: str) -> list[dict[str, Any]]:
        return [r for r in self.data["runs"] if r["task"] == task]

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1, allow_nan=False) + "\n", make_parents=True)


def finite_or_none(value: Any) -> Optional[float]:
    """JSON has no NaN: a diverged run's metric is stored as ``null``."""
    value = float(value)
    return value if math.isfinite(value) else None
