import json
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from _tasks import classification_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher import FisherAnalysisError, FisherAnalysisModule, FisherMap, FisherStability, analyze

QUIET = dict(enable_progress_bar=False, accelerator="cpu", devices=1)


class Task(pl.LightningModule):
    """A classifier whose blocks differ in how much the loss depends on them."""

    def __init__(self, width=12, classes=4, dtype=torch.float32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.mixer = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)
        self.dropout = nn.Dropout(0.5)
        self.to(dtype)
        self.logged = []

    def forward(self, x):
        h = self.encoder(x)
        h = h + 0.1 * self.mixer(self.dropout(h))
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        self.logged.append(batch_idx)
        return {"loss": loss}


loader = partial(classification_data, n=96, features=6, classes=4)


def no_early_stop(**kwargs):
    return dict(convergence_patience=10_000, max_batches=None, min_batches=0, **kwargs)


def reference_scores(task, data):
    """Per-sample Fisher by a loop of batch-1 backward passes, per parameter, in eval mode."""
    task.eval()
    modules = {name: m for name, m in task.named_modules() if isinstance(m, nn.Linear)}
    totals = {name: 0.0 for name in modules}
    count = 0
    for x, y in data:
        for i in range(x.shape[0]):
            task.zero_grad()
            nn.functional.cross_entropy(task(x[i : i + 1]), y[i : i + 1]).backward()
            for name, m in modules.items():
                sq = m.weight.grad.pow(2).sum() + m.bias.grad.pow(2).sum()
                totals[name] += float(sq) / (m.weight.numel() + m.bias.numel())
            count += 1
    task.zero_grad(set_to_none=True)
    return {name: total / count for name, total in totals.items()}


def test_scores_match_batch_one_reference_through_training_step():
    torch.manual_seed(0)
    task = Task(dtype=torch.float64)
    data = loader(dtype=torch.float64)
    fmap = analyze(task, data, rank=4, rank_min=1, rank_max=16, trainer_kwargs=QUIET, **no_early_stop())
    expected = reference_scores(task, data)
    assert set(fmap.scores) == set(expected) == {"encoder.0", "encoder.2", "mixer", "head"}
    for name, value in expected.items():
        assert fmap.scores[name] == pytest.approx(value, rel=1e-9)
    assert fmap.analysis.samples == 96 and fmap.analysis.batches == 12
    assert fmap.analysis.stop_reason == "data_exhausted" and not fmap.analysis.converged
    assert all(v is not None and v > 0 for v in fmap.score_stderrs.values())
    assert task.logged == list(range(12))  # the task's own training_step ran, with self.log working


def test_task_comes_back_unchanged_and_trainable():
    torch.manual_seed(0)
    task = Task()
    task.head.weight.requires_grad_(False)  # a user's own freezing must survive
    task.train()
    before = {k: v.clone() for k, v in task.state_dict().items()}
    module = FisherAnalysisModule(task, rank=4, rank_min=1, rank_max=16)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, callbacks=[FisherStability(min_batches=0, max_batches=3)], **QUIET)
    trainer.fit(module, train_dataloaders=loader())
    assert module.fisher_map is not None and module.fisher_map.analysis.batches == 3
    for key, value in task.state_dict().items():
        assert torch.equal(value, before[key]), key  # bit-identical
    assert task.head.weight.requires_grad is False
    assert all(p.requires_grad for n, p in task.named_parameters() if n != "head.weight")
    assert task.training
    assert all(not m._forward_hooks for m in task.modules())
    assert all(p.grad is None for p in task.parameters())


def test_frozen_model_works():
    torch.manual_seed(0)
    task = Task()
    task.requires_grad_(False)
    fmap = analyze(task, loader(), rank=4, rank_min=1, rank_max=16, trainer_kwargs=QUIET, **no_early_stop())
    assert all(s > 0 for s in fmap.scores.values())
    assert not any(p.requires_grad for p in task.parameters())


def test_eval_mode_by_default_train_mode_on_request():
    torch.manual_seed(0)
    task = Task()
    eval_map = analyze(task, loader(), trainer_kwargs=QUIET, **no_early_stop())
    again = analyze(task, loader(), trainer_kwargs=QUIET, **no_early_stop())
    train_map = analyze(task, loader(), train_mode=True, trainer_kwargs=QUIET, **no_early_stop())
    assert eval_map.scores == again.scores  # dropout off: deterministic
    assert train_map.scores["mixer"] != eval_map.scores["mixer"]  # dropout sampled


def test_same_seed_same_map_different_seed_different_order():
    def run(seed):
        torch.manual_seed(123)
        task = Task()
        return analyze(task, loader(shuffle=True), seed=seed, trainer_kwargs=QUIET, convergence_patience=2, min_batches=2, stability_threshold=0.5)

    first, second, other = run(7), run(7), run(8)
    assert first.scores == second.scores
    assert first.ranks == second.ranks and first.analysis.batches == second.analysis.batches
    assert first.analysis.seed == 7
    assert first.scores != other.scores  # another seed samples other batches before stopping


