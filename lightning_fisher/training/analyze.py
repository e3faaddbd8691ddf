"""The Trainer path of ``analyze()``: a LightningModule analysed through its ``training_step``.

:func:`lightning_fisher.analyze` (:mod:`lightning_fisher.analysis.entry`; importable from here
as ``analyze`` too, its older home) sends a LightningModule given without ``loss_fn`` to
:func:`analyze_with_trainer`; any other model goes to the plain loop
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
from collections.abc import Iterator
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_fisher.allocation.settings import AllocationSettings
from lightning_fisher.analysis.entry import analyze
from lightning_fisher.analysis.options import AnalysisOptions
from lightning_fisher.analysis.files import check_writable, dataset_record, map_destination, seeded_run
from lightning_fisher.errors import FisherAnalysisError
from lightning_fisher.fisher_map.backup import BACKUP_SUFFIX, save_keeping_previous
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.analysis.stability import StabilityRule
from lightning_fisher.training.analysis_module import FisherAnalysisModule
from lightning_fisher.training.defaults import TRAINER_DEFAULTS
from lightning_fisher.training.analysis_progress import use_analysis_progress_bar
from lightning_fisher.training.stability_callback import FisherStability, say_why_it_stopped

__all__ = ["BACKUP_SUFFIX", "analyze", "analyze_with_trainer", "map_destination"]

# Lightning's advice that does not apply to a run that trains nothing.
_QUIET = (
    r".*configure_optimizers.* returned `None`.*",
    r".*does not have many workers.*",
    r".*smaller than the logging interval.*",
    r".*You defined a `validation_step` but have no `val_dataloader`.*",
    r".*You passed in a `val_dataloader` but have no `validation_step`.*",
)


def analyze_with_trainer(
    task: pl.LightningModule,
    data: Union[pl.LightningDataModule, DataLoader],
    *,
    allocation: AllocationSettings,
    stopping: StabilityRule,
    options: AnalysisOptions,
    max_epochs: int = 1,
    dataset_dir: Union[str, os.PathLike, None] = None,
    output: Union[str, os.PathLike, None] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
    trainer: Optional[pl.Trainer] = None,
) -> FisherMap:
    """Analyse ``task`` through its ``training_step`` under a ``Trainer``; return (and, given a destination, write) the map.

    Called by :func:`~lightning_fisher.analyze`, which parses and checks the settings; the
    arguments mean what they mean there. Runs :class:`FisherAnalysisModule` under a fresh
    ``Trainer`` (:data:`~lightning_fisher.training.defaults.TRAINER_DEFAULTS` and
    ``trainer_kwargs``), or under ``trainer``, with a :class:`FisherStability` callback.

    Raises:
        FisherMapWriteError: the destination is not writable (checked before analysing).
        FisherAnalysisError: no usable loss or gradients, or the Trainer stopped before the analysis finished.
    """
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

