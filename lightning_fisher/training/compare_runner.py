"""Does the fisher map help on this data? Short fits of flat LoRA and of the map, side by side.

:func:`compare_fisher_map` plans the arms (``flat``, ``fisher``, ``fisher@F`` and its flat twin
``flat@F`` at the same budget: see :mod:`lightning_fisher.compare.plan`), runs every (arm, seed)
pair as a fresh fit followed by a validation, and returns a :class:`~lightning_fisher.compare.results.CompareResult` (a table, a
verdict, the raw runs). With ``lrs`` every arm runs at every learning rate with every seed and
is compared at the learning rate it chose on validation
(:func:`~lightning_fisher.compare.results.choose_learning_rate`) and at equal ones.

Every arm uses the same alpha scaling (the map's alpha policy, or your ``lora_alpha`` read as
the alpha at rank ``r``), so the arms differ only in where the adapters go and how large they
are. Runs of one seed start from the same seeded state; the seed changes the adapter
initialisation and every random draw during the fit. Models whose constructor resets the global
seed are re-seeded after construction, so the seed still reaches the adapters.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_fisher.compare.plan import CompareArm, check_budgets, check_lrs, check_seeds, plan_arms
from lightning_fisher.compare.results import MONITOR, CompareResult, RunResult
from lightning_fisher.errors import CompareError
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.fisher_map.patterns import exact_target_regex
from lightning_fisher.peft_factory import (
    MAP_OWNED_OPTIONS,
    adapter_ranks,
    alpha_option,
    alpha_policy,
    count_adapter_parameters,
    load_map,
    root_module,
)
from lightning_fisher.training.adaptive_lora import AdaptiveLoRA
from lightning_fisher.wording import plural

__all__ = ["RunFactory", "compare_fisher_map"]

#: Builds one fresh run: ``(model, datamodule or None, trainer)``. The trainer must carry an
#: :class:`AdaptiveLoRA` callback; its adapter options are kept, compare sets which map it applies.
#: Called with no argument, or, when compare is given ``lrs``, with the learning rate of the run.
RunFactory = Callable[..., tuple[pl.LightningModule, Optional[pl.LightningDataModule], pl.Trainer]]
Built = tuple[pl.LightningModule, Optional[pl.LightningDataModule], pl.Trainer]


class _LearningRateCheck(pl.Callback):
    """Fails a run, before its first step, whose optimizer did not get the learning rate it was built for."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A scheduler may already have scaled "lr"; "initial_lr" is what the group started from.
        starts = [group.get("initial_lr", group["lr"]) for optimizer in trainer.optimizers for group in optimizer.param_groups]
        if not any(math.isclose(start, self.lr, rel_tol=1e-9) for start in starts):
            raise CompareError(
                f"lrs: the run was built for learning rate {self.lr:g}, but its optimizer's parameter groups start at "
                f"{', '.join(f'{start:g}' for start in starts) or 'none'}: the model must take the learning rate it is "
                "given (make_run(lr) in Python; on the command line --lr_key names the config key, e.g. "
                "model.init_args.learning_rate)"
            )


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


def _build(make_run: RunFactory, lr: Optional[float]) -> Built:
    if lr is None:
        return make_run()
    model, datamodule, trainer = make_run(lr)
    trainer.callbacks.append(_LearningRateCheck(lr))
    return model, datamodule, trainer


def _run(
    make_run: RunFactory,
    arm: CompareArm,
    seed: int,
    lr: Optional[float],
    fisher_map: FisherMap,
    options: _AdapterOptions,
    built: Optional[Built] = None,
) -> tuple[RunResult, list[str]]:
    notes: list[str] = []
    if built is None:
        pl.seed_everything(seed, verbose=False)
        built = _build(make_run, lr)
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
        lr=lr,
    )
    return result, notes


