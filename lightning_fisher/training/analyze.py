"""``analyze()`` on the Trainer path: a LightningModule analysed through its ``training_step``.

:func:`lightning_fisher.analyze` (:mod:`lightning_fisher.analysis.entry`) sends a LightningModule
given without ``loss_fn`` here; any other model goes to the plain loop
(:mod:`lightning_fisher.analysis.plain_loop`). Both run the same
:class:`~lightning_fisher.analysis.session.AnalysisSession` and write the map the same way
(:mod:`lightning_fisher.analysis.files`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_fisher.allocation.settings import (
    ALLOCATION_OPTIONS,
    AllocationSettings,
    allocation_from_options,
    other_spellings,
    resolve_settings,
    settings_or_options,
)
from lightning_fisher.analysis.options import ANALYSIS_OPTIONS, AnalysisOptions, options_from
from lightning_fisher.analysis.files import check_writable, dataset_record, map_destination, seeded_run
from lightning_fisher.errors import FisherAnalysisError
from lightning_fisher.fisher_map.backup import BACKUP_SUFFIX, save_keeping_previous
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.analysis.stability import STOPPING_OPTIONS, StabilityRule
from lightning_fisher.analysis.timesteps import TimestepFocus
from lightning_fisher.training.analysis_module import FisherAnalysisModule
from lightning_fisher.training.defaults import TRAINER_DEFAULTS
from lightning_fisher.training.analysis_progress import use_analysis_progress_bar
from lightning_fisher.training.stability_callback import FisherStability, say_why_it_stopped

__all__ = ["BACKUP_SUFFIX", "analyze", "map_destination"]

# Lightning's advice that does not apply to a run that trains nothing.
_QUIET = (
    r".*configure_optimizers.* returned `None`.*",
    r".*does not have many workers.*",
    r".*smaller than the logging interval.*",
    r".*You defined a `validation_step` but have no `val_dataloader`.*",
    r".*You passed in a `val_dataloader` but have no `validation_step`.*",
)


@other_spellings(mode="rank_mode", patience="convergence_patience", threshold="stability_threshold")
@settings_or_options("allocation", AllocationSettings, ALLOCATION_OPTIONS)
@settings_or_options("stopping", StabilityRule, STOPPING_OPTIONS)
@settings_or_options("options", AnalysisOptions, ANALYSIS_OPTIONS)
def analyze(
    task: pl.LightningModule,
    data: Union[pl.LightningDataModule, DataLoader],
    *,
    dataset_dir: Union[str, os.PathLike, None] = None,
    output: Union[str, os.PathLike, None] = None,
    rank: int = AllocationSettings.rank,
    rank_min: int = AllocationSettings.rank_min,
    rank_max: int = AllocationSettings.rank_max,
    rank_mode: Literal["median", "budget"] = AllocationSettings.mode,
    timestep_focus: Union[str, TimestepFocus] = AnalysisOptions.timestep_focus,
    convergence_patience: int = StabilityRule.patience,
    stability_threshold: float = StabilityRule.threshold,
    min_batches: int = StabilityRule.min_batches,
    max_batches: Optional[int] = StabilityRule.max_batches,
    max_epochs: int = 1,
    seed: Optional[int] = AnalysisOptions.seed,
    include: Optional[Sequence[str]] = AnalysisOptions.include,
    exclude: Sequence[str] = AnalysisOptions.exclude,
    module_types: Optional[Sequence[type]] = AnalysisOptions.module_types,
    loss_reduction: Literal["mean", "sum"] = AnalysisOptions.loss_reduction,
    train_mode: bool = AnalysisOptions.train_mode,
    score_power: float = AllocationSettings.score_power,
    exclude_threshold: float = AllocationSettings.exclude_threshold,
    criterion: str = AllocationSettings.criterion,
    lora_alpha: Optional[float] = AnalysisOptions.lora_alpha,
    use_rslora: bool = AnalysisOptions.use_rslora,
    trainer_kwargs: Optional[dict[str, Any]] = None,
    trainer: Optional[pl.Trainer] = None,
    allocation: Optional[AllocationSettings] = None,
    stopping: Optional[StabilityRule] = None,
    options: Optional[AnalysisOptions] = None,
) -> FisherMap:
    """Analyse ``task`` on ``data`` and return (and, given a folder, write) the fisher map.

    Runs :class:`FisherAnalysisModule` under a fresh ``Trainer`` with a
    :class:`FisherStability` callback. The task's weights are left as they were.

    Args:
        task: your LightningModule (its ``training_step`` gives the loss).
        data: a LightningDataModule (its ``train_dataloader``) or a DataLoader.
        dataset_dir: folder to write ``fisher_map.json`` into and to fingerprint; default the
            datamodule's ``dataset_dir`` attribute when it has one. With neither (and no
            ``output``) nothing is written.
        output: explicit map file or folder, overriding the dataset folder as destination.
            A map already at the destination is kept as ``fisher_map.json.bak`` (see
            :data:`BACKUP_SUFFIX`) and the ranks that changed are logged.
        rank: base rank (median, or flat-equivalent with ``rank_mode="budget"``).
        rank_min: smallest rank of an adapted module.
        rank_max: largest rank of an adapted module.
        rank_mode: ``"median"`` or ``"budget"``.
        timestep_focus: ``balanced``, ``texture``, ``structure`` or ``"LO,HI"``.
        convergence_patience: stable batches before stopping (``FisherStability.patience``).
        stability_threshold: split-half Spearman correlation counted as stable.
        min_batches: never stop before this many batches.
        max_batches: stop after this many batches regardless (``None``: when data runs out).
        max_epochs: passes over the data at most (more than one helps only when the loss is
            random, e.g. diffusion noise and timesteps).
        seed: seeds sample order, noise and timesteps (``lightning.seed_everything``); ``None``
            leaves the random state alone.
        include: candidate name patterns (default: every ``nn.Linear``).
        exclude: name patterns to leave out.
        module_types: candidate module classes.
        loss_reduction: ``"mean"`` or ``"sum"`` over samples.
        train_mode: analyse in train mode (dropout on); default eval mode.
        score_power: exponent of the score-to-rank rule.
        exclude_threshold: relative score below which a module gets no adapter.
        criterion: how ranks follow from the analysis: ``"trace"``, ``"spectrum"`` or another
            registered criterion's name (:mod:`lightning_fisher.allocation.criteria`).
        lora_alpha: alpha at the base rank recorded in the map; default ``2 * rank``.
        use_rslora: alpha policy recorded in the map.
        trainer_kwargs: extra ``Trainer`` arguments (``accelerator``, ``devices``,
            ``strategy="ddp"``, ``logger``, ``callbacks``, ``precision``, ...).
        trainer: a ready ``Trainer`` to run the analysis with instead (the stability callback
            is added to it); exclusive with ``trainer_kwargs``. Give it
            ``enable_checkpointing=False``: the analysis has nothing worth checkpointing.
        allocation: the allocation options (``rank``, ``rank_min``, ``rank_max``,
            ``rank_mode``, ``score_power``, ``exclude_threshold``, ``criterion``) as one
            :class:`~lightning_fisher.AllocationSettings`; then pass none of those.
        stopping: the stopping options (``convergence_patience``, ``stability_threshold``,
            ``min_batches``, ``max_batches``) as one :class:`~lightning_fisher.StabilityRule`;
            then pass none of those.
        options: the analysis options (``include`` ... ``seed``, ``lora_alpha``,
            ``use_rslora``) as one :class:`~lightning_fisher.AnalysisOptions`; then pass none
            of those.

    Returns:
        The map (on every process under DDP; only global rank zero writes it).

    Raises:
        FisherMapWriteError: the destination is not writable (checked before analysing).
        FisherAnalysisError: no usable loss or gradients, or the Trainer stopped before the analysis finished.
    """
    # Every setting is parsed and checked here, once, before anything runs.
    options = options_from(
        options, "analyze", include=include, exclude=exclude, module_types=module_types, timestep_focus=timestep_focus,
        loss_reduction=loss_reduction, train_mode=train_mode, seed=seed, lora_alpha=lora_alpha, use_rslora=use_rslora,
    )
    allocation = allocation_from_options(
        allocation, "analyze", rank, rank_min, rank_max, rank_mode, score_power, exclude_threshold, criterion
    )
    stopping = resolve_settings(
        StabilityRule,
        stopping,
        dict(patience=convergence_patience, threshold=stability_threshold, min_batches=min_batches,
             max_batches=max_batches),
        owner="analyze",
    )
    destination = map_destination(data, dataset_dir, output)
    if destination is not None:
        check_writable(destination)
    with seeded_run(options.seed, functools.partial(pl.seed_everything, workers=True, verbose=False)):
        fisher_map, trainer = _run_analysis(
            task, data, trainer=trainer, trainer_kwargs=trainer_kwargs, max_epochs=max_epochs,
            # analyze says why it stopped itself, once the progress bar is gone
            stability=FisherStability(rule=stopping, verbose=False),
            module=FisherAnalysisModule(
                task,
                allocation=allocation,
                options=options,
                dataset=dataset_record(dataset_dir if dataset_dir is not None else getattr(data, "dataset_dir", None)),
            ),
        )
    say_why_it_stopped(fisher_map)  # after the run: a rich bar still draws during on_fit_end
    if destination is not None:
        if trainer.is_global_zero:
            saved = save_keeping_previous(fisher_map, destination)
            if saved.note:
                rank_zero_info(saved.note)
            fisher_map = fisher_map.with_path(saved.path)
        else:
            fisher_map = fisher_map.with_path(destination)
        if trainer.world_size > 1:
            trainer.strategy.barrier("lightning_fisher.map_written")
    return fisher_map


def _run_analysis(
    task: pl.LightningModule,
    data: Union[pl.LightningDataModule, DataLoader],
    *,
    trainer: Optional[pl.Trainer],
    trainer_kwargs: Optional[dict[str, Any]],
    max_epochs: int,
    stability: FisherStability,
    module: FisherAnalysisModule,
) -> tuple[FisherMap, pl.Trainer]:
    if trainer is None:
        kwargs = {**TRAINER_DEFAULTS, "max_epochs": max_epochs, **(trainer_kwargs or {})}
        kwargs["callbacks"] = [stability, *list(kwargs.get("callbacks") or [])]
        trainer = pl.Trainer(**kwargs)
    elif trainer_kwargs:
        raise ValueError("analyze(): pass either trainer or trainer_kwargs, not both")
    else:
        trainer.callbacks.insert(0, stability)
    use_analysis_progress_bar(trainer)
    with warnings.catch_warnings(), _without_fit_stopped_line():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        if isinstance(data, pl.LightningDataModule):
            trainer.fit(module, datamodule=data)
        else:
            trainer.fit(module, train_dataloaders=data)
    if module.fisher_map is None:  # fit returned without finishing (e.g. interrupted)
        raise FisherAnalysisError(
            "the analysis did not finish: the Trainer returned before the analysis produced a map (check "
            "trainer_kwargs and callbacks that stop training or limit batches); nothing was written"
        )
    return module.fisher_map, trainer


class _FitStoppedFilter(logging.Filter):
    """Drops Lightning's "`Trainer.fit` stopped: `max_epochs=1` reached.": the analysis says why it ended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`Trainer.fit` stopped" not in record.getMessage()


@contextlib.contextmanager
def _without_fit_stopped_line() -> Iterator[None]:
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    quiet = _FitStoppedFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)

