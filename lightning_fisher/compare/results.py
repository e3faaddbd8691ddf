"""The results of a comparison: one record per run, the table, and the verdict against seed noise.

Pure data and arithmetic (no Lightning): :class:`CompareResult` can be rebuilt from saved numbers
and summarised again. With several learning rates every arm gets its own, chosen on validation by
:func:`choose_learning_rate` (the quality benchmark chooses its arms' learning rates with the same
function), and the arms are compared at their own best learning rate and at equal ones.

Every fisher arm is judged against its flat twin, the flat arm at the same budget
(:attr:`~lightning_fisher.compare.plan.CompareArm.twin`): ``fisher@0.5`` against ``flat@0.5``,
``fisher`` against ``flat``. Full-rank ``flat`` stays in the table as context for the smaller
budgets. :meth:`CompareResult.twin_verdicts` holds those judgements, :meth:`CompareResult.summary`
says them in one sentence, and :meth:`CompareResult.frontier` gives the points of the
parameters-versus-quality figure (:func:`lightning_fisher.report.frontier.plot_frontier`).
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

from lightning_fisher.data.atomic_io import write_text_atomic
from lightning_fisher.compare.plan import CompareArm
from lightning_fisher.errors import CompareError

__all__ = [
    "LR_TIE_TOLERANCE",
    "MONITOR",
    "TIE_BREAKER",
    "CompareResult",
    "FrontierPoint",
    "RunResult",
    "TwinVerdict",
    "choose_learning_rate",
]

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


@dataclass(frozen=True)
class TwinVerdict:
    """A fisher arm against its flat twin (the flat arm at the same budget), by the seed spread.

    Attributes:
        arm: the fisher arm's name, e.g. ``"fisher@0.5"``.
        twin: the flat arm it is judged against, e.g. ``"flat@0.5"``.
        budget_fraction: the budget both spend, as a fraction of the map's base rank.
        delta: the arm's mean ``val_loss`` minus the twin's (negative: the fisher arm is better);
            ``None`` when a run diverged or either arm has no runs.
        spread: the seed spread the difference is judged by; ``None`` with one seed.
        outcome: ``"ahead"`` (the fisher arm better by more than the spread), ``"behind"`` (the
            twin better by more than it), ``"parity"``, ``"one seed"`` (no spread to judge by),
            ``"diverged"`` or ``"no runs"``.
    """

    arm: str
    twin: str
    budget_fraction: float
    delta: Optional[float]
    spread: Optional[float]
    outcome: str


def _outcome(delta: float, spread: Optional[float]) -> str:
    if spread is None:
        return "one seed"
    if abs(delta) <= spread:
        return "parity"
    return "ahead" if delta < 0 else "behind"


@dataclass(frozen=True)
class FrontierPoint:
    """One arm on the parameters-versus-quality plane: its parameters and its ``val_loss`` over seeds.

    Attributes:
        arm: the arm's name.
        family: ``flat``, ``fisher`` or ``fisher-<criterion>``: the line the point belongs to.
        parameters: LoRA parameters counted in the model after injection.
        mean: mean ``val_loss`` over seeds (at the arm's chosen learning rate, with ``lrs``).
        std: sample standard deviation over seeds; ``None`` with one seed.
        lr: the learning rate the point is at (``None``: the config's own).
        seeds: how many seeds the mean is over.
    """

    arm: str
    family: str
    parameters: int
    mean: float
    std: Optional[float]
    lr: Optional[float]
    seeds: int


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

        Every fisher arm is judged against its twin, the flat arm at the same budget
        (``fisher@0.5`` against ``flat@0.5``, ``fisher`` against ``flat``); each line names it.

        Without ``lrs``: one line per fisher arm, its ``val_loss`` minus its twin's, paired by
        seed; the difference counts as real when it exceeds two standard errors of the per-seed
        paired differences ("seed spread"); with a single seed there is no noise estimate.

        With ``lrs``: first which arm won at its own best learning rate, then every fisher arm
        against its twin (each at its own best learning rate) and whether by more than the seed
        spread, here the larger sample standard deviation over seeds of the two arms'
        ``val_loss`` (the quality benchmark's rule); then the paired lines above at every
        learning rate.
        """
        if not self.lrs:
            return self._paired_verdicts(None)
        lines = self._best_lr_verdicts()
        for lr in self.lrs:
            lines += [f"at lr {lr:g}, {line}" for line in self._paired_verdicts(lr)]
        return lines

    def _paired(self, arm: CompareArm, lr: Optional[float]) -> tuple[TwinVerdict, list[RunResult], dict[int, RunResult]]:
        """``arm`` against its twin at ``lr``, paired by seed; also the arm's paired runs and the twin's by seed."""
        twin = {run.seed: run for run in self.runs_of(arm.baseline, lr)}
        runs = [run for run in self.runs_of(arm.name, lr) if run.seed in twin]
        delta = spread = None
        if not runs:
            outcome = "no runs"
        else:
            differences = [run.val_loss - twin[run.seed].val_loss for run in runs]
            if not all(math.isfinite(difference) for difference in differences):
                outcome = "diverged"
            else:
                delta = statistics.fmean(differences)
                if len(differences) > 1:
                    spread = 2 * statistics.stdev(differences) / math.sqrt(len(differences))
                outcome = _outcome(delta, spread)
        return TwinVerdict(arm.name, arm.baseline, arm.budget_fraction, delta, spread, outcome), runs, twin

    def _paired_verdicts(self, lr: Optional[float]) -> list[str]:
        lines = []
        for arm in self.arms:
            if arm.is_flat:
                continue
            verdict, runs, twin = self._paired(arm, lr)
            if verdict.outcome == "no runs":
                continue
            if verdict.outcome == "diverged":
                lines.append(f"{arm.name} vs {verdict.twin}: not comparable, a run diverged ({MONITOR} not finite)")
                continue
            ratio = statistics.fmean(run.lora_parameters / max(1, twin[run.seed].lora_parameters) for run in runs)
            head = f"{arm.name} vs {verdict.twin}: {MONITOR} {verdict.delta:+.4f} at {ratio:.2f}x the parameters"
            if verdict.spread is None:
                lines.append(f"{head}; one seed, so no noise estimate (run more seeds, e.g. --seeds 0,1,2)")
                continue
            word = {"parity": "within noise", "ahead": f"{arm.name} better", "behind": f"{verdict.twin} better"}
            lines.append(f"{head}, seed spread {verdict.spread:.4f} over {len(runs)} seeds: {word[verdict.outcome]}")
        return lines

    def _at_chosen_lr(self) -> dict[str, tuple[float, Optional[float], float]]:
        """``{arm: (mean val_loss, sample std or None, chosen lr)}`` at each arm's chosen learning rate."""
        summary = {}
        for name, lr in self.chosen_lrs().items():
            losses = [run.val_loss for run in self.runs_of(name, lr)]
            finite = all(math.isfinite(value) for value in losses)
            summary[name] = (_mean_or_inf(losses), statistics.stdev(losses) if finite and len(losses) > 1 else None, lr)
        return summary

    def twin_verdicts(self) -> list[TwinVerdict]:
        """Every fisher arm against its flat twin, in arm order.

        Without ``lrs``: paired by seed (see :meth:`verdicts`). With ``lrs``: each arm at its own
        chosen learning rate, the spread being the larger sample std of the two.
        """
        if not self.lrs:
            return [self._paired(arm, None)[0] for arm in self.arms if not arm.is_flat]
        summary = self._at_chosen_lr()
        verdicts = []
        for arm in self.arms:
            if arm.is_flat:
                continue
            twin = arm.baseline
            delta = spread = None
            if arm.name not in summary or twin not in summary:
                outcome = "no runs"
            elif not (math.isfinite(summary[arm.name][0]) and math.isfinite(summary[twin][0])):
                outcome = "diverged"
            else:
                (mean, std, _), (twin_mean, twin_std, _) = summary[arm.name], summary[twin]
                delta = mean - twin_mean
                spread = None if std is None or twin_std is None else max(std, twin_std)
                outcome = _outcome(delta, spread)
            verdicts.append(TwinVerdict(arm.name, twin, arm.budget_fraction, delta, spread, outcome))
        return verdicts

    def summary(self) -> str:
        """One sentence: at each budget, which family is ahead of its flat twin, and by how much.

        E.g. ``At equal parameters (...): at 1 of rank 4, parity of fisher and flat; at 0.5 of
        rank 4, fisher ahead of flat@0.5 by 0.0123 val_loss.`` "Ahead" and "parity" are those of
        :meth:`twin_verdicts`. Empty when no fisher arm has run.
        """
        by_budget: dict[float, list[str]] = {}
        arms = {arm.name: arm for arm in self.arms}
        for verdict in self.twin_verdicts():
            if verdict.outcome == "no runs":
                continue
            family, twin = arms[verdict.arm].family, verdict.twin
            if verdict.outcome == "ahead":
                phrase = f"{family} ahead of {twin} by {-verdict.delta:.4f} {MONITOR}"
            elif verdict.outcome == "behind":
                phrase = f"{twin} ahead of {family} by {verdict.delta:.4f} {MONITOR}"
            elif verdict.outcome == "parity":
                phrase = f"parity of {family} and {twin}"
            elif verdict.outcome == "one seed":
                phrase = f"{family} {verdict.delta:+.4f} {MONITOR} against {twin} on one seed (no verdict)"
            else:
                phrase = f"{family} and {twin} not comparable (a run diverged)"
            by_budget.setdefault(verdict.budget_fraction, []).append(phrase)
        if not by_budget:
            return ""
        rank = next((arm.rank for arm in self.arms if arm.name == "flat"), None)
        of = "" if rank is None else f" of rank {rank}"
        how = "each arm at its own best learning rate" if self.lrs else "paired by seed"
        budgets = "; ".join(f"at {fraction:g}{of}, {', '.join(phrases)}" for fraction, phrases in by_budget.items())
        return f"At equal parameters ({how}, judged by the seed spread): {budgets}."

    def frontier(self) -> dict[str, list[FrontierPoint]]:
        """``{family: points in ascending parameters}``: each arm's parameters and ``val_loss`` over seeds.

        With ``lrs`` each arm's point is at its chosen learning rate. Arms without runs, and arms
        with a diverged run at that learning rate, have no point.
        """
        chosen = self.chosen_lrs()
        families: dict[str, list[FrontierPoint]] = {}
        for arm in self.arms:
            lr = chosen.get(arm.name)
            if self.lrs and lr is None:
                continue
            runs = self.runs_of(arm.name, lr)
            losses = [run.val_loss for run in runs]
            if not runs or not all(math.isfinite(value) for value in losses):
                continue
            mean, std = _mean_std(losses)
            families.setdefault(arm.family, []).append(
                FrontierPoint(arm.name, arm.family, runs[0].lora_parameters, mean, std, lr, len(runs)))
        return {family: sorted(points, key=lambda point: point.parameters) for family, points in families.items()}

    def _best_lr_verdicts(self) -> list[str]:
        summary = self._at_chosen_lr()
        if not summary:
            return []
        ranked = sorted(summary, key=lambda name: summary[name][0])
        winner = ranked[0]

        def describe(name: str) -> str:
            mean, std, lr = summary[name]
            value = "diverged" if not math.isfinite(mean) else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")
            return f"{name} ({MONITOR} {value} at lr {lr:g})"

        if not math.isfinite(summary[winner][0]):
            return [f"at each arm's own best learning rate: every arm diverged ({', '.join(map(describe, ranked))})"]
        lines = [f"at each arm's own best learning rate: {describe(winner)} is best"]
        # Then each fisher arm against its twin at the same budget, not against the winner.
        for verdict in self.twin_verdicts():
            if verdict.outcome == "no runs":
                continue
            head = f"  {verdict.arm} vs {describe(verdict.twin)}"
            if verdict.outcome == "diverged":
                gone = [name for name in (verdict.arm, verdict.twin) if not math.isfinite(summary[name][0])]
                lines.append(f"{head}: {' and '.join(gone)} diverged at every learning rate")
            elif verdict.outcome == "one seed":
                lines.append(f"{head}: {verdict.delta:+.4f}; one seed, so no seed spread to judge by "
                             "(run more seeds, e.g. --seeds 0,1,2)")
            elif verdict.outcome == "parity":
                lines.append(f"{head}: {verdict.delta:+.4f}, within the seed spread {verdict.spread:.4f} (sample std): "
                             "no clear winner")
            else:
                better = verdict.arm if verdict.outcome == "ahead" else verdict.twin
                lines.append(f"{head}: {verdict.delta:+.4f}, more than the seed spread {verdict.spread:.4f} "
                             f"(sample std): {better} better")
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
            "twin_verdicts": [dataclasses.asdict(verdict) for verdict in self.twin_verdicts()],
            "summary": self.summary(),
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
        summary = self.summary()
        return "\n".join([self.to_markdown(), "", *self.verdicts(), *(["", summary] if summary else [])])


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
