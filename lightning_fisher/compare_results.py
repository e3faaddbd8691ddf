"""The results of a comparison: one record per run, the table, and the verdict against seed noise.

Pure data and arithmetic (no Lightning): :class:`CompareResult` can be rebuilt from saved numbers
and summarised again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lightning_fisher.atomic_io import write_text_atomic
from lightning_fisher.compare_plan import CompareArm
from lightning_fisher.errors import CompareError

__all__ = ["MONITOR", "CompareResult", "RunResult"]

#: The validation metric the arms are ranked by (lower is better).
MONITOR = "val_loss"


@dataclass(frozen=True)
class RunResult:
    """One fit of one arm with one seed, and its final validation.

    Attributes:
        arm: the arm's name.
        seed: the seed the run started from.
        lora_parameters: trainable adapter parameters counted in the model after injection.
        adapted_modules: modules that got an adapter.
        val_loss: final validation loss.
        metrics: every ``val_*`` metric of the final validation, ``val_loss`` included.
        seconds: wall time of the fit and the validation.
        steps: optimizer steps taken.
    """

    arm: str
    seed: int
    lora_parameters: int
    adapted_modules: int
    val_loss: float
    metrics: Mapping[str, float]
    seconds: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["metrics"] = dict(self.metrics)
        return record


def _mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class CompareResult:
    """The runs of a comparison; :meth:`to_markdown` and :meth:`verdicts` summarise them.

    Attributes:
        arms: the planned arms, ``flat`` first.
        seeds: the seeds every arm runs with.
        runs: finished runs, in the order they ran.
        fisher_map_path: the map file compared, when it came from one.
        notes: what compare changed in your setup to run (validation data, checkpoints, ...).
    """

    arms: list[CompareArm]
    seeds: list[int]
    runs: list[RunResult] = field(default_factory=list)
    fisher_map_path: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def runs_of(self, arm: str) -> list[RunResult]:
        return [run for run in self.runs if run.arm == arm]

    @property
    def metric_names(self) -> list[str]:
        """Logged validation metrics besides ``val_loss``, sorted."""
        return sorted({name for run in self.runs for name in run.metrics} - {MONITOR})

    def _flat_parameters(self) -> Optional[float]:
        flat = self.runs_of("flat")
        return statistics.fmean(run.lora_parameters for run in flat) if flat else None

    def to_markdown(self) -> str:
        """One row per arm: adapters, parameters and ratio to flat, val metrics mean ± std over seeds, time per run."""
        metrics = self.metric_names
        header = ["arm", "rank", "modules", "LoRA params", "vs flat", f"{MONITOR} (mean ± std)"]
        header += [f"{name} (mean ± std)" for name in metrics] + ["s / run", "runs"]
        rows = []
        flat_parameters = self._flat_parameters()
        for arm in self.arms:
            runs = self.runs_of(arm.name)
            if not runs:
                rows.append([arm.name, str(arm.rank), str(len(arm.modules)), f"{arm.expected_parameters:,}", "-", "-"]
                            + ["-"] * len(metrics) + ["-", "0"])
                continue
            parameters = runs[0].lora_parameters
            ratio = "-" if not flat_parameters else f"{parameters / flat_parameters:.2f}x"
            cells = [arm.name, str(arm.rank), str(runs[0].adapted_modules), f"{parameters:,}", ratio,
                     _format_stat([run.val_loss for run in runs])]
            for name in metrics:
                cells.append(_format_stat([run.metrics[name] for run in runs if name in run.metrics]))
            cells += [f"{statistics.fmean(run.seconds for run in runs):.1f}", str(len(runs))]
            rows.append(cells)
        widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
        return "\n".join(lines)

    def verdicts(self) -> list[str]:
        """One line per non-flat arm: its ``val_loss`` minus flat's, paired by seed, against seed noise.

        The difference counts as real when it exceeds two standard errors of the per-seed paired
        differences ("seed spread"); with a single seed there is no noise estimate.
        """
        flat = {run.seed: run for run in self.runs_of("flat")}
        lines = []
        for arm in self.arms:
            if arm.is_flat:
                continue
            runs = [run for run in self.runs_of(arm.name) if run.seed in flat]
            if not runs:
                continue
            differences = [run.val_loss - flat[run.seed].val_loss for run in runs]
            delta = statistics.fmean(differences)
            ratio = statistics.fmean(run.lora_parameters / max(1, flat[run.seed].lora_parameters) for run in runs)
            head = f"{arm.name} vs flat: {MONITOR} {delta:+.4f} at {ratio:.2f}x the parameters"
            if len(differences) < 2:
                lines.append(f"{head}; one seed, so no noise estimate (run more seeds, e.g. --seeds 0,1,2)")
                continue
            spread = 2 * statistics.stdev(differences) / math.sqrt(len(differences))
            if abs(delta) <= spread:
                word = "within noise"
            else:
                word = f"{arm.name} better" if delta < 0 else "flat better"
            lines.append(f"{head}, seed spread {spread:.4f} over {len(differences)} seeds: {word}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "fisher_map": self.fisher_map_path,
            "monitor": MONITOR,
            "seeds": list(self.seeds),
            "arms": [arm.to_dict() for arm in self.arms],
            "runs": [run.to_dict() for run in self.runs],
            "verdicts": self.verdicts(),
            "notes": list(self.notes),
        }

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (a failed write leaves any previous file as it was)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        try:
            write_text_atomic(path, text, make_parents=True)
        except OSError as error:
            raise CompareError(f"output: cannot write {path} ({error})") from error
        return path

    def __str__(self) -> str:
        return "\n".join([self.to_markdown(), "", *self.verdicts()])


def _format_stat(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"