def compare_fisher_map(
    make_run: RunFactory,
    fisher_map: Union[FisherMap, str, os.PathLike],
    *,
    budgets: Sequence[float] = (1.0,),
    seeds: Sequence[int] = (0, 1, 2),
    lrs: Optional[Sequence[float]] = None,
    output: Union[str, os.PathLike, None] = None,
    notes: Sequence[str] = (),
    criteria: Optional[Sequence[str]] = None,
) -> CompareResult:
    """Fit flat LoRA and the map's allocation (and other budgets, each with its flat twin) on the same seeds; compare validation.

    Every run calls ``make_run`` after seeding, fits, validates, and reads the final ``val_*``
    metrics from ``trainer.callback_metrics``. Runs go seed by seed (all arms of seed 0, then
    seed 1, ...; with ``lrs``, every learning rate of seed 0 first), so an interrupted
    comparison still holds paired results.

    Args:
        make_run: returns a fresh ``(model, datamodule, trainer)`` on every call (called as
            ``make_run(lr)`` when ``lrs`` is given: build the optimizer with that learning rate,
            which is checked before the first step). The trainer
            carries one :class:`AdaptiveLoRA` callback; its ``adapter``, ``adapter_root``,
            ``adapter_name`` and ``lora_kwargs`` (``lora_alpha`` read as the alpha at the map's base
            rank) hold for every arm, and compare sets which adapters it injects. Give the trainer
            its length (``max_steps`` / ``max_epochs``) and, to leave no files behind,
            ``enable_checkpointing=False, logger=False``.
        fisher_map: the map, or its file or folder.
        budgets: rank budgets as fractions of the map's base rank; ``1.0`` always runs. Every
            other budget ``F`` also runs ``flat@F``, flat LoRA at that budget's rank, and
            ``fisher@F`` is judged against it.
        seeds: every arm runs once per seed (and learning rate).
        lrs: learning rates; every arm runs at each of them and is compared at the one it
            chooses on validation (mean ``val_loss`` over seeds) as well as at equal ones.
            ``None``: one learning rate, whatever ``make_run`` builds.
        output: if set, the raw results are written there as JSON after every run.
        notes: lines to carry into the result (what the caller changed in the setup).
        criteria: allocation criteria of the fisher arms (default the map's own); see
            :func:`~lightning_fisher.compare.plan.plan_arms`.

    Returns:
        The :class:`CompareResult`; ``print(result)`` shows the table, the verdicts and the
        one-line summary; :func:`lightning_fisher.report.frontier.plot_frontier` draws it.

    Raises:
        CompareError: bad budgets, seeds or learning rates, no validation data, ``val_loss``
            not logged, a trainer without exactly one :class:`AdaptiveLoRA`, or (with ``lrs``)
            an optimizer that did not get the learning rate.
    """
    fisher_map = load_map(fisher_map)
    seeds = check_seeds(seeds)
    lrs = check_lrs(lrs)
    check_budgets(fisher_map, budgets)  # fail before building anything

    # The first run's fresh model and callback also plan the arms (shapes, adapter_root).
    pl.seed_everything(seeds[0], verbose=False)
    first = _build(make_run, None if lrs is None else lrs[0])
    callback = _adaptive_lora(first[2])
    options = _AdapterOptions(
        adapter=callback.adapter,
        adapter_root=callback.adapter_root,
        adapter_name=callback.adapter_name,
        lora_kwargs=dict(callback.lora_kwargs),
    )
    arms = plan_arms(fisher_map, first[0], budgets=budgets, adapter_root=options.adapter_root, criteria=criteria)
    result = CompareResult(
        arms=arms,
        seeds=seeds,
        fisher_map_path=None if fisher_map.path is None else str(fisher_map.path),
        notes=list(notes),
        lrs=lrs,
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
        + ("" if lrs is None else f"; learning rates {', '.join(f'{lr:g}' for lr in lrs)}")
    )
    grid = [(seed, lr, arm) for seed in seeds for lr in (lrs or [None]) for arm in arms]
    for seed, lr, arm in grid:
        run, run_notes = _run(make_run, arm, seed, lr, fisher_map, options, built=first)
        first = None
        for note in run_notes:
            if note not in result.notes:
                result.notes.append(note)
        result.runs.append(run)
        at = "" if lr is None else f" lr {lr:g}"
        rank_zero_info(
            f"compare [{len(result.runs)}/{len(grid)}] {arm.name} seed {seed}{at}: {MONITOR} {run.val_loss:.4f}, "
            f"{run.lora_parameters:,} adapter parameters, {plural(run.steps, 'step')}, {run.seconds:.1f} s"
        )
        if output is not None:
            result.save(output)
    return result
