"""The analysis of any ``nn.Module`` in a plain loop: no Trainer, no Lightning import.

What :func:`~lightning_fisher.analyze` runs for a model that is not a LightningModule (or is
one, given a ``loss_fn``): the same :class:`~lightning_fisher.analysis.session.AnalysisSession`
as the Trainer path, driven batch by batch with the same stopping rule
(:class:`~lightning_fisher.StabilityTracker`), the same seeding, map file, ``.bak`` of a previous
map and closing line. Per batch::

    loss = loss_fn(model, batch)        # default: model(**batch).loss (Hugging Face, given labels)
    loss.backward()                     # inside the collector: per-sample Fisher of every candidate
    sums over processes                 # all_reduce under torch.distributed, else nothing
    split-half check                    # the criterion's own; stop when stable for `patience` batches

Under an initialised ``torch.distributed`` process group (Lightning Fabric's ``launch``,
``torchrun``, accelerate) every process analyses the batches it is given (shard them, e.g. with
a ``DistributedSampler`` or ``fabric.setup_dataloaders``); the sums go through ``all_reduce``, so
every process holds the same statistics and takes the same decision at the same batch, and a
process whose batches run out ends the pass for all. Only rank 0 writes the map.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from lightning_fisher.allocation.settings import AllocationSettings
from lightning_fisher.analysis.files import check_writable, dataset_record, map_destination, seeded_run
from lightning_fisher.analysis.session import AnalysisSession, map_metrics, no_gradient_note
from lightning_fisher.errors import FisherAnalysisError
from lightning_fisher.fisher_map.backup import save_keeping_previous
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.fisher_map.summary import stop_line
from lightning_fisher.analysis.processes import TorchProcesses, info_on_rank_zero, is_global_zero, warn_on_rank_zero
from lightning_fisher.analysis.stability import StabilityRule, StabilityTracker, StopReason
from lightning_fisher.analysis.options import AnalysisOptions

__all__ = ["LossFn", "analyze_plain", "model_output_loss"]

#: ``loss_fn(model, batch) -> loss``: the batch's loss, a scalar tensor (mean or sum over samples).
LossFn = Callable[[nn.Module, Any], torch.Tensor]


def model_output_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's own loss: ``model(**batch).loss`` (a Hugging Face model computes it given ``labels``).

    Raises:
        FisherAnalysisError: the batch is not a dict, or the output has no loss; the message
            says to pass ``loss_fn``.
    """
    name = type(model).__name__
    if not isinstance(batch, Mapping):
        raise FisherAnalysisError(
            f"{name} is not a LightningModule and no loss_fn was given, so the analysis calls model(**batch) and "
            f"reads the output's .loss, which needs dict batches (got a {type(batch).__name__}). Pass "
            "loss_fn=lambda model, batch: ... returning the batch's loss (the mean over its samples)"
        )
    output = model(**batch)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise FisherAnalysisError(
            f"{name}'s output ({type(output).__name__}) has no loss, and no loss_fn was given. A Hugging Face "
            "model computes its loss only when the batch holds labels (add 'labels' to each batch); for any "
            "other model pass loss_fn=lambda model, batch: ... returning the batch's loss (the mean over its samples)"
        )
    return loss