def test_stops_early_on_homogeneous_data():
    torch.manual_seed(0)
    task = Task()
    # every sample is the same point: the ranking is settled from the first batch on
    x = torch.randn(1, 6).repeat(400, 1)
    y = torch.zeros(400, dtype=torch.long)
    data = DataLoader(TensorDataset(x, y), batch_size=8)
    fmap = analyze(task, data, convergence_patience=3, min_batches=4, trainer_kwargs=QUIET)
    assert fmap.analysis.stop_reason == "converged" and fmap.analysis.converged
    assert fmap.analysis.batches == 4  # min_batches, having been stable since batch 1
    assert fmap.analysis.samples == 32
    assert fmap.analysis.stability.patience == 3
    assert fmap.analysis.stability.last_correlation == pytest.approx(1.0)


class Exchangeable(pl.LightningModule):
    """Identical parallel branches on pure-noise data: no ranking is reproducible."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(4, 1) for _ in range(12))
        for branch in self.branches:
            nn.init.constant_(branch.weight, 0.1)
            nn.init.zeros_(branch.bias)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        outputs = torch.stack([b(x[:, i]) for i, b in enumerate(self.branches)], dim=1)
        return outputs.pow(2).mean(dim=(1, 2)).mean()


def test_runs_to_max_batches_when_ranking_never_settles():
    x = torch.randn(4000, 12, 4, generator=torch.Generator().manual_seed(1))
    data = DataLoader(TensorDataset(x), batch_size=8)
    fmap = analyze(Exchangeable(), data, rank=4, rank_min=1, rank_max=16, convergence_patience=3, max_batches=25,
                   stability_threshold=0.9, trainer_kwargs=QUIET)
    assert fmap.analysis.stop_reason == "max_batches" and not fmap.analysis.converged
    assert fmap.analysis.batches == 25 and fmap.analysis.samples == 200


def test_nan_batch_is_skipped_and_counted():
    torch.manual_seed(0)
    data = loader(n=48, batch_size=8)
    x, y = data.dataset.tensors
    x = x.clone()
    x[16:24] = float("nan")  # the whole third batch
    x[40, 2] = float("inf")  # and one sample of the last
    fmap = analyze(Task(), DataLoader(TensorDataset(x, y), batch_size=8), trainer_kwargs=QUIET, **no_early_stop())
    assert fmap.analysis.skipped_samples == 9
    assert fmap.analysis.samples == 39 and fmap.analysis.batches == 6
    assert all(v > 0 for v in fmap.scores.values())


def test_all_nan_is_a_clear_error_and_task_is_restored():
    task = Task()
    x = torch.full((16, 6), float("nan"))
    data = DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=8)
    with pytest.raises(FisherAnalysisError, match="no finite per-sample gradients in 2 batches"):
        analyze(task, data, trainer_kwargs=QUIET, **no_early_stop())
    assert all(p.requires_grad for p in task.parameters())
    assert all(not m._forward_hooks for m in task.modules())


def test_a_trainer_that_returns_before_analysing_is_a_clear_error_and_writes_nothing(tmp_path):
    task = Task()
    with pytest.raises(FisherAnalysisError, match="did not finish.*limit batches"):
        analyze(task, loader(), dataset_dir=tmp_path, trainer_kwargs={**QUIET, "limit_train_batches": 0}, **no_early_stop())
    assert list(tmp_path.iterdir()) == []
    assert all(p.requires_grad for p in task.parameters())
    assert all(not m._forward_hooks for m in task.modules())


def test_candidates_by_pattern_and_map_written_to_dataset_dir(tmp_path):
    task = Task()
    fmap = analyze(task, loader(), dataset_dir=tmp_path, exclude=["head"], trainer_kwargs=QUIET, convergence_patience=2, min_batches=2, stability_threshold=0.0)
    assert set(fmap.scores) == {"encoder.0", "encoder.2", "mixer"}
    assert fmap.path == tmp_path / "fisher_map.json"
    assert FisherMap.load(tmp_path) == fmap
    document = json.loads((tmp_path / "fisher_map.json").read_text())
    assert document["analysis"]["stop_reason"] == "converged"


def test_non_loss_training_step_is_rejected():
    class NoLoss(Task):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(FisherAnalysisError, match="must return the loss"):
        analyze(NoLoss(), loader(), trainer_kwargs=QUIET)


def test_manual_optimization_task_is_rejected():
    task = Task()
    task.automatic_optimization = False
    with pytest.raises(FisherAnalysisError, match="manual optimization"):
        FisherAnalysisModule(task)


def test_modules_without_gradient_are_reported_and_excluded():
    class WithUnused(Task):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(12, 12)

    with pytest.warns(UserWarning, match=r"1 candidate module\(s\) received no gradient.*unused"):
        fmap = analyze(WithUnused(), loader(), trainer_kwargs=QUIET, **no_early_stop())
    assert fmap.scores["unused"] == 0.0 and "unused" in fmap.excluded


def test_analysis_leaves_the_callers_random_streams_alone():
    import random

    import numpy as np

    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    task, data = Task(), loader(shuffle=True)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = draws()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    analyze(task, data, seed=123, trainer_kwargs=QUIET, convergence_patience=2, min_batches=2)
    assert draws() == expected


def test_scores_and_ranks_reach_the_lightning_logger(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="analysis", version=0)
    fmap = analyze(Task(), loader(), rank=4, rank_min=1, rank_max=16, trainer_kwargs=dict(QUIET, logger=logger),
                   convergence_patience=2, min_batches=2, stability_threshold=0.0)
    rows = list(csv.DictReader(open(tmp_path / "analysis" / "version_0" / "metrics.csv")))
    logged = {key: float(row[key]) for row in rows for key in row if row[key] and key.startswith("fisher_")}
    for name, score in fmap.scores.items():
        assert logged[f"fisher_score/{name}"] == pytest.approx(score, rel=1e-6)
    for name, rank in fmap.ranks.items():
        assert logged[f"fisher_rank/{name}"] == rank
    assert any(row.get("fisher/split_half_spearman") for row in rows)  # the stability callback logs too
    assert any(row.get("train_loss") for row in rows)  # and so does the task's own training_step


def test_a_csv_logger_gets_one_analysis_row_per_batch(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="analysis", version=0)
    fmap = analyze(Task(), loader(n=96, batch_size=8), rank=4, rank_min=1, rank_max=16, convergence_patience=10_000,
                   min_batches=0, max_batches=7, trainer_kwargs=dict(QUIET, logger=logger))
    rows = [row for row in csv.DictReader(open(tmp_path / "analysis" / "version_0" / "metrics.csv"))
            if row.get("fisher/samples")]
    assert fmap.analysis.batches == 7
    assert [float(row["fisher/samples"]) for row in rows] == [8.0 * (i + 1) for i in range(7)]
    # "stable k of patience": consecutive batches at or above the threshold, reset by any below it
    expected, run = [], 0
    for correlation in fmap.analysis.stability.history:
        run = run + 1 if correlation is not None and correlation >= fmap.analysis.stability.threshold else 0
        expected.append(float(run))
    assert [float(row["fisher/stable_batches"]) for row in rows] == expected
    last = rows[-1]
    assert float(last["fisher/modules_with_gradient"]) == len(fmap.scores)
    assert float(last["fisher/score_max"]) == pytest.approx(max(fmap.scores.values()), rel=1e-6)
    positive = sorted(v for v in fmap.scores.values() if v > 0)
    assert float(last["fisher/score_median"]) == pytest.approx(float(torch.tensor(positive).median()), rel=1e-5)


def test_a_run_that_did_not_converge_says_so_in_the_summary_and_a_warning():
    x = torch.randn(4000, 12, 4, generator=torch.Generator().manual_seed(1))
    data = DataLoader(TensorDataset(x), batch_size=8)
    with pytest.warns(UserWarning, match=r"^analysis did NOT converge: max_batches was reached after 6 batches "
                                         r"\(48 samples\), split-half Spearman"):
        fmap = analyze(Exchangeable(), data, rank=4, rank_min=1, rank_max=16, convergence_patience=3, max_batches=6,
                       trainer_kwargs=QUIET)
    assert fmap.summary().endswith("; NOT converged (max batches after 6 batches)")


def test_a_first_batch_of_non_finite_samples_is_skipped_and_the_analysis_goes_on():
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    x[:8] = float("nan")  # the whole first batch
    data = DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long)), batch_size=8)
    fmap = analyze(Task(), data, trainer_kwargs=QUIET, **no_early_stop())
    assert fmap.analysis.skipped_samples == 8 and fmap.analysis.samples == 24
    assert fmap.summary().endswith("; 8 non-finite samples skipped")


def test_reentrant_checkpointing_around_the_forward_is_named(tmp_path):
    class Checkpointed(Task):
        def forward(self, x):
            # the input needs no grad, so reentrant checkpointing returns an output that needs none either
            return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=True)

    with pytest.raises(FisherAnalysisError) as excinfo:
        analyze(Checkpointed(), loader(), trainer_kwargs=QUIET)
    assert str(excinfo.value).startswith(
        "the loss of Checkpointed.training_step does not depend on any candidate module (it does not require grad). "
        "Likely cause: reentrant gradient checkpointing (torch.utils.checkpoint with use_reentrant=True"
    )
    assert "use_reentrant=False" in str(excinfo.value)
