"""Mixed and low precision end to end: analyze and fit under Lightning's bf16 / fp16 precisions.

On the CPU, Lightning runs ``bf16-mixed``, ``bf16-true`` and ``16-true``; ``16-mixed`` (fp16 AMP)
it replaces with ``bf16-mixed`` and says so. The measured agreement on real models is in
``benchmarks/precision_agreement.py``; these tests use a tiny token model.
"""

import dataclasses
import json
import math

import lightning.pytorch as pl
import peft
import pytest
import safetensors.torch
import torch
from _tasks import Task
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher import AdaptiveLoRA, AllocationSettings, FisherAnalysisModule, analyze
from lightning_fisher.analysis.accumulator import FisherAccumulator
from lightning_fisher.analysis.collector import FisherCollector
from lightning_fisher.analysis.spectrum import SpectrumAccumulator

pytestmark = [
    pytest.mark.filterwarnings("ignore:analysis did NOT converge"),
    pytest.mark.filterwarnings("ignore:.*configure_optimizers.* returned `None`"),
]

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, logger=False)
ALLOCATION = AllocationSettings(rank=4, rank_min=1, rank_max=8, criterion="spectrum")
STOP = dict(convergence_patience=10_000, min_batches=0, max_batches=None)
FP16_ON_CPU = "AMP with fp16 is not supported on CPU. Using `precision='bf16-mixed'` instead."
#: Largest relative difference of a module's score from the float32 run's, per precision (the
#: tiny model here; MiniLM and digits figures are in benchmarks/results/precision_agreement.md).
TOLERANCE = {"bf16-mixed": 2e-2, "bf16-true": 5e-2, "16-true": 5e-3}


class Net(nn.Module):
    """Tokens in, one prediction per sample: residual blocks of different depth score differently."""

    def __init__(self, width=16, depth=4, classes=3):
        super().__init__()
        self.embed = nn.Linear(4, width)  # 5 tokens x 4 -> 16: materialised per-sample gradients
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))  # Gram ("ghost") norms
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.out(h.mean(dim=1))


def new_task():
    """``Net`` as ``task.model``, the same weights each time; AdamW at 1e-2, each step's loss in ``task.losses``."""
    return Task(Net, lr=1e-2, record_losses=True)


def data(n=48, overflow_fp16=()):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, 4, generator=generator)
    y = (x[:, :, 0].mean(1) > 0).long() + (x[:, :, 1].mean(1) > 0).long()
    for i in overflow_fp16:
        x[i, 0, 0] = 1e5  # finite in float32 and bf16, inf in float16 (largest finite: 65504)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def analysed(precision, **kwargs):
    return analyze(new_task(), data(**kwargs), allocation=ALLOCATION, trainer_kwargs={**QUIET, "precision": precision},
                   **STOP)


def relative_differences(scores, reference):
    return [abs(scores[name] - reference[name]) / reference[name] for name in reference]


