"""The results of a comparison: one record per run, the table, and the verdict against seed noise.

Pure data and arithmetic (no Lightning): :class:`CompareResult` can be rebuilt from saved numbers
and summarised again. With several learning rates every arm gets its own, chosen on validation by
:func:`choose_learning_rate` (the quality benchmark chooses its arms' learning rates with the same
function), and the arms are compared at their own best learning rate and at equal ones.
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

__all__ = ["LR_TIE_TOLERANCE", "MONITOR", "TIE_BREAKER", "CompareResult", "RunResult", "choose_learning_rate"]

#: The validation metric the arms are ranked by (lower is better).
MONITOR = "val_loss"
#: Breaks ties of :data:`MONITOR` between learning rates when every run logs it (higher is better).
TIE_BREAKER = "val_acc"
#: Mean validation losses closer than this count as a tie when a learning rate is chosen.
LR_TIE_TOLERANCE = 1e-4


def _mean_or_inf(values: Sequence[Optional[float]]) -> float:
    """Mean in which a diverged value (``None``, NaN, infinite) counts as infinitely bad."""
    values = [math.inf if v is None or not math.isfinite(v) else v for v in values]
    return sum(values) / len(values) if values else math.nan


def choose_learning_rate(
    val_losses: Mapping[float, Mapping[int, Optional[float]]],
    *,
    tie_scores: Optional[Mapping[float, Mapping[int, Optional[float]]]] = None,
    tolerance: float = LR_TIE_TOLERANCE,
) -> float:
    """The learning rate with the lowest mean validation loss over seeds.

    The rule of ``lightning-fisher compare --lrs`` and of the quality benchmark
    (``benchmarks/quality_bench``):

    - the means are taken over the seeds that every learning rate has, so no learning rate is
      favoured by having run on easier seeds (a sweep on one seed whose winner then ran more
      seeds is compared on that one seed);
    - a diverged run (loss ``None``, NaN or infinite) counts as infinitely bad, so a learning
      rate with a diverged seed loses to any that did not diverge;
    - the learning rates are visited from the lowest up, and one replaces the best so far only
      when its mean is lower by more than ``tolerance``, or within ``tolerance`` with a higher
      mean ``tie_scores`` (e.g. validation accuracy; a missing score counts as 0); so a tie
      without a better tie score goes to the lower learning rate, and if every learning rate
      diverged the lowest is returned.

    Args:
        val_losses: ``{learning rate: {seed: validation loss}}``.
        tie_scores: ``{learning rate: {seed: score}}``, higher is better; optional.
        tolerance: mean losses closer than this are a tie.

    Returns:
        The chosen learning rate (a key of ``val_losses``).

    Raises:
        CompareError: ``val_losses`` is empty.
    """
    if not val_losses:
        raise CompareError("choose_learning_rate: no learning rates to choose from")
    shared = set.intersection(*(set(runs) for runs in val_losses.values()))

    def score(lr: float) -> tuple[float, float]:
        seeds = sorted(shared)
        ties = (tie_scores or {}).get(lr, {})
        loss = _mean_or_inf([val_losses[lr][seed] for seed in seeds])
        tie = sum(ties.get(seed) or 0.0 for seed in seeds) / len(seeds) if seeds else 0.0
        return loss, tie

    best = None
    for lr in sorted(val_losses):
        if best is None:
            best = lr
            continue
        (loss, tie), (best_loss, best_tie) = score(lr), score(best)
        if loss < best_loss - tolerance or (abs(loss - best_loss) <= tolerance and tie > best_tie):
            best = lr
    return best


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
        lr: the learning rate the run was built with (``None``: the config's own, no ``lrs`` given).
    """

    arm: str
    seed: int
    lora_parameters: int
    adapted_modules: int
    val_loss: float
    metrics: Mapping[str, float]
    seconds: float
    steps: int
    lr: Optional[float] = None

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
        lrs: the learning rates every arm ran at, each with every seed; ``None``: one run per
            arm and seed at the config's learning rate.
    """

    arms: list[CompareArm]
    seeds: list[int]
    runs: list[RunResult] = field(default_factory=list)
    fisher_map_path: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    lrs: Optional[list[float]] = None

    def runs_of(self, arm: str, lr: Optional[float] = None) -> list[RunResult]:
        """The arm's runs; with ``lr``, only those at that learning rate."""
        return [run for run in self.runs if run.arm == arm and (lr is None or run.lr == lr)]

    @property
    def metric_names(self) -> list[str]:
        """Logged validation metrics besides ``val_loss``, sorted."""
        return sorted({name for run in self.runs for name in run.metrics} - {MONITOR})

    def chosen_lrs(self) -> dict[str, float]:
        """``{arm: learning rate}`` chosen on validation by :func:`choose_learning_rate`; empty without ``lrs``.

        Ties of the mean ``val_loss`` go to the higher mean ``val_acc`` when every run of the arm
        logs it (as in the quality benchmark), otherwise to the lower learning rate.
        """
        if not self.lrs:
            return {}
        chosen = {}
        for arm in self.arms:
            runs = [run for run in self.runs_of(arm.name) if run.lr is not None]
            if not runs:
                continue
            losses: dict[float, dict[int, float]] = {}
            for run in runs:
                losses.setdefault(run.lr, {})[run.seed] = run.val_loss
            ties = None
            if all(TIE_BREAKER in run.metrics for run in runs):
                ties = {lr: {run.seed: run.metrics[TIE_BREAKER] for run in runs if run.lr == lr} for lr in losses}
            chosen[arm.name] = choose_learning_rate(losses, tie_scores=ties)
        return chosen

    def _flat_parameters(self) -> Optional[float]:
        flat = self.runs_of("flat")
        return statistics.fmean(run.lora_parameters for run in flat) if flat else None

    def to_markdown(self) -> str:
        """One row per arm: adapters, parameters and ratio to flat, val metrics mean ± std over seeds, time per run.

        With ``lrs``: that table at each arm's chosen learning rate (with a ``chosen lr`` column),
        then ``val_loss`` (mean ± std over seeds) of every arm at every learning rate.
        """
        if not self.lrs:
            return self._arm_table({arm.name: self.runs_of(arm.name) for arm in self.arms})
        chosen = self.chosen_lrs()
        at_best = self._arm_table({arm.name: self.runs_of(arm.name, chosen.get(arm.name)) if arm.name in chosen else []
                                   for arm in self.arms}, chosen)
        header = ["arm"] + [f"{MONITOR} at lr {lr:g}" for lr in self.lrs]
        rows = [[arm.name] + [_format_stat([run.val_loss for run in self.runs_of(arm.name, lr)]) for lr in self.lrs]
                for arm in self.arms]
        return "\n".join([f"At each arm's own best learning rate (chosen on {MONITOR}, mean over seeds):", "", at_best,
                          "", "At equal learning rates:", "", _markdown_table(header, rows)])

    def _arm_table(self, runs_by_arm: Mapping[str, list[RunResult]], chosen: Optional[Mapping[str, float]] = None) -> str:
        metrics = self.metric_names
        header = ["arm", "rank", "modules", "LoRA params", "vs flat"] + (["chosen lr"] if chosen is not None else [])
        header += [f"{MONITOR} (mean ± std)"] + [f"{name} (mean ± std)" for name in metrics] + ["s / run", "runs"]
        rows = []
        flat_parameters = self._flat_parameters()
        for arm in self.arms:
            runs = runs_by_arm[arm.name]
            lr_cell = [f"{chosen[arm.name]:g}" if arm.name in chosen else "-"] if chosen is not None else []
            if not runs:
                rows.append([arm.name, str(arm.rank), str(len(arm.modules)), f"{arm.expected_parameters:,}", "-"]
                            + lr_cell + ["-"] + ["-"] * len(metrics) + ["-", "0"])
                continue
            parameters = runs[0].lora_parameters
            ratio = "-" if not flat_parameters else f"{parameters / flat_parameters:.2f}x"
            cells = [arm.name, str(arm.rank), str(runs[0].adapted_modules), f"{parameters:,}", ratio] + lr_cell
            cells.append(_format_stat([run.val_loss for run in runs]))
            for name in metrics:
                cells.append(_format_stat([run.metrics[name] for run in runs if name in run.metrics]))
            cells += [f"{statistics.fmean(run.seconds for run in runs):.1f}", str(len(runs))]
            rows.append(cells)
        return _markdown_table(header, rows)

    def verdicts(self) -> list[str]:
        """Plain-words comparisons of the arms against seed noise.

        Without ``lrs``: one line per non-flat arm, its ``val_loss`` minus flat's, paired by
        seed; the difference counts as real when it exceeds two standard errors of the per-seed
        paired differences ("seed spread"); with a single seed there is no noise estimate.

        With ``lrs``: first which arm won at its own best learning rate, and against every other
        arm (each at its own best learning rate) whether by more than the seed spread, here the
        larger sample standard deviation over seeds of the two arms' ``val_loss`` (the quality
        benchmark's rule); then the paired lines above at every learning rate.
        """
        if not self.lrs:
            return self._paired_verdicts(None)
        lines = self._best_lr_verdicts()
        for lr in self.lrs:
            lines += [f"at lr {lr:g}, {line}" for line in self._paired_verdicts(lr)]
        return lines

    def _paired_verdicts(self, lr: Optional[float]) -> list[str]:
        flat = {run.seed: run for run in self.runs_of("flat", lr)}
        lines = []
        for arm in self.arms:
            if arm.is_flat:
                continue
            runs = [run for run in self.runs_of(arm.name, lr) if run.seed in flat]
            if not runs:
                continue
            differences = [run.val_loss - flat[run.seed].val_loss for run in runs]
            if not all(math.isfinite(difference) for difference in differences):
                lines.append(f"{arm.name} vs flat: not comparable, a run diverged ({MONITOR} not finite)")
                continue
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

    def _best_lr_verdicts(self) -> list[str]:
        chosen = self.chosen_lrs()
        if not chosen:
            return []
        summary = {}
        for name, lr in chosen.items():
            losses = [run.val_loss for run in self.runs_of(name, lr)]
            finite = all(math.isfinite(value) for value in losses)
            summary[name] = (_mean_or_inf(losses), statistics.stdev(losses) if finite and len(losses) > 1 else None, lr)
        ranked = sorted(summary, key=lambda name: summary[name][0])
        winner = ranked[0]

        def describe(name: str) -> str:
            mean, std, lr = summary[name]
            value = "diverged" if not math.isfinite(mean) else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")
            return f"{name} ({MONITOR} {value} at lr {lr:g})"

        if not math.isfinite(summary[winner][0]):
            return [f"at each arm's own best learning rate: every arm diverged ({', '.join(map(describe, ranked))})"]
        lines = [f"at each arm's own best learning rate: {describe(winner)} is best"]
        for other in ranked[1:]:
            (mean, std, _), (other_mean, other_std, _) = summary[winner], summary[other]
            head = f"  {winner} vs {describe(other)}"
            if not math.isfinite(other_mean):
                lines.append(f"{head}: {other} diverged at every learning rate")
            elif std is None or other_std is None:
                lines.append(f"{head}: {mean - other_mean:+.4f}; one seed, so no seed spread to judge by "
                             "(run more seeds, e.g. --seeds 0,1,2)")
            else:
                spread = max(std, other_std)
                beyond = other_mean - mean > spread
                lines.append(f"{head}: {mean - other_mean:+.4f}, "
                             + (f"more than the seed spread {spread:.4f} (sample std): {winner} better" if beyond
                                else f"within the seed spread {spread:.4f} (sample std): no clear winner"))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "fisher_map": self.fisher_map_path,
            "monitor": MONITOR,
            "seeds": list(self.seeds),
            "lrs": None if self.lrs is None else list(self.lrs),
            "chosen_lrs": self.chosen_lrs(),
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


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def _format_stat(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if not all(math.isfinite(value) for value in values):
        return "diverged"
    mean, std = _mean_std(values)
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"
