"""``FisherStability``: stop the analysis once the module ranking is reproducible."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_fisher.allocation.settings import other_spellings, resolve_settings, settings_or_options
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.fisher_map.summary import stop_line
from lightning_fisher.analysis.stability import StabilityRule, StabilityTracker, StopReason

__all__ = ["FisherStability", "say_why_it_stopped"]


class FisherStability(Callback):
    r"""Stop the Fisher analysis when the module ranking has settled.

    After every batch the scores of the two independent sample halves are rank-correlated
    over all candidate modules (Spearman, see :mod:`lightning_fisher.analysis.stability` for why halves
    and not consecutive running means); under ``criterion="spectrum"`` it is the ranks the
    spectrum allocation gives each half that are correlated. The run stops when the correlation has stayed at or
    above ``threshold`` for ``patience`` consecutive batches, and at ``max_batches`` in any
    case. The statistics are all-reduced before the check, so under DDP every process takes
    the same decision at the same batch. The reason lands in the map's
    ``analysis.stop_reason``.

    Args:
        patience: consecutive stable batches needed (Side-Step's ``--convergence-patience``).
        threshold: split-half Spearman correlation counted as stable.
        min_batches: never stop before this many batches.
        max_batches: stop after this many batches regardless; ``None`` for no limit.
        verbose: say why the analysis ended, on rank zero, once the run is over (a warning when it
            did not converge).
        rule: the four settings above as one :class:`~lightning_fisher.StabilityRule` (then
            pass none of them).

    Example::

        trainer = Trainer(callbacks=[FisherStability(patience=5)])
        trainer.fit(FisherAnalysisModule(task), datamodule)
    """

    @other_spellings(in_signature=True, convergence_patience="patience", stability_threshold="threshold")
    @settings_or_options("rule", StabilityRule, ("patience", "threshold", "min_batches", "max_batches"))
    def __init__(
        self,
        patience: int = StabilityRule.patience,
        threshold: float = StabilityRule.threshold,
        min_batches: int = StabilityRule.min_batches,
        max_batches: Optional[int] = StabilityRule.max_batches,
        verbose: bool = True,
        rule: Optional[StabilityRule] = None,
    ) -> None:
        super().__init__()
        self.rule = resolve_settings(
            StabilityRule,
            rule,
            dict(patience=patience, threshold=threshold, min_batches=min_batches, max_batches=max_batches),
            owner="FisherStability",
        )
        self.verbose = verbose
        self.tracker = StabilityTracker(self.rule)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_fisher.training.analysis_module import FisherAnalysisModule

        if not isinstance(pl_module, FisherAnalysisModule):
            raise TypeError(f"FisherStability watches a FisherAnalysisModule, not {type(pl_module).__name__}")
        self.tracker = StabilityTracker(self.rule)
        pl_module.session.record_stability(self.rule, self.tracker)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        correlation = pl_module.split_half_correlation()
        reason = self.tracker.update(correlation)
        if correlation is not None:
            pl_module.log("fisher/split_half_spearman", correlation, prog_bar=True)
        # what the user waits for: "stable k of patience"
        pl_module.log("fisher/stable_batches", float(self.tracker.stable_batches), prog_bar=True)
        pl_module.session.record_stability(self.rule, self.tracker)
        should_stop = trainer.strategy.reduce_boolean_decision(reason is not None, all=False)
        if should_stop:
            pl_module.stop_reason = reason or StopReason.CONVERGED
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fisher_map = getattr(pl_module, "fisher_map", None)
        if self.verbose and fisher_map is not None:
            say_why_it_stopped(fisher_map)


def say_why_it_stopped(fisher_map: FisherMap) -> None:
    """Why the analysis ended, on rank zero: one line, or a warning when it did not converge.

    A warning, so a script sees it as well as the command line. :func:`~lightning_fisher.analyze`
    calls this after the run, once a rich progress bar has stopped drawing (it still draws during
    ``on_fit_end``); a ``FisherStability`` under your own Trainer calls it at ``on_fit_end``.
    """
    if fisher_map.analysis is not None and fisher_map.analysis.converged:
        rank_zero_info(stop_line(fisher_map))
    else:
        rank_zero_warn(stop_line(fisher_map), category=UserWarning)