def key_tree(value):
    """The JSON's shape: keys (recursively) and value types, not the values."""
    if isinstance(value, dict):
        return {key: key_tree(v) for key, v in value.items()}
    if isinstance(value, list):
        return [key_tree(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


@pytest.fixture(scope="module")
def float32_map():
    return analysed("32-true")


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-true"])
def test_scores_spectra_and_ranks_agree_with_float32(precision, float32_map):
    fmap = analysed(precision)
    assert fmap.analysis.samples == float32_map.analysis.samples == 48 and fmap.analysis.skipped_samples == 0
    score_gap = relative_differences(fmap.scores, float32_map.scores)
    assert max(score_gap) < TOLERANCE[precision], score_gap
    top = {m.name: m.sigma_sq[0] for m in fmap.modules}
    assert max(relative_differences(top, {m.name: m.sigma_sq[0] for m in float32_map.modules})) < TOLERANCE[precision]
    assert fmap.ranks == float32_map.ranks  # the spectrum criterion
    trace = dataclasses.replace(ALLOCATION, criterion="trace")
    assert fmap.reallocate(trace).ranks == float32_map.reallocate(trace).ranks
    # The same file: keys and value types everywhere, only the numbers differ.
    assert key_tree(fmap.to_dict()) == key_tree(float32_map.to_dict())


def test_16_mixed_on_cpu_is_lightnings_bf16_mixed(recwarn):
    fmap = analysed("16-mixed")
    assert any(FP16_ON_CPU in str(w.message) for w in recwarn)
    assert fmap.scores == analysed("bf16-mixed").scores


def test_a_true_precision_gives_the_task_back_in_float32_bit_for_bit():
    task = new_task()
    before = {name: t.clone() for name, t in task.state_dict().items()}
    analyze(task, data(), trainer_kwargs={**QUIET, "precision": "bf16-true"}, max_batches=2, min_batches=0)
    after = task.state_dict()
    assert all(after[name].dtype == torch.float32 and torch.equal(after[name], before[name]) for name in before)
    assert all(p.requires_grad for p in task.parameters())
    pl.Trainer(max_epochs=1, limit_train_batches=2, enable_checkpointing=False, **QUIET).fit(task, data())


class DtypeSpy(pl.Callback):
    """What the analysis holds and computes in, batch by batch."""

    def __init__(self, monkeypatch):
        self.seen = set()
        for cls in (FisherAccumulator, SpectrumAccumulator):
            update = cls.update

            def spy(acc, values, *args, _update=update, **kwargs):
                self.seen.add((type(acc).__name__, "input", values.dtype, torch.is_autocast_enabled("cpu")))
                return _update(acc, values, *args, **kwargs)

            monkeypatch.setattr(cls, "update", spy)
        self.norms = FisherCollector._sq_norms

        def norms(collector, *args):
            out = self.norms(collector, *args)
            self.seen.add(("norms", "output", out.dtype, torch.is_autocast_enabled("cpu")))
            return out

        monkeypatch.setattr(FisherCollector, "_sq_norms", norms)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.add(("weights", "task", module.task.model.embed.weight.dtype, False))
        self.seen.update(("spectrum sums", "state", s.dtype, False)
                         for a in module.statistics.accumulators.values() for s in a._sums)
        self.seen.add(("trace sums", "state", module.accumulator.state_tensor().dtype, False))


@pytest.mark.parametrize("precision, weights", [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_sums_keep_their_dtypes_and_norms_float32_whatever_the_weights(precision, weights, monkeypatch):
    spy = DtypeSpy(monkeypatch)
    module = FisherAnalysisModule(new_task(), allocation=ALLOCATION)
    pl.Trainer(max_epochs=1, limit_train_batches=2, callbacks=[spy], enable_checkpointing=False,
               **{**QUIET, "precision": precision}).fit(module, data())
    # Observer and norms are float32 and outside autocast; the collector hands float64 values on.
    assert spy.seen == {
        ("weights", "task", weights, False),
        ("norms", "output", torch.float32, False),
        ("SpectrumAccumulator", "input", torch.float32, False),
        # called in the analysis' training step, inside bf16-mixed's autocast: float64 sums, no matrix product
        ("FisherAccumulator", "input", torch.float64, precision == "bf16-mixed"),
        ("trace sums", "state", torch.float64, False),
        # the spectrum's sums are float32 (their estimates float64): 3e-7 relative error, half the memory
        ("spectrum sums", "state", torch.float32, False),
    }
    assert module.fisher_map.analysis.samples == 16


def test_autocast_around_the_backward_does_not_change_the_norms():
    torch.manual_seed(0)
    model = Net().requires_grad_(False)
    x, y = next(iter(data()))

    def values(backward_in_autocast):
        with FisherCollector(model) as collector, collector.batch() as record:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x).float(), y)
                if backward_in_autocast:  # as inside a LightningModule's training_step under bf16-mixed
                    loss.backward()
            if not backward_in_autocast:
                loss.backward()
        return record.values

    assert torch.equal(values(True), values(False))


def test_fp16_overflow_is_skipped_and_counted_end_to_end():
    fmap = analyze(new_task(), data(overflow_fp16=[3, 20]), trainer_kwargs={**QUIET, "precision": "16-true"}, **STOP)
    assert fmap.analysis.skipped_samples == 2 and fmap.analysis.samples == 46
    assert all(math.isfinite(v) and v > 0 for v in fmap.scores.values())
    assert fmap.summary().endswith("; 2 non-finite samples skipped")
    # the same samples are finite in bf16 (float32's range)
    assert analyze(new_task(), data(overflow_fp16=[3, 20]), trainer_kwargs={**QUIET, "precision": "bf16-true"},
                   **STOP).analysis.skipped_samples == 0


def fit_and_export(fisher_map, precision, folder):
    task = new_task()
    callback = AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", export_dir=folder, verbose=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], enable_checkpointing=False, **{**QUIET, "precision": precision})
    trainer.fit(task, data())
    return task


def test_bf16_true_fit_trains_the_adapters_and_exports_what_a_float32_base_loads(float32_map, tmp_path):
    reference = fit_and_export(float32_map, "32-true", tmp_path / "fp32")
    task = fit_and_export(float32_map, "bf16-true", tmp_path / "bf16")
    lora = {name: p for name, p in task.model.named_parameters() if "lora_" in name}
    assert lora and {p.dtype for p in lora.values()} == {torch.bfloat16}
    assert all(math.isfinite(loss) for loss in task.losses) and len(task.losses) == 12
    assert all(p.abs().sum() > 0 for name, p in lora.items() if "lora_B" in name)  # B starts at zero: it trained
    # The folder has the float32 run's files and keys; the tensors keep the training dtype, as PEFT's own export.
    config, expected = (json.loads((tmp_path / f / "adapter_config.json").read_text()) for f in ("bf16", "fp32"))
    assert config == expected
    weights = safetensors.torch.load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert weights.keys() == safetensors.torch.load_file(tmp_path / "fp32" / "adapter_model.safetensors").keys()
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    loaded = peft.PeftModel.from_pretrained(new_task().model, str(tmp_path / "bf16"))
    loaded_lora = {name: p for name, p in loaded.named_parameters() if "lora_" in name}
    assert {p.dtype for p in loaded_lora.values()} == {torch.float32}
    assert all(torch.equal(loaded_lora[f"base_model.model.{name}"], p.float()) for name, p in lora.items())
    x = next(iter(data()))[0]
    with torch.no_grad():
        trained = task.model.float()(x)  # the bf16 run's base weights are the float32 ones rounded to bf16
        assert torch.allclose(loaded(x), trained, atol=3e-2)
        assert not torch.allclose(loaded(x), new_task().model(x), atol=1e-3)
    assert reference.model.embed.lora_A["default"].weight.dtype == torch.float32
