"""The Fisher analysis as a LightningModule: wraps your module, reuses its ``training_step`` loss.

:class:`FisherAnalysisModule` runs under ``Trainer.fit`` so that progress bars, loggers,
devices and strategies (DDP included) come from Lightning. It never steps an optimizer and
never writes a weight: for the duration of the run it freezes every parameter of the wrapped
module (exact per-sample Fisher needs no weight gradients, which makes a batch cheaper than a
training step), installs the :class:`~lightning_fisher.collector.FisherCollector` hooks, and
swaps in the timestep focus; on teardown it restores all three, so the wrapped module comes
back bit-identical and trainable as before. That holds under every ``Trainer(precision=...)``:
a "true" precision (``bf16-true``, ``16-true``, ``64-true``) converts the whole module to that
dtype, so the task's own tensors are kept for the run and put back at the end (not copied:
they keep the memory they took before the run, beside the converted ones).

Per batch: your ``training_step(batch, batch_idx)`` gives the loss, one ``backward()`` gives
every candidate's per-sample Fisher values, and the running sums are all-reduced across
processes (one small tensor of a few numbers per module), so every rank sees the same scores
and takes the same stop decision. At the end, :attr:`FisherAnalysisModule.fisher_map` holds the
:class:`~lightning_fisher.FisherMap`.

Your ``training_step`` must return the loss (a tensor, or a dict with ``"loss"``) as the mean
of per-sample losses (declare ``loss_reduction="sum"`` for a sum), and must not step
optimizers itself. Its ``self.log`` calls work and land in the analysis run's logger.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn

from lightning_fisher.accumulator import FisherAccumulator
from lightning_fisher.allocation_settings import (
    ALLOCATION_OPTIONS,
    AllocationSettings,
    allocation_from_options,
    settings_or_options,
)
from lightning_fisher.candidates import select_candidates
from lightning_fisher.collector import FisherCollector
from lightning_fisher.errors import FisherAnalysisError
from lightning_fisher.fisher_map import (
    AnalysisRecord,
    DatasetRecord,
    FisherMap,
    StabilityRecord,
    TimestepFocusRecord,
)
from lightning_fisher.criteria import AnalysisStatistics, criterion_named
from lightning_fisher.stability import StopReason
from lightning_fisher.timesteps import RecordingTimestepSampler, TimestepFocus, timestep_focus_applied

__all__ = ["FisherAnalysisModule", "SCORE_DESCRIPTION"]

SCORE_DESCRIPTION = "empirical Fisher trace per parameter: mean over samples of |grad of sample loss|^2 / numel"


class FisherAnalysisModule(LightningModule):
    """Measure per-module Fisher scores of ``task``'s training loss and allocate LoRA ranks.

    Args:
        task: your LightningModule; its ``training_step`` provides the loss. Candidate names
            in the map are relative to it.
        include: name patterns of candidate modules (PEFT-style: a regex matching the full
            name or a dotted suffix); default every module of ``module_types``.
        exclude: name patterns to leave out (e.g. a freshly initialised head you train fully).
        module_types: candidate module classes; default ``(nn.Linear,)``.
        rank: base rank; median (``rank_mode="median"``) or flat-equivalent budget.
        rank_min: smallest rank of an adapted module.
        rank_max: largest rank of an adapted module.
        rank_mode: ``"median"`` or ``"budget"`` (see :func:`~lightning_fisher.allocate_ranks`).
        score_power: exponent of the score-to-rank rule.
        exclude_threshold: modules scoring below this fraction of the median get no adapter.
        criterion: how ranks follow from the analysis, a registered criterion's name
            (:mod:`lightning_fisher.criteria`): ``"trace"`` or ``"spectrum"``; it also says what
            the analysis gathers besides the trace and how it checks that it may stop.
        lora_alpha: alpha at the base rank recorded in the map; default ``2 * rank``.
        use_rslora: alpha policy recorded in the map.
        timestep_focus: ``balanced``, ``texture``, ``structure`` or ``"LO,HI"``; acts on a task
            that exposes ``timestep_sampler`` (see :mod:`lightning_fisher.timesteps`).
        loss_reduction: ``"mean"`` when the loss is the mean of per-sample losses, ``"sum"``
            for a sum.
        norm_strategy: how per-sample norms are computed; ``"auto"`` picks per layer.
        train_mode: run the task in train mode (dropout active, Fisher under sampled masks).
            Default ``False``: eval mode, the pretrained model's deterministic Fisher.
        seed: recorded in the map (seeding itself is done by :func:`~lightning_fisher.analyze`
            or by you, with ``lightning.seed_everything``).
        dataset: the analysed dataset folder, recorded in the map.
        allocation: the allocation options (``rank`` ... ``criterion``) as one
            :class:`~lightning_fisher.AllocationSettings`; then pass none of those.
    """

    @settings_or_options("allocation", AllocationSettings, ALLOCATION_OPTIONS)
    def __init__(
        self,
        task: LightningModule,
        *,
        include: Optional[Sequence[str]] = None,
        exclude: Sequence[str] = (),
        module_types: Optional[Sequence[type]] = None,
        rank: int = AllocationSettings.rank,
        rank_min: int = AllocationSettings.rank_min,
        rank_max: int = AllocationSettings.rank_max,
        rank_mode: Literal["median", "budget"] = AllocationSettings.mode,
        score_power: float = AllocationSettings.score_power,
        exclude_threshold: float = AllocationSettings.exclude_threshold,
        criterion: str = AllocationSettings.criterion,
        lora_alpha: Optional[float] = None,
        use_rslora: bool = False,
        timestep_focus: Union[str, TimestepFocus] = "balanced",
        loss_reduction: Literal["mean", "sum"] = "mean",
        norm_strategy: Literal["auto", "ghost", "materialize"] = "auto",
        train_mode: bool = False,
        seed: Optional[int] = None,
        dataset: Optional[DatasetRecord] = None,
        allocation: Optional[AllocationSettings] = None,
    ) -> None:
        super().__init__()
        if not isinstance(task, LightningModule):
            raise TypeError(f"task must be a LightningModule, got {type(task).__name__}")
        if not task.automatic_optimization:
            raise FisherAnalysisError(
                f"{type(task).__name__} uses manual optimization, so its training_step steps optimizers "
                "itself; the analysis needs a training_step that returns the loss"
            )
        #: The allocation settings (checked once, here, before anything runs).
        self.allocation = allocation_from_options(
            allocation, "FisherAnalysisModule", rank, rank_min, rank_max, rank_mode, score_power, exclude_threshold,
            criterion,
        )
        #: The criterion the settings name (what it gathers, how it stops and allocates).
        self.criterion = criterion_named(self.allocation.criterion)
        self.automatic_optimization = False
        self.task = task
        # DistributedDataParallel refuses a module without a trainable parameter, and the task is
        # frozen during the analysis: this scalar enters the loss times zero, so it changes no
        # gradient, and lets DDP wrap the module (its gradient is the only one DDP syncs).
        self.ddp_anchor = nn.Parameter(torch.zeros(()))
        self.alpha_policy = dict(lora_alpha=lora_alpha, use_rslora=use_rslora)
        self.timestep_focus = TimestepFocus.parse(timestep_focus)
        self.loss_reduction = loss_reduction
        self.train_mode = train_mode
        self.seed = seed
        self.dataset = dataset
        self.norm_strategy = norm_strategy
        self.candidate_selection = dict(include=include, exclude=exclude, module_types=module_types)
        #: Set up in :meth:`setup`: the hooks, this process's statistics, and the all-reduced
        #: statistics after the latest batch (the same on every process).
        self.collector: Optional[FisherCollector] = None
        self.accumulator: Optional[FisherAccumulator] = None
        self.global_accumulator: Optional[FisherAccumulator] = None
        #: What the criterion gathers besides the trace (``spectrum``: the mean gradients' spectra;
        #: ``None`` for ``trace``); this process's own, summed over processes at the end.
        self.statistics: Optional[AnalysisStatistics] = None
        #: Why the analysis ended; set by :class:`~lightning_fisher.FisherStability` or at the end.
        self.stop_reason: Optional[StopReason] = None
        #: The stability rule's record, set by :class:`~lightning_fisher.FisherStability`.
        self.stability: Optional[StabilityRecord] = None
        #: The result, available after ``Trainer.fit``.
        self.fisher_map: Optional[FisherMap] = None
        self._restore = contextlib.ExitStack()
        self._sampler: Optional[RecordingTimestepSampler] = None
        self._timestep_applied = False
        self._started = 0.0

    # ------------------------------------------------------------------ set-up and restore
    def setup(self, stage: str) -> None:
        if stage != "fit":
            raise FisherAnalysisError("FisherAnalysisModule runs under Trainer.fit only")
        self.task.setup(stage)  # the task may build layers or load weights here
        candidates = select_candidates(self.task, **self.candidate_selection)
        self.statistics = self.criterion.statistics(
            candidates, self.allocation, seed=self.seed or 0, loss_reduction=self.loss_reduction
        )
        self.collector = FisherCollector(
            self.task, candidates, loss_reduction=self.loss_reduction, norm_strategy=self.norm_strategy,
            observer=None if self.statistics is None else self.statistics.observe,
        )
        self.accumulator = FisherAccumulator(self.collector.names)
        self.global_accumulator = FisherAccumulator(self.collector.names)
        # Frozen before the strategy wraps the module (DDP inspects requires_grad when wrapping).
        flags = {name: p.requires_grad for name, p in self.task.named_parameters()}
        self._restore.callback(self._unfreeze, flags)
        for p in self.task.parameters():
            p.requires_grad_(False)
        self._restore.callback(self.task.train, self.task.training)

    def configure_model(self) -> None:
        # The strategy gives its device mesh (ModelParallelStrategy: FSDP2 / tensor parallel) to
        # the module it runs, this one; the task shards itself with it in its configure_model.
        self.task._device_mesh = self._device_mesh
        self.task.configure_model()
        # The last hook before the precision plugin converts the module (bf16-true and the like
        # cast every tensor): the task's own tensors are kept, to be put back at restore.
        self._restore.callback(_put_back, _tensors_of(self.task))

    def _unfreeze(self, flags: Mapping[str, bool]) -> None:
        for name, p in self.task.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))

    def on_fit_start(self) -> None:
        self._started = time.perf_counter()
        self._timestep_applied = hasattr(self.task, "timestep_sampler")
        self._sampler = self._restore.enter_context(timestep_focus_applied(self.task, self.timestep_focus))
        self._restore.enter_context(self.collector)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning puts the whole module in train mode when the fit loop starts.
        self.task.train(self.train_mode)

    def teardown(self, stage: str) -> None:
        self.restore_task()
        self.task.teardown(stage)

    def restore_task(self) -> None:
        """Undo everything the analysis did to the task: hooks, sampler, frozen weights, mode, dtype.

        Runs at teardown and, through :meth:`configure_callbacks`, when the run fails; safe to
        call more than once.
        """
        self._restore.close()

    def configure_callbacks(self) -> list[Callback]:
        # Lightning calls no LightningModule hook when fit fails, but callbacks see on_exception.
        return [_RestoreTaskOnException()]

    def configure_optimizers(self) -> None:
        """No optimizer: the analysis never changes a weight."""
        return None

    # ------------------------------------------------------------------ the batch
    def training_step(self, batch: Any, batch_idx: int) -> None:
        with self.collector.batch() as record, self._as_training_step_of_task():
            loss = _loss_from(self.task.training_step(batch, batch_idx), type(self.task).__name__)
            if not loss.requires_grad:
                raise FisherAnalysisError(
                    f"the loss of {type(self.task).__name__}.training_step does not depend on any candidate "
                    "module (it does not require grad). Likely cause: reentrant gradient checkpointing "
                    "(torch.utils.checkpoint with use_reentrant=True, or gradient_checkpointing_enable() with "
                    "it) around the forward, whose output needs no grad when its input needs none: use "
                    "use_reentrant=False. Otherwise check include/exclude and that the loss uses the model"
                )
            (loss + 0.0 * self.ddp_anchor).backward()
        self.accumulator.update(record.values, record.finite)
        state = self.accumulator.state_tensor(device=self.ddp_anchor.device)
        if self.trainer.world_size > 1:
            state = self.trainer.strategy.reduce(state, reduce_op="sum")
        self.global_accumulator.load_state_tensor(state)
        self._log_batch()

    def split_half_correlation(self) -> Optional[float]:
        """The stopping rule's agreement between the two sample halves after the latest batch.

        The criterion's own check (:meth:`~lightning_fisher.criteria.Criterion.split_half_correlation`):
        under ``"trace"`` the Spearman correlation of the halves' module scores, under
        ``"spectrum"`` that of the ranks the spectrum allocation gives each half. May be a
        collective under DDP (the spectrum's half sketches are summed over processes), so every
        process must call it.
        """
        return self.criterion.split_half_correlation(
            self.global_accumulator, self.statistics, self.allocation, self._sum_over_processes
        )

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.ddp_anchor.device)
        if self.trainer.world_size > 1:
            tensor = self.trainer.strategy.reduce(tensor, reduce_op="sum")
        return tensor

    def _log_batch(self) -> None:
        """Per batch, to the Trainer's logger: samples seen and a few figures of the running scores."""
        acc = self.global_accumulator
        self.log("fisher/samples", float(acc.num_samples), prog_bar=True, reduce_fx="max")
        if not acc.num_samples:  # every sample so far was non-finite: no score yet (later batches may have some)
            return
        scores = torch.tensor(list(acc.scores().values()), dtype=torch.float64)
        positive = scores[scores > 0]
        self.log_dict(
            {
                "fisher/skipped_samples": float(acc.num_skipped),
                "fisher/modules_with_gradient": float(positive.numel()),
                "fisher/score_median": float(positive.median()) if positive.numel() else 0.0,
                "fisher/score_max": float(scores.max()) if scores.numel() else 0.0,
                "fisher/score_max_over_median": float(positive.max() / positive.median()) if positive.numel() else 0.0,
            },
            reduce_fx="max",
        )

    @contextlib.contextmanager
    def _as_training_step_of_task(self):
        # Lightning lets a module call self.log only inside a hook it is running; mark the task's
        # training_step as such, as Lightning's own hook dispatch does for this module.
        previous = self.task._current_fx_name
        self.task._current_fx_name = "training_step"
        try:
            yield
        finally:
            self.task._current_fx_name = previous

    # ------------------------------------------------------------------ the result
    def on_train_end(self) -> None:
        if self.stop_reason is None:
            self.stop_reason = StopReason.DATA_EXHAUSTED
        if self.statistics is not None and self.trainer.world_size > 1:
            # Summed once, at the end: the stopping rule reads the (small) trace statistics per batch.
            self.statistics.load_state_tensor(self._sum_over_processes(self.statistics.state_tensor()))
        self.fisher_map = self.build_map()
        self._log_scores(self.fisher_map)
        silent = [name for name, score in self.fisher_map.scores.items() if score == 0.0]
        if silent:
            rank_zero_warn(
                f"{len(silent)} candidate module(s) received no gradient during the analysis and get no adapter: "
                f"{', '.join(silent[:5])}{', ...' if len(silent) > 5 else ''}. Either the loss does not use them, "
                "or their forward is never called (nn.MultiheadAttention applies out_proj's weights directly); "
                "exclude them from the candidates if that is expected"
            )

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
        analysis = AnalysisRecord(
            score=SCORE_DESCRIPTION,
            loss_reduction=self.loss_reduction,
            timestep_focus=focus,
            batches=acc.num_batches // max(1, self.trainer.world_size),
            samples=acc.num_samples,
            skipped_samples=acc.num_skipped,
            converged=reason is StopReason.CONVERGED,
            stop_reason=reason.value,
            seed=self.seed,
            stability=self.stability,
            world_size=self.trainer.world_size,
            seconds=round(time.perf_counter() - self._started, 3),
        )
        return FisherMap.from_scores(
            scores,
            self.task,
            score_stderr=stderr,
            analysis=analysis,
            dataset=self.dataset,
            allocation=self.allocation,
            **self.criterion.map_statistics(self.statistics),
            **self.alpha_policy,
        )

    @rank_zero_only
    def _log_scores(self, fisher_map: FisherMap) -> None:
        metrics = {f"fisher_score/{name}": score for name, score in fisher_map.scores.items()}
        metrics.update({f"fisher_rank/{name}": float(r) for name, r in fisher_map.ranks.items()})
        for logger in self.loggers:
            logger.log_metrics(metrics, step=fisher_map.analysis.batches if fisher_map.analysis else 0)


class _RestoreTaskOnException(Callback):
    def on_exception(self, trainer: Any, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(pl_module, FisherAnalysisModule):
            pl_module.restore_task()


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


def _loss_from(output: Any, task_name: str) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise FisherAnalysisError(
            f"{task_name}.training_step must return the loss as a scalar tensor or a dict with 'loss' "
            f"for the analysis, got {type(output).__name__}"
        )
    return loss.reshape(())
