"""``analyze()``: the whole pre-fit stage in one call, for any model and training loop.

One entry point, two runners of the same analysis
(:class:`~lightning_fisher.analysis.session.AnalysisSession`):

* a LightningModule without ``loss_fn``: its ``training_step`` gives the loss, under a fresh
  ``Trainer`` (:func:`lightning_fisher.training.analyze.analyze_with_trainer`; devices, strategies, loggers and the
  progress bar from Lightning);
* any other ``nn.Module`` (a Hugging Face model, a diffusers model, a plain ``nn.Sequential``),
  or a LightningModule given a ``loss_fn``: a plain loop (:mod:`lightning_fisher.analysis.plain_loop`),
  which imports no Lightning.

This module imports no Lightning, so ``from lightning_fisher import analyze`` loads none; the
Trainer path is imported when given a LightningModule (which means Lightning is loaded already).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn

from lightning_fisher.allocation.settings import (
    ALLOCATION_OPTIONS,
    AllocationSettings,
    allocation_from_options,
    other_spellings,
    resolve_settings,
    settings_or_options,
)
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.analysis.options import ANALYSIS_OPTIONS, AnalysisOptions, options_from
from lightning_fisher.analysis.plain_loop import analyze_plain
from lightning_fisher.analysis.stability import STOPPING_OPTIONS, StabilityRule
from lightning_fisher.analysis.timesteps import TimestepFocus

__all__ = ["analyze"]


@other_spellings(mode="rank_mode", patience="convergence_patience", threshold="stability_threshold")
@settings_or_options("allocation", AllocationSettings, ALLOCATION_OPTIONS)
@settings_or_options("stopping", StabilityRule, STOPPING_OPTIONS)
@settings_or_options("options", AnalysisOptions, ANALYSIS_OPTIONS)
def analyze(
    model: nn.Module,
    data: Any,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    *,
    dataset_dir: Union[str, os.PathLike, None] = None,
    output: Union[str, os.PathLike, None] = None,
    rank: int = AllocationSettings.rank,
    rank_min: int = AllocationSettings.rank_min,
    rank_max: int = AllocationSettings.rank_max,
    rank_mode: Literal["median", "budget"] = AllocationSettings.mode,
    timestep_focus: Union[str, TimestepFocus] = AnalysisOptions.timestep_focus,
    timestep_sampler: Optional[Callable[..., torch.Tensor]] = None,
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
    logger: Any = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
    trainer: Any = None,
    allocation: Optional[AllocationSettings] = None,
    stopping: Optional[StabilityRule] = None,
    options: Optional[AnalysisOptions] = None,
) -> FisherMap:
    """Analyse ``model`` on ``data`` and return (and, given a folder, write) the fisher map.

    The model's weights, ``requires_grad`` flags and train/eval mode come back as they were.

    Args:
        model: the model. A LightningModule without ``loss_fn`` is analysed through its
            ``training_step`` under a Lightning ``Trainer``; any other ``nn.Module`` (or a
            LightningModule with ``loss_fn``) in a plain loop, without Lightning.
        data: a LightningDataModule (its ``train_dataloader``), a DataLoader, or any
            re-iterable of batches (a list of batches; a generator gives one pass only).
        loss_fn: ``loss_fn(model, batch) -> loss``, the batch's loss as a scalar tensor (the
            mean over its samples, or the sum with ``loss_reduction="sum"``). Default: a
            LightningModule's ``training_step``; for any other model its own loss,
            ``model(**batch).loss`` (Hugging Face models given dict batches with ``labels``).
            Batches are moved to the model's device first.
        dataset_dir: folder to write ``fisher_map.json`` into and to fingerprint; default the
            datamodule's ``dataset_dir`` attribute when it has one. With neither (and no
            ``output``) nothing is written.
        output: explicit map file or folder, overriding the dataset folder as destination.
            A map already at the destination is kept as ``fisher_map.json.bak`` and the ranks
            that changed are logged.
        rank: base rank (median, or flat-equivalent with ``rank_mode="budget"``).
        rank_min: smallest rank of an adapted module.
        rank_max: largest rank of an adapted module.
        rank_mode: ``"median"`` or ``"budget"``.
        timestep_focus: ``balanced``, ``texture``, ``structure`` or ``"LO,HI"``; acts on the
            model's ``timestep_sampler`` (see :mod:`lightning_fisher.analysis.timesteps`).
        timestep_sampler: plain loop only: the sampler to install as the model's
            ``timestep_sampler`` for the run (focused; removed afterwards), for a model that
            has none; your ``loss_fn`` draws ``model.timestep_sampler(batch_size, device)``.
        convergence_patience: stable batches before stopping.
        stability_threshold: split-half Spearman correlation counted as stable.
        min_batches: never stop before this many batches. In the plain loop, data that runs
            out before it is an error (the Trainer path writes a map marked not converged).
        max_batches: stop after this many batches regardless (``None``: when data runs out).
        max_epochs: passes over the data at most (more than one helps only when the loss is
            random, e.g. diffusion noise and timesteps).
        seed: seeds sample order, noise and timesteps; ``None`` leaves the random state alone.
            The caller's random streams are put back afterwards either way.
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
        logger: a logger with ``log_metrics(metrics, step)`` (Lightning's and Fabric's loggers):
            per batch the running figures, at the end every module's score and rank.
        trainer_kwargs: Trainer path only: extra ``Trainer`` arguments (``accelerator``,
            ``devices``, ``strategy="ddp"``, ``callbacks``, ``precision``, ...).
        trainer: Trainer path only: a ready ``Trainer`` instead (give it
            ``enable_checkpointing=False``); exclusive with ``trainer_kwargs``.
        allocation: the allocation options (``rank`` ... ``criterion``) as one
            :class:`~lightning_fisher.AllocationSettings`; then pass none of those.
        stopping: the stopping options (``convergence_patience``, ``stability_threshold``,
            ``min_batches``, ``max_batches``) as one :class:`~lightning_fisher.StabilityRule`;
            then pass none of those.
        options: the analysis options (``include``, ``exclude``, ``module_types``,
            ``timestep_focus``, ``loss_reduction``, ``train_mode``, ``seed``, ``lora_alpha``,
            ``use_rslora``) as one :class:`~lightning_fisher.AnalysisOptions`; then pass none
            of those.

    Returns:
        The map (on every process under DDP / ``torch.distributed``; only rank zero writes it).

    Raises:
        FisherMapWriteError: the destination is not writable (checked before analysing).
        FisherAnalysisError: no usable loss or gradients (a model output without loss and no
            ``loss_fn``, a loss that is not a scalar or needs no grad), the data ran out before
            ``min_batches`` (plain loop), or the Trainer stopped before the analysis finished.
        ValueError: an option of the other path (``trainer``, ``trainer_kwargs`` in the plain
            loop; ``timestep_sampler`` on the Trainer path).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"analyze(): model must be an nn.Module (or a LightningModule), got {type(model).__name__}")
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
    common = dict(
        dataset_dir=dataset_dir, output=output, max_epochs=max_epochs, allocation=allocation, stopping=stopping,
        options=options,
    )
    if loss_fn is None and _is_lightning_module(model):
        if timestep_sampler is not None:
            raise ValueError(
                f"analyze(): timestep_sampler is for models without a sampler of their own; {type(model).__name__} "
                "is a LightningModule: set self.timestep_sampler in it (see lightning_fisher.analysis.timesteps)"
            )
        if logger is not None:
            if trainer is not None:
                raise ValueError("analyze(): pass the logger to your trainer, not beside it")
            trainer_kwargs = {**(trainer_kwargs or {}), "logger": logger}
        from lightning_fisher.training.analyze import analyze_with_trainer

        return analyze_with_trainer(model, data, trainer_kwargs=trainer_kwargs, trainer=trainer, **common)
    if trainer is not None or trainer_kwargs:
        raise ValueError(
            f"analyze(): trainer and trainer_kwargs apply to a LightningModule analysed through its training_step; "
            f"{type(model).__name__} is analysed in a plain loop"
            + (" (loss_fn was given)" if loss_fn is not None else "")
            + ": leave them out (the plain loop runs on the model's device, under torch.distributed when initialised)"
        )
    return analyze_plain(model, data, loss_fn, timestep_sampler=timestep_sampler, logger=logger, **common)


def _is_lightning_module(model: Any) -> bool:
    # A LightningModule exists only once Lightning is imported: look, without importing it.
    pytorch = sys.modules.get("lightning.pytorch")
    return pytorch is not None and isinstance(model, pytorch.LightningModule)
