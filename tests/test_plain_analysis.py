"""``analyze()`` for any ``nn.Module``: the plain loop (no Trainer), the same map as the Trainer path, its errors."""

import copy
import json
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _fresh_python import assert_runs_in_fresh_python
from lightning_fisher import (
    AllocationSettings, AnalysisOptions, FisherAnalysisError, FisherMap, UniformTimestepSampler, analyze,
)
from lightning_fisher.allocation.spectrum_rule import allocate_ranks_from_spectra

RANKS = dict(rank=4, rank_min=1, rank_max=16)
WHOLE_DATA = dict(convergence_patience=10_000, min_batches=0, max_batches=None)


def net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def loader(n=96, batch_size=8, dtype=torch.float32, shuffle=False):
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def cross_entropy(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, flags, training):
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit-identical
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training == training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_a_plain_module_gets_exact_per_sample_scores_and_comes_back_unchanged(tmp_path):
    model, data = net(torch.float64), loader(dtype=torch.float64)
    model[4].weight.requires_grad_(False)  # the user's own freezing survives
    model.train()
    before, flags = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    fisher_map = analyze(model, data, cross_entropy, output=tmp_path, seed=1, **RANKS, **WHOLE_DATA)
    assert_unchanged(model, before, flags, training=True)
    # reference: one backward per sample, in eval mode, per parameter
    reference = copy.deepcopy(model).eval().requires_grad_(True)
    totals, count = {name: 0.0 for name in ("0", "2", "4")}, 0
    for x, y in data:
        for i in range(len(x)):
            reference.zero_grad()
            nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
            for name in totals:
                layer = reference[int(name)]
                totals[name] += float(layer.weight.grad.square().sum() + layer.bias.grad.square().sum()) / (
                    layer.weight.numel() + layer.bias.numel())
            count += 1
    assert set(fisher_map.scores) == set(totals)
    for name, total in totals.items():
        assert fisher_map.scores[name] == pytest.approx(total / count, rel=1e-9)
    analysis = fisher_map.analysis
    assert (analysis.samples, analysis.batches, analysis.stop_reason, analysis.world_size) == (96, 12, "data_exhausted", 1)
    assert analysis.seed == 1 and analysis.stability.patience == 10_000 and len(analysis.stability.history) == 12
    assert fisher_map.path == tmp_path / "fisher_map.json" and FisherMap.load(tmp_path) == fisher_map


def test_the_spectrum_criterion_allocates_from_the_mean_gradient_spectrum():
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x = torch.randn(128, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 128, 16)]  # a list of batches, no DataLoader

    def mse(model, batch):
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    model = net(torch.float64)
    settings = AllocationSettings(criterion="spectrum", rank=4, rank_min=1, rank_max=8, mode="budget")
    fisher_map = analyze(model, batches, mse, allocation=settings, **WHOLE_DATA)
    # the mean over samples of the per-sample weight gradients is the gradient of the whole data's mean loss
    reference = copy.deepcopy(model).requires_grad_(True)
    nn.functional.mse_loss(reference(x), y).backward()
    spectra = fisher_map.spectra
    exact = {}
    for name in ("0", "2", "4"):
        sigma_sq = torch.linalg.svdvals(reference[int(name)].weight.grad).square()[:8]
        exact[name] = tuple(sigma_sq.tolist())
        assert spectra[name].sigma_sq == pytest.approx(exact[name], rel=1e-6, abs=1e-14)
    expected = allocate_ranks_from_spectra(
        exact, {name: s.floor for name, s in spectra.items()}, fisher_map.rank_costs, settings=settings)
    assert fisher_map.ranks == dict(expected.ranks) and fisher_map.ranks  # ranks follow the spectrum
    assert fisher_map.allocation.criterion == "spectrum"
    assert fisher_map.analysis.stability.method == "split-half spearman of the spectrum allocation's ranks over all modules"