def analyze_plain(
    model: nn.Module,
    data: Any,
    loss_fn: Optional[LossFn] = None,
    *,
    allocation: AllocationSettings,
    stopping: StabilityRule,
    options: AnalysisOptions,
    timestep_sampler: Optional[Callable[..., torch.Tensor]] = None,
    max_epochs: int = 1,
    dataset_dir: Union[str, os.PathLike, None] = None,
    output: Union[str, os.PathLike, None] = None,
    logger: Any = None,
) -> FisherMap:
    """Analyse ``model`` on ``data`` in a plain loop; return (and, given a destination, write) the map.

    Called by :func:`~lightning_fisher.analyze`, which parses and checks the settings; the
    arguments mean what they mean there.

    Raises:
        FisherAnalysisError: no usable loss, or the data ran out before ``min_batches``.
        FisherMapWriteError: the destination is not writable (checked before analysing).
    """
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"max_epochs must be a positive integer, got {max_epochs!r}")
    destination = map_destination(data, dataset_dir, output)
    if destination is not None:
        check_writable(destination)
    device = _device_of(model)
    processes = TorchProcesses(device)
    source = "loss_fn(model, batch)" if loss_fn is not None else f"{type(model).__name__}(**batch).loss"
    loss_fn = loss_fn or model_output_loss
    session = AnalysisSession(
        model,
        allocation=allocation,
        options=options,
        timestep_sampler=timestep_sampler,
        dataset=dataset_record(dataset_dir if dataset_dir is not None else getattr(data, "dataset_dir", None)),
        processes=processes,
    )
    tracker = StabilityTracker(stopping)
    with seeded_run(options.seed):
        batches = _batches_of(data, processes)  # seeded too: a datamodule may split or shuffle in setup
        with session:
            session.record_stability(stopping, tracker)
            for _ in range(max_epochs):
                iterator = iter(batches)
                while session.stop_reason is None:
                    batch = next(iterator, _END)
                    # every process takes the next batch, or none does (a collective must not wait alone)
                    if not processes.all(batch is not _END):
                        break
                    batch = _to_device(batch, device)
                    session.set_mode()
                    session.measure(lambda: loss_fn(model, batch), source=source)
                    correlation = session.split_half_correlation()
                    reason = tracker.update(correlation)
                    session.record_stability(stopping, tracker)
                    _log(logger, _batch_metrics(session, correlation, tracker), tracker.batches - 1)
                    if processes.any(reason is not None):
                        session.stop_reason = reason or StopReason.CONVERGED
                if session.stop_reason is not None:
                    break
            if session.stop_reason is None and tracker.batches < max(1, stopping.min_batches):
                raise FisherAnalysisError(_too_few_batches(tracker.batches, session, stopping, max_epochs))
            fisher_map = session.finish()
    _log(logger, map_metrics(fisher_map), fisher_map.analysis.batches)
    note = no_gradient_note(fisher_map)
    if note is not None:
        warn_on_rank_zero(note)
    if fisher_map.analysis.converged:
        info_on_rank_zero(stop_line(fisher_map))
    else:
        warn_on_rank_zero(stop_line(fisher_map))
    if destination is not None:
        if is_global_zero():
            saved = save_keeping_previous(fisher_map, destination)
            fisher_map = fisher_map.with_path(saved.path)
            if saved.note is not None:
                info_on_rank_zero(saved.note)
        else:
            fisher_map = fisher_map.with_path(destination)
        processes.barrier()
    return fisher_map


_END = object()


def _batches_of(data: Any, processes: TorchProcesses) -> Iterable:
    """The batches: a datamodule's ``train_dataloader()``, else ``data`` itself (a DataLoader, a list...)."""
    if callable(getattr(data, "train_dataloader", None)):  # a LightningDataModule, used without importing Lightning
        if is_global_zero() and callable(getattr(data, "prepare_data", None)):
            data.prepare_data()
        processes.barrier()
        if callable(getattr(data, "setup", None)):
            data.setup("fit")
        return data.train_dataloader()
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a LightningDataModule, a DataLoader or an iterable of batches, got {type(data).__name__}"
        )
    return data


def _too_few_batches(seen: int, session: AnalysisSession, stopping: StabilityRule, max_epochs: int) -> str:
    samples = session.global_accumulator.samples_seen if session.global_accumulator is not None else 0
    needed = max(1, stopping.min_batches)
    lower = f"lower min_batches (min_batches={seen} accepts this data)" if seen else "check that the data is not empty"
    world_size = session.processes.world_size
    where = f" per process ({samples} samples over {world_size} processes)" if world_size > 1 else f" ({samples} samples)"
    return (
        f"the data ran out after {seen} batch(es){where} in {max_epochs} epoch(s), before "
        f"min_batches={needed}: the stopping rule needs at least {needed} batches to judge whether the module "
        f"ranking is stable. Give more batches (more data or smaller batches), raise max_epochs (when the loss "
        f"is random, e.g. diffusion noise and timesteps), or {lower}; nothing was written. A one-pass iterator "
        "(a generator) gives its batches once: pass a list or a DataLoader for max_epochs > 1"
    )


def _batch_metrics(session: AnalysisSession, correlation: Optional[float], tracker: StabilityTracker) -> dict:
    metrics = session.batch_metrics()
    if correlation is not None:
        metrics["fisher/split_half_spearman"] = correlation
    metrics["fisher/stable_batches"] = float(tracker.stable_batches)
    return metrics


def _log(logger: Any, metrics: dict, step: int) -> None:
    """To a logger with ``log_metrics(metrics, step)`` (Lightning's and Fabric's loggers), on rank zero."""
    if logger is None or not is_global_zero():
        return
    logger.log_metrics(metrics, step=step)
    if callable(getattr(logger, "save", None)):
        logger.save()


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    """The batch's tensors on the model's device (tensors, dicts, lists, tuples, ``BatchEncoding``)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {key: _to_device(value, device) for key, value in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch
