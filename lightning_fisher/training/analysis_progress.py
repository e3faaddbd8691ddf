"""The analysis' progress bar: what the user waits for, not an epoch with a misleading ETA.

The analysis stops when the module ranking is stable, usually long before the data runs out,
so a total of "batches in the epoch" (and its ETA) says nothing. This bar counts batches with
no total and shows samples seen, the split-half correlation and how many consecutive batches
it has been stable against the patience the stopping rule needs.
"""

from __future__ import annotations

from typing import Any, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

__all__ = ["AnalysisProgressBar", "AnalysisRichProgressBar", "use_analysis_progress_bar"]


class _AnalysisMetrics:
    """The bar's numbers: samples, the split-half correlation, "stable k/patience"; the rest as Lightning shows them."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Union[int, str, float]]:
        metrics = dict(super().get_metrics(trainer, pl_module))  # type: ignore[misc]
        metrics.pop("v_num", None)
        shown: dict[str, Union[int, str, float]] = {}
        samples = metrics.pop("fisher/samples", None)
        if samples is not None:
            shown["samples"] = str(int(float(samples)))  # a count, not a float with three decimals
        correlation = metrics.pop("fisher/split_half_spearman", None)
        if correlation is not None:
            shown["split-half"] = f"{float(correlation):.3f}"
        stable = metrics.pop("fisher/stable_batches", None)
        if stable is not None:
            patience = next((c.rule.patience for c in trainer.callbacks if hasattr(c, "rule")), None)
            shown["stable"] = f"{int(float(stable))}" + (f"/{patience}" if patience else "")
        return {**shown, **metrics}


class AnalysisProgressBar(_AnalysisMetrics, TQDMProgressBar):
    """Lightning's tqdm bar for :class:`~lightning_fisher.FisherAnalysisModule` runs."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.total = None  # it ends when the ranking settles, not at a known batch
        self.train_progress_bar.set_description("Fisher analysis")


class AnalysisRichProgressBar(_AnalysisMetrics, RichProgressBar):
    """Lightning's rich bar (its default when ``rich`` is installed) for analysis runs."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "Fisher analysis"

    def configure_columns(self, trainer: pl.Trainer) -> list:
        from rich.progress import TimeElapsedColumn

        # elapsed time only: a time remaining would be for batches the analysis does not wait for
        return [TimeElapsedColumn() if type(c).__name__ == "CustomTimeColumn" else c
                for c in super().configure_columns(trainer)]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:
            # rich's update(total=None) keeps the total; Lightning's rich columns read an infinite one as unknown
            for task in self.progress.tasks:
                if task.id == self.train_progress_bar_id:
                    task.total = float("inf")  # shown as "5/--" with a pulsing bar: no misleading ETA


def use_analysis_progress_bar(trainer: pl.Trainer) -> None:
    """Swap Lightning's default bar (tqdm or rich) for the analysis one; a bar you chose yourself is kept."""
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) is TQDMProgressBar:
            trainer.callbacks[index] = AnalysisProgressBar(refresh_rate=callback.refresh_rate)
            return
        if type(callback) is RichProgressBar:
            trainer.callbacks[index] = AnalysisRichProgressBar(
                refresh_rate=callback.refresh_rate, leave=callback._leave, theme=callback.theme,
                console_kwargs=callback._console_kwargs,
            )
            return