@pytest.mark.parametrize("criterion", ["trace", "spectrum"])
def test_the_plain_loop_gives_the_map_of_the_trainer_path(criterion):
    import lightning.pytorch as pl

    class Task(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def training_step(self, batch, batch_idx):
            return cross_entropy(self.net, batch)

    settings = dict(allocation=AllocationSettings(criterion=criterion, rank=4, rank_min=1, rank_max=8), seed=7,
                    convergence_patience=3, min_batches=3, stability_threshold=0.8)
    plain = analyze(net(), loader(shuffle=True), cross_entropy, **settings)
    trainer = analyze(Task(), loader(shuffle=True), trainer_kwargs=dict(accelerator="cpu", enable_progress_bar=False),
                      **settings)
    assert {name.removeprefix("net."): s for name, s in trainer.scores.items()} == plain.scores  # bitwise
    assert {name.removeprefix("net."): r for name, r in trainer.ranks.items()} == plain.ranks
    assert plain.analysis.stability.history == trainer.analysis.stability.history
    assert (plain.analysis.batches, plain.analysis.stop_reason) == (trainer.analysis.batches, trainer.analysis.stop_reason)
    assert plain.model.fingerprint != trainer.model.fingerprint  # names relative to each model


def test_a_hugging_face_model_is_analysed_with_its_own_loss_and_the_map_applies_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lightning_fisher import lora_config_from_fisher_map, verify_adapter_ranks

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(config)  # random weights, train mode
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(6):
        ids = torch.randint(0, 64, (8, 10), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] > 31).long()})
    before, flags = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    fisher_map = analyze(model, batches, output=tmp_path, rank=4, rank_min=1, rank_max=8,
                         convergence_patience=2, min_batches=2, stability_threshold=0.5)
    assert_unchanged(model, before, flags, training=True)
    assert len(fisher_map.scores) == 2 * 6 + 2  # q, k, v, attention output, intermediate, output; pooler, classifier
    assert fisher_map.scores["classifier"] > 0 and fisher_map.analysis.samples == 8 * fisher_map.analysis.batches
    assert fisher_map.model.class_name == "BertForSequenceClassification"
    chosen = analyze(model, batches, include=["query", "value"], exclude=["layer.1.attention.self.value"],
                     rank=4, rank_min=1, rank_max=8, convergence_patience=2, min_batches=2, stability_threshold=0.5)
    assert sorted(chosen.scores) == [
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.query"]
    assert chosen.model.fingerprint == fisher_map.model.fingerprint  # the same model, however many candidates
    peft_model = peft.get_peft_model(model, lora_config_from_fisher_map(tmp_path))
    assert verify_adapter_ranks(peft_model, tmp_path) == fisher_map.ranks
    assert all(torch.equal(v, before[k]) for k, v in peft_model.get_base_model().state_dict().items()
               if "lora_" not in k and k in before)


class LogitsOnly(nn.Module):
    """A classifier that returns its logits, not a loss."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 4)

    def forward(self, x, labels=None):
        return self.layer(x)


def dict_batches(n=3):
    return [{"x": torch.randn(8, 6), "labels": torch.zeros(8, dtype=torch.long)} for _ in range(n)]


def test_a_model_output_without_loss_and_no_loss_fn_says_to_pass_loss_fn():
    model = LogitsOnly()
    with pytest.raises(FisherAnalysisError) as excinfo:
        analyze(model, dict_batches())
    assert str(excinfo.value).startswith(
        "LogitsOnly's output (Tensor) has no loss, and no loss_fn was given. A Hugging Face model computes its loss "
        "only when the batch holds labels (add 'labels' to each batch); for any other model pass loss_fn=")
    assert all(p.requires_grad for p in model.parameters()) and not model.layer._forward_hooks
    with pytest.raises(FisherAnalysisError, match=r"needs dict batches \(got a tuple\)\. Pass loss_fn="):
        analyze(net(), [(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))])


def test_a_loss_fn_that_returns_no_scalar_or_no_gradient_is_named():
    with pytest.raises(FisherAnalysisError) as excinfo:
        analyze(net(), loader(), lambda model, batch: nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none"))
    assert str(excinfo.value) == (
        "loss_fn(model, batch) must return the batch's loss as a scalar tensor, got a tensor of shape [8]: reduce the "
        "per-sample losses with .mean() (loss_reduction='mean', the default) or .sum() (loss_reduction='sum')")
    with pytest.raises(FisherAnalysisError) as excinfo:
        analyze(net(), loader(), lambda model, batch: cross_entropy(model, batch).detach())
    assert str(excinfo.value).startswith(
        "the loss of loss_fn(model, batch) does not depend on any candidate module (it does not require grad).")
    assert "torch.no_grad() or detached (.detach(), .item(), a new tensor)" in str(excinfo.value)
    with pytest.raises(FisherAnalysisError, match=r"loss_fn\(model, batch\) must return the loss as a scalar tensor, got float"):
        analyze(net(), loader(), lambda model, batch: cross_entropy(model, batch).item())


def test_data_that_runs_out_before_min_batches_says_how_many_batches_there_were(tmp_path):
    model = net()
    before = snapshot(model)
    with pytest.raises(FisherAnalysisError) as excinfo:
        analyze(model, loader(n=24), cross_entropy, dataset_dir=tmp_path, min_batches=5, max_epochs=1)
    assert str(excinfo.value).startswith(
        "the data ran out after 3 batch(es) (24 samples) in 1 epoch(s), before min_batches=5: the stopping rule needs "
        "at least 5 batches to judge whether the module ranking is stable. Give more batches (more data or smaller "
        "batches), raise max_epochs (when the loss is random, e.g. diffusion noise and timesteps), or lower "
        "min_batches (min_batches=3 accepts this data); nothing was written.")
    assert list(tmp_path.iterdir()) == []
    assert_unchanged(model, before, {n: True for n, _ in model.named_parameters()}, training=True)
    with pytest.raises(FisherAnalysisError, match=r"ran out after 0 batch\(es\) \(0 samples\).*check that the data is not empty"):
        analyze(model, [], cross_entropy)
    # two passes over the same three batches are enough
    fisher_map = analyze(model, loader(n=24), cross_entropy, min_batches=5, convergence_patience=10_000, max_epochs=2)
    assert fisher_map.analysis.batches == 6 and fisher_map.analysis.samples == 48


def test_trainer_options_are_refused_in_the_plain_loop():
    with pytest.raises(ValueError, match="trainer and trainer_kwargs apply to a LightningModule.*Sequential is analysed in a plain loop"):
        analyze(net(), loader(), cross_entropy, trainer_kwargs=dict(accelerator="cpu"))
    with pytest.raises(TypeError, match=r"model must be an nn.Module \(or a LightningModule\), got function"):
        analyze(cross_entropy, loader())


class Flow(nn.Module):
    """A denoiser whose loss draws diffusion time through ``self.timestep_sampler`` when it has one."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 6))

    def forward(self, x, t):
        return self.layers(torch.cat([x, t[:, None]], dim=1))


def flow_loss(model, batch):
    x0 = batch[0]
    t = model.timestep_sampler(x0.shape[0], x0.device)
    noise = torch.randn_like(x0)
    xt = (1 - t[:, None]) * x0 + t[:, None] * noise
    return nn.functional.mse_loss(model(xt, t), noise - x0)


def test_timestep_focus_through_the_timestep_sampler_argument_and_the_models_own():
    torch.manual_seed(0)
    model, data = Flow(), loader()
    fisher_map = analyze(model, data, flow_loss, timestep_sampler=UniformTimestepSampler(), timestep_focus="texture",
                         **WHOLE_DATA)
    focus = fisher_map.analysis.timestep_focus
    assert focus.name == "texture" and focus.applied and 0.0 <= focus.observed_range[0] < focus.observed_range[1] <= 0.4
    assert not hasattr(model, "timestep_sampler")  # installed for the run only
    own = model.timestep_sampler = UniformTimestepSampler(0.0, 1.0)
    structure = analyze(model, data, flow_loss, timestep_focus="structure", **WHOLE_DATA)
    assert 0.6 <= structure.analysis.timestep_focus.observed_range[0] and model.timestep_sampler is own
    assert structure.scores != fisher_map.scores
    # the same seed draws the same noise and timesteps: the same map
    assert analyze(model, data, flow_loss, timestep_focus="structure", **WHOLE_DATA).scores == structure.scores


class Recorder:
    """A logger as Lightning's and Fabric's are called: ``log_metrics(metrics, step)``."""

    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def test_a_second_analysis_keeps_the_first_map_as_bak_and_says_so_and_a_logger_gets_every_batch(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = analyze(net(), loader(), cross_entropy, output=tmp_path, **RANKS, convergence_patience=2, min_batches=2,
                    stability_threshold=0.0)
    first_text = (tmp_path / "fisher_map.json").read_text()
    assert any(m.startswith("analysis converged after 2 batches (16 samples)") for m in caplog.messages)
    logger = Recorder()
    second = analyze(net(), loader(), cross_entropy, output=tmp_path, rank=4, rank_min=4, rank_max=4, logger=logger,
                     max_batches=3, convergence_patience=10_000, min_batches=0)
    assert (tmp_path / "fisher_map.json.bak").read_text() == first_text
    assert json.loads((tmp_path / "fisher_map.json").read_text())["created"] == second.created
    assert [m for m in caplog.messages if m.startswith("fisher map replaced")][0].startswith(
        f"fisher map replaced: the previous one (created {first.created}) is kept as {tmp_path / 'fisher_map.json.bak'}")
    assert [step for step, _ in logger.rows] == [0, 1, 2, 3]
    assert [row["fisher/samples"] for _, row in logger.rows[:3]] == [8.0, 16.0, 24.0]
    assert logger.rows[-1][1] == {**{f"fisher_score/{n}": s for n, s in second.scores.items()},
                                  **{f"fisher_rank/{n}": float(r) for n, r in second.ranks.items()}}


def test_analyze_on_a_plain_module_imports_no_lightning():
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from lightning_fisher import analyze\n"
        "model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))\n"
        "batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]\n"
        "fisher_map = analyze(model, batches, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),\n"
        "                     min_batches=2, convergence_patience=2)\n"
        "assert fisher_map.analysis.batches >= 2\n"
        "loaded = sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')))\n"
        "assert not loaded, loaded\n"
    )
    assert_runs_in_fresh_python(code)


def test_a_datamodule_feeds_the_plain_loop_and_the_map_lands_beside_its_data(tmp_path):
    from lightning_fisher import TensorDirectoryDataModule, write_sample_folder

    x = torch.randn(48, 6, generator=torch.Generator().manual_seed(0))
    write_sample_folder(tmp_path / "train", ({"x": x[i], "y": (x[i, 0] > 0).long()} for i in range(48)))
    data = TensorDirectoryDataModule(tmp_path / "train", batch_size=8)
    fisher_map = analyze(net(), data, lambda model, batch: nn.functional.cross_entropy(model(batch["x"]), batch["y"]),
                         convergence_patience=2, min_batches=2, stability_threshold=0.0, **RANKS)
    assert fisher_map.path == tmp_path / "train" / "fisher_map.json" and FisherMap.load(tmp_path / "train") == fisher_map
    assert fisher_map.dataset.num_files == 48 and fisher_map.dataset.path == str((tmp_path / "train").resolve())


def test_a_loop_of_your_own_drives_the_analysis_session_and_an_error_restores_the_model():
    from lightning_fisher.analysis.session import AnalysisSession
    from lightning_fisher.analysis.stability import StabilityRule, StabilityTracker

    model, rule = net(), StabilityRule(patience=2, min_batches=2, threshold=0.0)
    before = snapshot(model)
    tracker = StabilityTracker(rule)
    with AnalysisSession(model, allocation=AllocationSettings(**RANKS), options=AnalysisOptions(seed=0)) as session:
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
        for batch in loader():
            session.measure(lambda: cross_entropy(model, batch), source="my loop")
            session.stop_reason = tracker.update(session.split_half_correlation())
            session.record_stability(rule, tracker)
            if session.stop_reason:
                break
        fisher_map = session.finish()
    assert fisher_map.analysis.stop_reason == "converged" and fisher_map.analysis.batches == 2
    assert fisher_map.scores == analyze(net(), loader(), cross_entropy, stopping=rule, **RANKS).scores
    assert_unchanged(model, before, {n: True for n, _ in model.named_parameters()}, training=True)
    with pytest.raises(RuntimeError, match="boom"):
        with AnalysisSession(model, allocation=AllocationSettings(**RANKS)) as session:
            session.measure(lambda: cross_entropy(model, next(iter(loader()))), source="my loop")
            raise RuntimeError("boom")
    assert_unchanged(model, before, {n: True for n, _ in model.named_parameters()}, training=True)


def run_plain_ddp(out, min_batches):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "plain_ddp.py"
    result = subprocess.run([sys.executable, str(script), str(out), str(min_batches)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_under_torch_distributed_the_ranks_sum_and_stop_together_when_one_runs_out(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "scripts"))
    from plain_ddp import batches_of, loss_fn, model  # the script's own task

    first, second = run_plain_ddp(tmp_path / "ddp", min_batches=2)
    # rank 0 had 5 batches, rank 1 only 3: both stopped after 3, and hold the same sums
    assert first == second and first["batches"] == 3 and first["samples"] == 48 and first["world_size"] == 2
    assert first["stop_reason"] == "data_exhausted"
    single = analyze(model(), batches_of(0)[:3] + batches_of(1), loss_fn, rank=4, rank_min=1, rank_max=8,
                     convergence_patience=10_000, min_batches=0, max_batches=None)
    for name, score in single.scores.items():
        assert first["scores"][name] == pytest.approx(score, rel=1e-12)
    assert FisherMap.load(tmp_path / "ddp").scores == first["scores"]  # written once, by rank 0
    # too few batches for min_batches: every rank raises the same error, nothing is written
    first, second = run_plain_ddp(tmp_path / "short", min_batches=5)
    assert first == second and first["error"].startswith(
        "the data ran out after 3 batch(es) per process (48 samples over 2 processes) in 1 epoch(s), before min_batches=5")
    assert not (tmp_path / "short" / "fisher_map.json").exists()
