"""The Fisher analysis as a LightningModule: wraps your module, reuses its ``training_step`` loss.

:class:`FisherAnalysisModule` runs under ``Trainer.fit`` so that progress bars, loggers,
devices and strategies (DDP included) come from Lightning. It is a thin adapter: the analysis
itself is :class:`~lightning_fisher.analysis.session.AnalysisSession` (plain PyTorch, also what
:func:`~lightning_fisher.analyze` runs for a model that is not a LightningModule); this module
maps Lightning's hooks onto its steps. It never steps an optimizer and
never writes a weight: for the duration of the run it freezes every parameter of the wrapped
module (exact per-sample Fisher needs no weight gradients, which makes a batch cheaper than a
training step), installs the :class:`~lightning_fisher.analysis.collector.FisherCollector` hooks, and
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
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn

from lightning_fisher.allocation.settings import (
    ALLOCATION_OPTIONS,
    AllocationSettings,
    allocation_from_options,
    other_spellings,
    settings_or_options,
)
from lightning_fisher.analysis.options import ANALYSIS_OPTIONS, AnalysisOptions, options_from
from lightning_fisher.analysis.session import (
    SCORE_DESCRIPTION,
    AnalysisSession,
    map_metrics,
    no_gradient_note,
)
from lightning_fisher.errors import FisherAnalysisError
from lightning_fisher.fisher_map.map import DatasetRecord, FisherMap, StabilityRecord
from lightning_fisher.analysis.stability import StopReason
from lightning_fisher.analysis.timesteps import TimestepFocus

__all__ = ["FisherAnalysisModule", "SCORE_DESCRIPTION", "training_step_loss"]


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
            (:mod:`lightning_fisher.allocation.criteria`): ``"trace"`` or ``"spectrum"``; it also says what
            the analysis gathers besides the trace and how it checks that it may stop.
        lora_alpha: alpha at the base rank recorded in the map; default ``2 * rank``.
        use_rslora: alpha policy recorded in the map.
        timestep_focus: ``balanced``, ``texture``, ``structure`` or ``"LO,HI"``; acts on a task
            that exposes ``timestep_sampler`` (see :mod:`lightning_fisher.analysis.timesteps`).
        loss_reduction: ``"mean"`` when the loss is the mean of per-sample losses, ``"sum"``
            for a sum.
        norm_strategy: how per-sample norms are computed; ``"auto"`` picks per layer.
        train_mode: run the task in train mode (dropout active, Fisher under sampled masks).
            Default ``False``: eval mode, the pretrained model's deterministic Fisher.
        seed: recorded in the map (seeding itself is done by :func:`~lightning_fisher.analyze`
            or by you, with ``lightning.seed_everything``); ``None`` by default here, because
            this module seeds nothing (``AnalysisOptions.seed``, 0, is what ``analyze`` seeds with).
        dataset: the analysed dataset folder, recorded in the map.
        allocation: the allocation options (``rank`` ... ``criterion``) as one
            :class:`~lightning_fisher.AllocationSettings`; then pass none of those.
        options: the analysis options (``include`` ... ``seed``, ``lora_alpha``, ``use_rslora``)
            as one :class:`~lightning_fisher.AnalysisOptions`; then pass none of those.
    """

    @other_spellings(mode="rank_mode")
    @settings_or_options("allocation", AllocationSettings, ALLOCATION_OPTIONS)
    @settings_or_options("options", AnalysisOptions, ANALYSIS_OPTIONS)
    def __init__(
        self,
        task: LightningModule,
        *,
        include: Optional[Sequence[str]] = AnalysisOptions.include,
        exclude: Sequence[str] = AnalysisOptions.exclude,
        module_types: Optional[Sequence[type]] = AnalysisOptions.module_types,
        rank: int = AllocationSettings.rank,
        rank_min: int = AllocationSettings.rank_min,
        rank_max: int = AllocationSettings.rank_max,
        rank_mode: Literal["median", "budget"] = AllocationSettings.mode,
        score_power: float = AllocationSettings.score_power,
        exclude_threshold: float = AllocationSettings.exclude_threshold,
        criterion: str = AllocationSettings.criterion,
        lora_alpha: Optional[float] = AnalysisOptions.lora_alpha,
        use_rslora: bool = AnalysisOptions.use_rslora,
        timestep_focus: Union[str, TimestepFocus] = AnalysisOptions.timestep_focus,
        loss_reduction: Literal["mean", "sum"] = AnalysisOptions.loss_reduction,
        norm_strategy: Literal["auto", "ghost", "materialize"] = "auto",
        train_mode: bool = AnalysisOptions.train_mode,
        seed: Optional[int] = None,
        dataset: Optional[DatasetRecord] = None,
        allocation: Optional[AllocationSettings] = None,
        options: Optional[AnalysisOptions] = None,
    ) -> None:
        super().__init__()
        if not isinstance(task, LightningModule):
            raise TypeError(
                f"task must be a LightningModule, got {type(task).__name__}; for any other model use "
                "lightning_fisher.analyze(model, data, loss_fn=...)"
            )
        if not task.automatic_optimization:
            raise FisherAnalysisError(
                f"{type(task).__name__} uses manual optimization, so its training_step steps optimizers "
                "itself; the analysis needs a training_step that returns the loss"
            )
        self.automatic_optimization = False
        self.task = task
        # DistributedDataParallel refuses a module without a trainable parameter, and the task is
        # frozen during the analysis: this scalar enters the loss times zero, so it changes no
        # gradient, and lets DDP wrap the module (its gradient is the only one DDP syncs).
        self.ddp_anchor = nn.Parameter(torch.zeros(()))
        #: The analysis itself (plain PyTorch); this module drives it from Lightning's hooks.
        self.session = AnalysisSession(
            task,
            # the allocation settings, checked once, here, before anything runs
            allocation=allocation_from_options(
                allocation, "FisherAnalysisModule", rank, rank_min, rank_max, rank_mode, score_power,
                exclude_threshold, criterion,
            ),
            options=options_from(
                options, "FisherAnalysisModule", include=include, exclude=exclude, module_types=module_types, lora_alpha=lora_alpha,
                use_rslora=use_rslora, timestep_focus=timestep_focus, loss_reduction=loss_reduction,
                train_mode=train_mode, seed=seed,
            ),
            norm_strategy=norm_strategy,
            dataset=dataset,
            processes=_TrainerProcesses(self),
        )
        #: The result, available after ``Trainer.fit``.
        self.fisher_map: Optional[FisherMap] = None

    # The session's state under the names this module has always had.
    allocation = property(lambda self: self.session.allocation, doc="The allocation settings.")
    criterion = property(lambda self: self.session.criterion, doc="The criterion the settings name.")
    timestep_focus = property(lambda self: self.session.timestep_focus, doc="The parsed timestep focus.")
    loss_reduction = property(lambda self: self.session.loss_reduction, doc="``mean`` or ``sum``.")
    train_mode = property(lambda self: self.session.train_mode, doc="Whether the task runs in train mode.")
    seed = property(lambda self: self.session.seed, doc="The seed recorded in the map.")
    dataset = property(lambda self: self.session.dataset, doc="The dataset record of the map.")
    collector = property(lambda self: self.session.collector, doc="The hooks (after ``setup``).")
    accumulator = property(lambda self: self.session.accumulator, doc="This process's running sums.")
    global_accumulator = property(lambda self: self.session.global_accumulator, doc="The sums over processes.")
    statistics = property(lambda self: self.session.statistics, doc="What the criterion gathers besides the trace.")

    @property
    def stop_reason(self) -> Optional[StopReason]:
        """Why the analysis ended; set by :class:`~lightning_fisher.FisherStability` or at the end."""
        return self.session.stop_reason

    @stop_reason.setter
    def stop_reason(self, reason: Optional[StopReason]) -> None:
        self.session.stop_reason = reason

    @property
    def stability(self) -> Optional[StabilityRecord]:
        """The stability rule's record, set by :class:`~lightning_fisher.FisherStability`."""
        return self.session.stability

    @stability.setter
    def stability(self, record: Optional[StabilityRecord]) -> None:
        self.session.stability = record

    # ------------------------------------------------------------------ set-up and restore
    def setup(self, stage: str) -> None:
        if stage != "fit":
            raise FisherAnalysisError("FisherAnalysisModule runs under Trainer.fit only")
        self.task.setup(stage)  # the task may build layers or load weights here
        # Frozen before the strategy wraps the module (DDP inspects requires_grad when wrapping).
        self.session.prepare()

    def configure_model(self) -> None:
        # The strategy gives its device mesh (ModelParallelStrategy: FSDP2 / tensor parallel) to
        # the module it runs, this one; the task shards itself with it in its configure_model.
        self.task._device_mesh = self._device_mesh
        self.task.configure_model()
        # The last hook before the precision plugin converts the module (bf16-true and the like
        # cast every tensor): the task's own tensors are kept, to be put back at restore.
        self.session.keep_tensors()

    def on_fit_start(self) -> None:
        # the mode is set before every batch (on_train_batch_start): Lightning's fit loop puts
        # the module in train mode as it starts, and warns about modules it finds in eval mode
        self.session.start(set_mode=False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning puts the whole module in train mode when the fit loop starts.
        self.session.set_mode()

    def teardown(self, stage: str) -> None:
        self.restore_task()
        self.task.teardown(stage)

    def restore_task(self) -> None:
        """Undo everything the analysis did to the task: hooks, sampler, frozen weights, mode, dtype.

        Runs at teardown and, through :meth:`configure_callbacks`, when the run fails; safe to
        call more than once.
        """
        self.session.restore()

    def configure_callbacks(self) -> list[Callback]:
        # Lightning calls no LightningModule hook when fit fails, but callbacks see on_exception.
        return [_RestoreTaskOnException()]

    def configure_optimizers(self) -> None:
        """No optimizer: the analysis never changes a weight."""
        return None

    # ------------------------------------------------------------------ the batch
    def training_step(self, batch: Any, batch_idx: int) -> None:
        task_name = type(self.task).__name__
        with self._as_training_step_of_task():
            self.session.measure(
                lambda: training_step_loss(self.task.training_step(batch, batch_idx), task_name),
                source=f"{task_name}.training_step",
                backward=lambda loss: (loss + 0.0 * self.ddp_anchor).backward(),
            )
        self._log_batch()

    def split_half_correlation(self) -> Optional[float]:
        """The stopping rule's agreement between the two sample halves after the latest batch.

        The criterion's own check (:meth:`~lightning_fisher.allocation.criteria.Criterion.split_half_correlation`):
        under ``"trace"`` the Spearman correlation of the halves' module scores, under
        ``"spectrum"`` that of the ranks the spectrum allocation gives each half. May be a
        collective under DDP (the spectrum's half sketches are summed over processes), so every
        process must call it.
        """
        return self.session.split_half_correlation()

    def _log_batch(self) -> None:
        """Per batch, to the Trainer's logger: samples seen and a few figures of the running scores."""
        metrics = self.session.batch_metrics()
        self.log("fisher/samples", metrics.pop("fisher/samples"), prog_bar=True, reduce_fx="max")
        if metrics:  # none while every sample so far was non-finite (later batches may have some)
            self.log_dict(metrics, reduce_fx="max")

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
        self.fisher_map = self.session.finish()
        self._log_scores(self.fisher_map)
        note = no_gradient_note(self.fisher_map)
        if note is not None:
            rank_zero_warn(note)

    def build_map(self) -> FisherMap:
        """The map from the statistics gathered so far (all processes)."""
        return self.session.build_map()

    @rank_zero_only
    def _log_scores(self, fisher_map: FisherMap) -> None:
        metrics = map_metrics(fisher_map)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=fisher_map.analysis.batches if fisher_map.analysis else 0)


class _TrainerProcesses:
    """The analysis' processes as the Trainer's strategy sees them (DDP, FSDP2, one device)."""

    def __init__(self, module: FisherAnalysisModule) -> None:
        self.module = module

    @property
    def world_size(self) -> int:
        return self.module.trainer.world_size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.module.ddp_anchor.device)
        if self.world_size > 1:
            tensor = self.module.trainer.strategy.reduce(tensor, reduce_op="sum")
        return tensor


class _RestoreTaskOnException(Callback):
    def on_exception(self, trainer: Any, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(pl_module, FisherAnalysisModule):
            pl_module.restore_task()


def training_step_loss(output: Any, task_name: str) -> torch.Tensor:
    """The loss a ``training_step`` returned (a scalar tensor, or a dict's ``"loss"``); else a :class:`FisherAnalysisError`."""
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise FisherAnalysisError(
            f"{task_name}.training_step must return the loss as a scalar tensor or a dict with 'loss' "
            f"for the analysis, got {type(output).__name__}"
        )
    return loss
