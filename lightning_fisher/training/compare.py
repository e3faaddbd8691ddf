"""Does the fisher map help on this data? Short fits with flat LoRA and with the map, side by side.

:func:`compare_fisher_map` plans the arms, runs every (arm, seed) pair as a fresh fit followed
by a validation, and returns a :class:`CompareResult` (a table, a verdict, the raw runs):

- ``flat``: LoRA at the map's base rank ``r`` on exactly the map's candidate modules (those
  under ``adapter_root``), so it covers what the analysis covered and nothing else.
- ``fisher``: the map's scores allocated in budget mode at rank ``r``: its adapter parameters
  equal flat's, less at most one rank step of one module.
- ``fisher@F``: one per extra budget fraction ``F``, budget mode at ``round(r * F)`` (at least
  the map's ``rank_min``).

Every arm uses the same alpha scaling (the map's alpha policy, or your ``lora_alpha`` read as
the alpha at rank ``r``), so the arms differ only in where the adapters go and how large they
are. Runs of one seed start from the same seeded state; the seed changes the adapter
initialisation and every random draw during the fit. Models whose constructor resets the global
seed are re-seeded after construction, so the seed still reaches the adapters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_fisher.atomic_io import write_text_atomic
from lightning_fisher.errors import LightningFisherError
from lightning_fisher.fisher_map import FisherMap
from lightning_fisher.patterns import exact_target_regex
from lightning_fisher.peft_factory import (
    MAP_OWNED_OPTIONS,
    adapter_ranks,
    alpha_option,
    alpha_policy,
    count_adapter_parameters,
    rebase_names,
    root_module,
)
from lightning_fisher.training.adaptive_lora import AdaptiveLoRA

__all__ = [
    "MONITOR",
    "CompareArm",
    "CompareError",
    "CompareResult",
    "RunFactory",
    "RunResult",
    "compare_fisher_map",
    "plan_arms",
]

#: The validation metric the arms are ranked by (lower is better).
MONITOR = "val_loss"

#: Builds one fresh run: ``(model, datamodule or None, trainer)``. The trainer must carry an
#: :class:`AdaptiveLoRA` callback; its adapter options are kept, compare sets which map it applies.
RunFactory = Callable[[], tuple[pl.LightningModule, Optional[pl.LightningDataModule], pl.Trainer]]


class CompareError(LightningFisherError, ValueError):
    """A comparison cannot be planned or run (bad option, no validation data, metric not logged)."""


@dataclass(frozen=True)
class CompareArm:
    """One training setup of the comparison.

    Attributes:
        name: ``"flat"``, ``"fisher"`` or ``"fisher@<fraction>"``.
        rank: base rank: flat LoRA's rank, or the flat-equivalent budget rank of a fisher arm.
        budget_fraction: ``rank`` relative to the map's base rank, as asked for.
        fisher_map: the map the arm applies (``None`` for flat).
        modules: ``{module name relative to adapter_root: rank}`` of the adapters it injects.
        expected_parameters: LoRA parameters of those adapters, ``sum(rank * (d_in + d_out))``.
    """

    name: str
    rank: int
    budget_fraction: float
    fisher_map: Optional[FisherMap]
    modules: Mapping[str, int]
    expected_parameters: int

    @property
    def is_flat(self) -> bool:
        return self.fisher_map is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rank": self.rank,
            "budget_fraction": self.budget_fraction,
            "expected_lora_parameters": self.expected_parameters,
            "modules": dict(self.modules),
        }


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


# ---------------------------------------------------------------------------------- planning
def _budget_rank(fisher_map: FisherMap, fraction: float) -> int:
    budget = fisher_map.budget
    if fraction == 1.0:
        return budget.rank
    # Half up, not round()'s half to even: 0.5 of rank 5 is 3, as a reader expects.
    return max(budget.rank_min, int(math.floor(budget.rank * fraction + 0.5)))


def _check_budgets(fisher_map: FisherMap, budgets: Sequence[float]) -> list[tuple[float, int]]:
    fractions: list[float] = []
    for value in budgets:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CompareError(f"budgets: each must be a positive fraction of the map's rank budget, got {value!r}")
        if float(value) not in fractions:
            fractions.append(float(value))
    if 1.0 in fractions:
        fractions.remove(1.0)
    fractions.insert(0, 1.0)  # the same-budget arm always runs: it answers the question
    budget = fisher_map.budget
    planned: list[tuple[float, int]] = []
    for fraction in fractions:
        rank = _budget_rank(fisher_map, fraction)
        if rank > budget.rank_max:
            raise CompareError(
                f"budgets: {fraction:g} of rank {budget.rank} is rank {rank}, above the map's rank_max "
                f"{budget.rank_max}; use fractions up to {budget.rank_max / budget.rank:g}"
            )
        same = [f for f, r in planned if r == rank]
        if same:
            raise CompareError(
                f"budgets: {fraction:g} and {same[0]:g} both give rank {rank} (map rank {budget.rank}, "
                f"rank_min {budget.rank_min}); drop one of them"
            )
        planned.append((fraction, rank))
    return planned


def plan_arms(
    fisher_map: FisherMap,
    model: nn.Module,
    *,
    budgets: Sequence[float] = (1.0,),
    adapter_root: Optional[str] = None,
) -> list[CompareArm]:
    """The arms of a comparison: ``flat``, ``fisher`` and one ``fisher@F`` per extra budget fraction.

    Args:
        fisher_map: the map to compare against flat LoRA.
        model: the model the map was made for (its module shapes give the parameter counts).
        budgets: rank budgets as fractions of the map's base rank; ``1.0`` (the ``fisher`` arm)
            is always included.
        adapter_root: as in :class:`AdaptiveLoRA`; only candidates under it take part.

    Raises:
        CompareError: a budget fraction is not positive, exceeds ``rank_max``, or duplicates
            another's rank; or no candidate of the map lies under ``adapter_root``.
    """
    planned = _check_budgets(fisher_map, budgets)
    candidates, _ = rebase_names(fisher_map.scores, adapter_root)
    if not candidates:
        raise CompareError(
            f"adapter_root={adapter_root!r}: none of the map's {len(fisher_map.modules)} candidate modules lies "
            f"under it (e.g. {list(fisher_map.scores)[:2]}); use the dotted name of the submodule that holds them"
        )
    costs = fisher_map.rank_costs
    budget = fisher_map.budget
    rank = budget.rank
    arms = [
        CompareArm(
            name="flat",
            rank=rank,
            budget_fraction=1.0,
            fisher_map=None,
            modules={relative: rank for relative in candidates},
            expected_parameters=rank * sum(costs[full] for full in candidates.values()),
        )
    ]
    # Candidates outside adapter_root get no adapter in either arm, so the budget is taken over
    # the ones inside it: the fisher arm then spends what flat spends.
    scores = {full: fisher_map.scores[full] for full in candidates.values()}
    stderr = {full: fisher_map.score_stderrs[full] for full in candidates.values()}
    for fraction, arm_rank in planned:
        reuse = fraction == 1.0 and budget.mode == "budget" and len(scores) == len(fisher_map.modules)
        if reuse:
            arm_map = fisher_map
        else:
            arm_map = FisherMap.from_scores(
                scores,
                model,
                rank=arm_rank,
                rank_min=budget.rank_min,
                rank_max=budget.rank_max,
                mode="budget",
                score_power=budget.score_power,
                exclude_threshold=budget.exclude_threshold,
                # alpha / rank stays what the map prescribes, whatever the budget
                lora_alpha=fisher_map.alpha.alpha_for(arm_rank, rank),
                use_rslora=fisher_map.alpha.use_rslora,
                score_stderr=stderr,
                analysis=fisher_map.analysis,
                dataset=fisher_map.dataset,
            )
            # Same model as the map on disk: keep its identity so the model check behaves as in fit.
            arm_map = dataclasses.replace(arm_map, model=fisher_map.model)
        ranks, _ = rebase_names(arm_map.ranks, adapter_root)
        arms.append(
            CompareArm(
                name="fisher" if fraction == 1.0 else f"fisher@{fraction:g}",
                rank=arm_rank,
                budget_fraction=fraction,
                fisher_map=arm_map,
                modules={relative: arm_map.ranks[full] for relative, full in ranks.items()},
                expected_parameters=sum(arm_map.ranks[full] * costs[full] for full in ranks.values()),
            )
        )
    return arms


# ---------------------------------------------------------------------------------- running
def _adaptive_lora(trainer: pl.Trainer) -> AdaptiveLoRA:
    found = [callback for callback in trainer.callbacks if isinstance(callback, AdaptiveLoRA)]
    if len(found) != 1:
        raise CompareError(
            f"the trainer has {len(found)} AdaptiveLoRA callbacks; compare needs exactly one (its adapter options "
            "are used in every arm)"
        )
    return found[0]


@dataclass(frozen=True)
class _AdapterOptions:
    """The user's adapter settings, taken from the first run's AdaptiveLoRA."""

    adapter: str
    adapter_root: Optional[str]
    adapter_name: str
    lora_kwargs: Mapping[str, Any]

    def configure(self, callback: AdaptiveLoRA, arm: CompareArm, fisher_map: FisherMap) -> None:
        options = {k: v for k, v in self.lora_kwargs.items() if k not in MAP_OWNED_OPTIONS}
        # Alpha at the map's base rank (yours or the map's), carried to the arm's base rank by the
        # map's policy, so that alpha / rank, and with it the update scale, is the same in every arm.
        policy = alpha_policy(fisher_map, self.adapter, options)
        options[alpha_option(self.adapter)] = policy.alpha_for(arm.rank, fisher_map.budget.rank)
        if self.adapter == "lora":
            options["use_rslora"] = policy.use_rslora
        if arm.is_flat:
            options["r"] = arm.rank
            options["target_modules"] = exact_target_regex(arm.modules)
        callback.fisher_map = arm.fisher_map if not arm.is_flat else fisher_map
        callback.ignore_fisher_map = arm.is_flat
        callback.adapter = self.adapter
        callback.adapter_root = self.adapter_root
        callback.adapter_name = self.adapter_name
        callback.lora_kwargs = options
        callback.export_dir = None  # probes, not results: nothing to export
        callback.verbose = False


def _validation_metrics(trainer: pl.Trainer) -> dict[str, float]:
    metrics = {}
    for name, value in trainer.callback_metrics.items():
        if not (name.startswith("val_") or name.startswith("val/")):
            continue
        try:
            metrics[name] = float(value)
        except (TypeError, ValueError):
            continue  # not a scalar
    return metrics


def _run(
    make_run: RunFactory,
    arm: CompareArm,
    seed: int,
    fisher_map: FisherMap,
    options: _AdapterOptions,
    built: Optional[tuple[pl.LightningModule, Optional[pl.LightningDataModule], pl.Trainer]] = None,
) -> tuple[RunResult, list[str]]:
    notes: list[str] = []
    if built is None:
        pl.seed_everything(seed, verbose=False)
        built = make_run()
    model, datamodule, trainer = built
    if trainer.world_size > 1:
        raise CompareError(
            f"the trainer runs on {trainer.world_size} processes; compare runs its fits one after another on one "
            "device: set trainer.devices=1 (--trainer.devices 1)"
        )
    callback = _adaptive_lora(trainer)
    options.configure(callback, arm, fisher_map)
    if datamodule is not None and hasattr(datamodule, "shuffle_seed"):
        datamodule.shuffle_seed = seed  # the seed varies the data order, not the validation split
    # Again after construction: a model whose __init__ resets the global seed would otherwise
    # give every seed the same adapter initialisation.
    pl.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    if trainer.limit_val_batches == 0:
        # Validation during fit stays as configured; the final measurement needs the data.
        trainer.limit_val_batches = 1.0
        notes.append("limit_val_batches is 0 in the trainer config: the final validation of each run uses all validation batches")
    trainer.validate(model, datamodule=datamodule, verbose=False)
    seconds = time.perf_counter() - start
    if not sum(trainer.num_val_batches or [0]):
        raise CompareError(
            "no validation data: compare ranks the arms by their validation loss. Give the datamodule validation "
            "data (TensorDirectoryDataModule: --data.init_args.val_dir or --data.init_args.val_fraction)"
        )
    metrics = _validation_metrics(trainer)
    if MONITOR not in metrics:
        logged = ", ".join(sorted(metrics)) or "none"
        raise CompareError(
            f"the model logs no {MONITOR!r} in validation (validation metrics logged: {logged}); compare ranks the "
            f"arms by it: add self.log({MONITOR!r}, loss) to {type(model).__name__}.validation_step"
        )
    root = root_module(model, options.adapter_root)
    result = RunResult(
        arm=arm.name,
        seed=seed,
        lora_parameters=count_adapter_parameters(root),
        adapted_modules=len(adapter_ranks(root, options.adapter_name)),
        val_loss=metrics[MONITOR],
        metrics=metrics,
        seconds=seconds,
        steps=trainer.global_step,
    )
    return result, notes


def compare_fisher_map(
    make_run: RunFactory,
    fisher_map: Union[FisherMap, str, os.PathLike],
    *,
    budgets: Sequence[float] = (1.0,),
    seeds: Sequence[int] = (0, 1, 2),
    output: Union[str, os.PathLike, None] = None,
    notes: Sequence[str] = (),
) -> CompareResult:
    """Fit flat LoRA and the map's allocation (and smaller budgets) on the same seeds; compare validation.

    Every run calls ``make_run`` after seeding, fits, validates, and reads the final ``val_*``
    metrics from ``trainer.callback_metrics``. Runs go seed by seed (all arms of seed 0, then
    seed 1, ...), so an interrupted comparison still holds paired results.

    Args:
        make_run: returns a fresh ``(model, datamodule, trainer)`` on every call. The trainer
            carries one :class:`AdaptiveLoRA` callback; its ``adapter``, ``adapter_root``,
            ``adapter_name`` and ``lora_kwargs`` (``lora_alpha`` read as the alpha at the map's base
            rank) hold for every arm, and compare sets which adapters it injects. Give the trainer
            its length (``max_steps`` / ``max_epochs``) and, to leave no files behind,
            ``enable_checkpointing=False, logger=False``.
        fisher_map: the map, or its file or folder.
        budgets: rank budgets as fractions of the map's base rank; ``1.0`` always runs.
        seeds: every arm runs once per seed.
        output: if set, the raw results are written there as JSON after every run.
        notes: lines to carry into the result (what the caller changed in the setup).

    Returns:
        The :class:`CompareResult`; ``print(result)`` shows the table and the verdicts.

    Raises:
        CompareError: bad budgets or seeds, no validation data, ``val_loss`` not logged, or a
            trainer without exactly one :class:`AdaptiveLoRA`.
    """
    if not isinstance(fisher_map, FisherMap):
        fisher_map = FisherMap.load(fisher_map)
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise CompareError(f"seeds: need one or more distinct integers, got {seeds!r}")
    _check_budgets(fisher_map, budgets)  # fail before building anything

    # The first run's fresh model and callback also plan the arms (shapes, adapter_root).
    pl.seed_everything(seeds[0], verbose=False)
    first = make_run()
    callback = _adaptive_lora(first[2])
    options = _AdapterOptions(
        adapter=callback.adapter,
        adapter_root=callback.adapter_root,
        adapter_name=callback.adapter_name,
        lora_kwargs=dict(callback.lora_kwargs),
    )
    arms = plan_arms(fisher_map, first[0], budgets=budgets, adapter_root=options.adapter_root)
    result = CompareResult(
        arms=arms,
        seeds=seeds,
        fisher_map_path=None if fisher_map.path is None else str(fisher_map.path),
        notes=list(notes),
    )
    replaced = sorted(k for k in options.lora_kwargs if k in MAP_OWNED_OPTIONS)
    if replaced:
        result.notes.append(f"lora_kwargs {', '.join(replaced)}: ignored, every arm sets its own targets and ranks")
    outside = len(fisher_map.modules) - len(arms[0].modules)
    if outside:
        result.notes.append(
            f"{outside} candidate module(s) of the map lie outside adapter_root={options.adapter_root!r}: "
            "left out of every arm, and the fisher budgets are taken over the rest"
        )
    rank_zero_info(
        "compare: " + "; ".join(
            f"{arm.name} rank {arm.rank} on {len(arm.modules)} modules ({arm.expected_parameters:,} LoRA parameters)"
            for arm in arms
        ) + f"; seeds {', '.join(map(str, seeds))}"
    )
    total = len(arms) * len(seeds)
    for seed in seeds:
        for arm in arms:
            run, run_notes = _run(make_run, arm, seed, fisher_map, options, built=first)
            first = None
            for note in run_notes:
                if note not in result.notes:
                    result.notes.append(note)
            result.runs.append(run)
            rank_zero_info(
                f"compare [{len(result.runs)}/{total}] {arm.name} seed {seed}: {MONITOR} {run.val_loss:.4f}, "
                f"{run.lora_parameters:,} adapter parameters, {run.steps} steps, {run.seconds:.1f} s"
            )
            if output is not None:
                result.save(output)
    return result
