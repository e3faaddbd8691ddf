"""The analysis' progress bar: no epoch total, and the numbers the user waits for."""

import lightning.pytorch as pl
from _tasks import Task, classification_data
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torch import nn

from lightning_fisher import FisherAnalysisModule, FisherStability
from lightning_fisher.training.analysis_progress import (
    AnalysisProgressBar,
    AnalysisRichProgressBar,
    use_analysis_progress_bar,
)


def test_lightnings_default_bars_are_swapped_and_a_chosen_one_is_kept():
    for bar, swapped in ((TQDMProgressBar(refresh_rate=3), AnalysisProgressBar),
                         (RichProgressBar(), AnalysisRichProgressBar)):
        trainer = pl.Trainer(callbacks=[bar], logger=False, enable_checkpointing=False)
        use_analysis_progress_bar(trainer)
        assert type(trainer.progress_bar_callback) is swapped
    trainer = pl.Trainer(callbacks=[TQDMProgressBar(refresh_rate=3)], logger=False)
    use_analysis_progress_bar(trainer)
    assert trainer.progress_bar_callback.refresh_rate == 3

    class Mine(TQDMProgressBar):
        pass

    trainer = pl.Trainer(callbacks=[Mine()], logger=False, enable_checkpointing=False)
    use_analysis_progress_bar(trainer)
    assert type(trainer.progress_bar_callback) is Mine


def test_the_bar_shows_samples_split_half_and_stable_k_of_patience():
    data = classification_data(64, 4)
    bar = AnalysisProgressBar()
    stability = FisherStability(patience=3, min_batches=3, threshold=0.0)
    trainer = pl.Trainer(callbacks=[stability, bar], logger=False, enable_checkpointing=False, max_epochs=1,
                         enable_model_summary=False)
    task = Task(lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), attribute="net", seed=None)
    module = FisherAnalysisModule(task, rank=2, rank_min=1, rank_max=4)
    trainer.fit(module, train_dataloaders=data)
    metrics = bar.get_metrics(trainer, module)
    assert metrics["samples"] == "24" and metrics["stable"] == "3/3"
    assert metrics["split-half"] == f"{module.stability.last_correlation:.3f}"
    assert "v_num" not in metrics and not any(key.startswith("fisher/") for key in metrics)
    assert bar.train_progress_bar.total is None and bar.train_progress_bar.desc.startswith("Fisher analysis")
