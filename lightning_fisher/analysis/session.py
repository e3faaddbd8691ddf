"""One Fisher analysis of one model, batch by batch, in plain PyTorch.

:class:`AnalysisSession` is the analysis itself, whoever drives the loop: the plain loop of
:func:`~lightning_fisher.analyze` for any ``nn.Module`` (:mod:`lightning_fisher.analysis.plain_loop`),
or Lightning's ``Trainer`` through :class:`~lightning_fisher.FisherAnalysisModule`, a thin adapter
over it. Its life:

1. :meth:`~AnalysisSession.prepare`: select the candidate modules, set up what the criterion
   gathers besides the trace (:meth:`~lightning_fisher.allocation.criteria.Criterion.statistics`), the
   collector's hooks and the running sums, and freeze every parameter (exact per-sample Fisher
   needs no weight gradient, which makes a batch cheaper than a training step);
2. :meth:`~AnalysisSession.start`: swap in the timestep focus and install the hooks;
3. per batch, :meth:`~AnalysisSession.measure`: the loss, one ``backward()`` that gives every
   candidate's per-sample Fisher values, the values added to this process's sums, and the sums
   added over processes (one small tensor a batch), so every process holds the same statistics;
   then :meth:`~AnalysisSession.split_half_correlation` for the stopping rule (the criterion's
   own check, :mod:`lightning_fisher.analysis.stability`);
4. :meth:`~AnalysisSession.finish`: the criterion's statistics summed over processes once, and
   the :class:`~lightning_fisher.FisherMap`;
5. :meth:`~AnalysisSession.restore` (also on error): hooks removed, the model's own timestep
   sampler, ``requires_grad`` flags and train/eval mode put back. The session never steps an
   optimizer nor writes a weight, so the model comes back bit-identical and trainable as before.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from lightning_fisher.analysis.accumulator import FisherAccumulator
from lightning_fisher.analysis.options import AnalysisOptions
from lightning_fisher.allocation.settings import AllocationSettings
from lightning_fisher.analysis.candidates import select_candidates
from lightning_fisher.analysis.collector import FisherCollector
from lightning_fisher.allocation.criteria import AnalysisStatistics, criterion_named
from lightning_fisher.errors import FisherAnalysisError
from lightning_fisher.fisher_map.map import (
    AnalysisRecord,
    DatasetRecord,
    FisherMap,
    StabilityRecord,
    TimestepFocusRecord,
)
from lightning_fisher.analysis.processes import Processes, TorchProcesses
from lightning_fisher.analysis.stability import StabilityRule, StabilityTracker, StopReason, method_for
from lightning_fisher.analysis.timesteps import (
    TIMESTEP_SAMPLER_ATTRIBUTE,
    RecordingTimestepSampler,
    TimestepFocus,
    timestep_focus_applied,
)

__all__ = ["SCORE_DESCRIPTION", "AnalysisSession"]

SCORE_DESCRIPTION = "empirical Fisher trace per parameter: mean over samples of |grad of sample loss|^2 / numel"


class AnalysisSession:
    """Measure per-module Fisher statistics of ``model``'s loss, batch by batch, and build the map.

    Args:
        model: the model; candidate names in the map are relative to it.
        allocation: the allocation settings (they also name the criterion).
        options: what to analyse and record (candidates, timestep focus, loss reduction, mode,
            seed, alpha policy): :class:`~lightning_fisher.analysis.options.AnalysisOptions`;
            the seed seeds the spectrum's sketches here (seeding the run is the runner's).
        timestep_sampler: the sampler the loss draws timesteps through, when the model has no
            ``timestep_sampler`` of its own (or to use another for the analysis): it is the
            model's ``timestep_sampler`` for the run, focused, and removed afterwards.
        norm_strategy: how per-sample norms are computed; ``"auto"`` picks per layer.
        dataset: the analysed dataset folder, recorded in the map.
        processes: the processes the analysis runs in; default :class:`TorchProcesses` (the
            ``torch.distributed`` group when one is initialised, else this process alone).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        allocation: AllocationSettings,
        options: Optional[AnalysisOptions] = None,
        timestep_sampler: Optional[Callable[..., torch.Tensor]] = None,
        norm_strategy: Literal["auto", "ghost", "materialize"] = "auto",
        dataset: Optional[DatasetRecord] = None,
        processes: Optional[Processes] = None,
    ) -> None:
        if timestep_sampler is not None and not callable(timestep_sampler):
            raise TypeError(
                f"timestep_sampler must be callable (batch_size, device) -> Tensor, got {type(timestep_sampler).__name__}"
            )
        self.model = model
        self.allocation = allocation
        #: The criterion the settings name (what it gathers, how it stops and allocates).
        self.criterion = criterion_named(allocation.criterion)
        self.options = options if options is not None else AnalysisOptions()
        if not isinstance(self.options, AnalysisOptions):
            raise TypeError(f"options must be an AnalysisOptions, got {type(self.options).__name__}")
        self.candidate_selection = self.options.candidate_selection
        self.alpha_policy = dict(lora_alpha=self.options.lora_alpha, use_rslora=self.options.use_rslora)
        self.timestep_focus: TimestepFocus = self.options.timestep_focus
        self.timestep_sampler = timestep_sampler
        self.loss_reduction = self.options.loss_reduction
        self.norm_strategy = norm_strategy
        self.train_mode = self.options.train_mode
        self.seed = self.options.seed
        self.dataset = dataset
        self.processes: Processes = processes if processes is not None else TorchProcesses(_device_of(model))
        #: Set up by :meth:`prepare`: the hooks, this process's running sums, and the sums over
        #: every process after the latest batch (the same on every process).
        self.collector: Optional[FisherCollector] = None
        self.accumulator: Optional[FisherAccumulator] = None
        self.global_accumulator: Optional[FisherAccumulator] = None
        #: What the criterion gathers besides the trace (``None`` for ``trace``); this process's
        #: own until :meth:`finish` sums it over processes.
        self.statistics: Optional[AnalysisStatistics] = None
        #: Why the analysis ended (set by whoever runs the stopping rule, or by :meth:`finish`).
        self.stop_reason: Optional[StopReason] = None
        #: The stopping rule's record after the latest batch (:meth:`record_stability`).
        self.stability: Optional[StabilityRecord] = None
        self._restore = contextlib.ExitStack()
        self._sampler: Optional[RecordingTimestepSampler] = None
        self._timestep_applied = False
        self._started = 0.0

    # ------------------------------------------------------------------ set-up and restore
    def prepare(self) -> None:
        """Candidates, statistics, hooks (not yet installed) and running sums; every parameter frozen.

        Freezes before a distributed wrapper would see the model (DDP reads ``requires_grad``
        when it wraps); the flags and the train/eval mode are put back by :meth:`restore`.
        """
        candidates = select_candidates(self.model, **self.candidate_selection)
        self.statistics = self.criterion.statistics(
            candidates, self.allocation, seed=self.seed or 0, loss_reduction=self.loss_reduction
        )
        self.collector = FisherCollector(
            self.model, candidates, loss_reduction=self.loss_reduction, norm_strategy=self.norm_strategy,
            observer=None if self.statistics is None else self.statistics.observe,
        )
        self.accumulator = FisherAccumulator(self.collector.names)
        self.global_accumulator = FisherAccumulator(self.collector.names)
        flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        self._restore.callback(self._unfreeze, flags)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._restore.callback(self.model.train, self.model.training)

    def _unfreeze(self, flags: Mapping[str, bool]) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))

    def keep_tensors(self) -> None:
        """Keep the model's own parameter and buffer tensors, to be put back by :meth:`restore`.

        For a runner that converts the whole model to another dtype for the run (Lightning's
        "true" precisions): the originals keep their memory beside the converted ones.
        """
        self._restore.callback(_put_back, _tensors_of(self.model))

    def start(self, *, set_mode: bool = True) -> None:
        """Eval (or train) mode, swap in the timestep focus, install the hooks and start the clock.

        Args:
            set_mode: put the model in the analysis' mode now; a runner that sets it before
                every batch itself (Lightning's fit loop puts the module in train mode when it
                starts, and warns about modules found in eval mode) passes ``False``.
        """
        if set_mode:
            self.set_mode()
        self._started = time.perf_counter()
        if self.timestep_sampler is not None:
            self._restore.enter_context(_attribute_set(self.model, TIMESTEP_SAMPLER_ATTRIBUTE, self.timestep_sampler))
        self._timestep_applied = hasattr(self.model, TIMESTEP_SAMPLER_ATTRIBUTE)
        self._sampler = self._restore.enter_context(timestep_focus_applied(self.model, self.timestep_focus))
        self._restore.enter_context(self.collector)

    def restore(self) -> None:
        """Undo everything the analysis did to the model: hooks, sampler, frozen weights, mode, dtype.

        Safe to call more than once.
        """
        self._restore.close()

    def __enter__(self) -> "AnalysisSession":
        try:
            self.prepare()
            self.start()
        except BaseException:
            self.restore()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def set_mode(self) -> None:
        """Eval mode, or train mode with ``train_mode=True`` (a runner may have changed it)."""
        self.model.train(self.train_mode)

    # ------------------------------------------------------------------ the batch
    def measure(
        self,
        compute_loss: Callable[[], Any],
        *,
        source: str,
        backward: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> None:
        """One batch: the loss, its backward, the per-sample values added to the sums over processes.

        Args:
            compute_loss: runs the forward pass and returns the batch's loss, a scalar tensor
                (the mean or sum over samples, as ``loss_reduction`` says).
            source: what computes the loss, for messages (``"loss_fn(model, batch)"``,
                ``"MyTask.training_step"``).
            backward: how to run backward from the loss; default ``loss.backward()``.

        Raises:
            FisherAnalysisError: the loss is not a scalar tensor, or does not depend on any
                candidate (needs no grad).
        """
        with self.collector.batch() as record:
            loss = checked_loss(compute_loss(), source)
            (backward or torch.Tensor.backward)(loss)
        self.accumulator.update(record.values, record.finite)
        self.global_accumulator.load_state_tensor(self.processes.sum(self.accumulator.state_tensor()))

    def split_half_correlation(self) -> Optional[float]:
        """The stopping rule's agreement between the two sample halves after the latest batch.

        The criterion's own check (:meth:`~lightning_fisher.allocation.criteria.Criterion.split_half_correlation`).
        May be a collective across processes, so every process must call it.
        """
        return self.criterion.split_half_correlation(
            self.global_accumulator, self.statistics, self.allocation, self.processes.sum
        )

    def record_stability(self, rule: StabilityRule, tracker: StabilityTracker) -> StabilityRecord:
        """The stopping rule's state as the map records it; kept as :attr:`stability`."""
        self.stability = StabilityRecord(
            method=method_for(self.allocation.criterion),
            threshold=float(rule.threshold),
            patience=rule.patience,
            last_correlation=tracker.last_correlation,
            min_batches=rule.min_batches,
            max_batches=rule.max_batches,
            history=tuple(tracker.history),
        )
        return self.stability

    def batch_metrics(self) -> dict[str, float]:
        """A few figures of the running scores, for a logger (samples only, before any finite one)."""
        acc = self.global_accumulator
        metrics = {"fisher/samples": float(acc.num_samples)}
        if not acc.num_samples:
            return metrics
        scores = torch.tensor(list(acc.scores().values()), dtype=torch.float64)
        positive = scores[scores > 0]
        metrics.update({
            "fisher/skipped_samples": float(acc.num_skipped),
            "fisher/modules_with_gradient": float(positive.numel()),
            "fisher/score_median": float(positive.median()) if positive.numel() else 0.0,
            "fisher/score_max": float(scores.max()) if scores.numel() else 0.0,
            "fisher/score_max_over_median": float(positive.max() / positive.median()) if positive.numel() else 0.0,
        })
        return metrics

    # ------------------------------------------------------------------ the result
    def finish(self) -> FisherMap:
        """Sum the criterion's statistics over processes (once, a collective) and build the map."""
        if self.stop_reason is None:
            self.stop_reason = StopReason.DATA_EXHAUSTED
        if self.statistics is not None and self.processes.world_size > 1:
            # Summed once, at the end: the stopping rule reads the (small) trace statistics per batch.
            self.statistics.load_state_tensor(self.processes.sum(self.statistics.state_tensor()))
        return self.build_map()

    def build_map(self) -> FisherMap:
        """The map from the statistics gathered so far (all processes)."""
        acc = self.global_accumulator
        scores = acc.scores()
        # fewer than two samples leave the spread unknown (nan): recorded as null
        stderr = {name: (v if math.isfinite(v) else None) for name, v in acc.stderr().items()}
        observed = None if self._sampler is None else self._sampler.observed_range
        focus = TimestepFocusRecord.of(
            self.timestep_focus,
            applied=self._timestep_applied,
            observed_range=None if observed is None else (max(0.0, observed[0]), min(1.0, observed[1])),
        )
        reason = self.stop_reason or StopReason.INTERRUPTED
        world_size = self.processes.world_size
        analysis = AnalysisRecord(
            score=SCORE_DESCRIPTION,
            loss_reduction=self.loss_reduction,
            timestep_focus=focus,
            batches=acc.num_batches // max(1, world_size),
            samples=acc.num_samples,
            skipped_samples=acc.num_skipped,
            converged=reason is StopReason.CONVERGED,
            stop_reason=reason.value,
            seed=self.seed,
            stability=self.stability,
            world_size=world_size,
            seconds=round(time.perf_counter() - self._started, 3),
        )
        return FisherMap.from_scores(
            scores,
            self.model,
            score_stderr=stderr,
            analysis=analysis,
            dataset=self.dataset,
            allocation=self.allocation,
            **self.criterion.map_statistics(self.statistics),
            **self.alpha_policy,
        )


def map_metrics(fisher_map: FisherMap) -> dict[str, float]:
    """Every module's score and rank, for a logger at the end of the analysis."""
    metrics = {f"fisher_score/{name}": score for name, score in fisher_map.scores.items()}
    metrics.update({f"fisher_rank/{name}": float(r) for name, r in fisher_map.ranks.items()})
    return metrics


def no_gradient_note(fisher_map: FisherMap) -> Optional[str]:
    """The warning for candidates that received no gradient (they get no adapter); ``None`` if none."""
    silent = [name for name, score in fisher_map.scores.items() if score == 0.0]
    if not silent:
        return None
    return (
        f"{len(silent)} candidate module(s) received no gradient during the analysis and get no adapter: "
        f"{', '.join(silent[:5])}{', ...' if len(silent) > 5 else ''}. Either the loss does not use them, "
        "or their forward is never called (nn.MultiheadAttention applies out_proj's weights directly); "
        "exclude them from the candidates if that is expected"
    )


def checked_loss(loss: Any, source: str) -> torch.Tensor:
    """``loss`` as a 0-d tensor that requires grad, or a :class:`FisherAnalysisError` saying what is wrong."""
    if not isinstance(loss, torch.Tensor):
        raise FisherAnalysisError(
            f"{source} must return the loss as a scalar tensor, got {type(loss).__name__}"
        )
    if loss.numel() != 1:
        raise FisherAnalysisError(
            f"{source} must return the batch's loss as a scalar tensor, got a tensor of shape {list(loss.shape)}: "
            "reduce the per-sample losses with .mean() (loss_reduction='mean', the default) or .sum() "
            "(loss_reduction='sum')"
        )
    if not loss.requires_grad:
        raise FisherAnalysisError(
            f"the loss of {source} does not depend on any candidate module (it does not require grad). "
            "Likely cause: reentrant gradient checkpointing (torch.utils.checkpoint with use_reentrant=True, or "
            "gradient_checkpointing_enable() with it) around the forward, whose output needs no grad when its "
            "input needs none: use use_reentrant=False. Otherwise check that the loss is not computed under "
            "torch.no_grad() or detached (.detach(), .item(), a new tensor), include/exclude, and that the loss "
            "uses the model"
        )
    return loss.reshape(())


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def _attribute_set(owner: Any, name: str, value: Any):
    missing = object()
    previous = getattr(owner, name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if previous is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)


_Kept = list[tuple[nn.Module, str, bool, torch.Tensor]]


def _tensors_of(module: nn.Module) -> _Kept:
    """Every parameter's and buffer's tensor, with the module and key that hold it."""
    kept: _Kept = []
    for owner in module.modules():
        kept += [(owner, key, True, p.data) for key, p in owner._parameters.items() if p is not None]
        kept += [(owner, key, False, b) for key, b in owner._buffers.items() if b is not None]
    return kept


def _put_back(kept: _Kept) -> None:
    # Module.to() swaps a parameter's .data (the Parameter object, its requires_grad and any
    # optimizer reference stay) and replaces a buffer; undo exactly that.
    for owner, key, is_parameter, tensor in kept:
        if is_parameter:
            param = owner._parameters.get(key)
            if param is not None and not _same_tensor(param.data, tensor):
                param.data = tensor
        elif owner._buffers.get(key) is not None and not _same_tensor(owner._buffers[key], tensor):
            owner._buffers[key] = tensor


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape
