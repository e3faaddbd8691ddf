"""Quantized bases (bitsandbytes 4-bit nf4 / fp4 and 8-bit on CPU): analysed, adapted, trained, exported.

A bitsandbytes layer is an ``nn.Linear`` whose weight is packed (4-bit: ``[out * in / 2, 1]``
bytes, repacked again on CPU at the first inference forward), so these tests check that every
size comes from ``in_features`` / ``out_features``, and that PEFT wraps the layers in its bnb
LoRA layers.
"""

import lightning.pytorch as pl
import peft
import pytest
import safetensors.torch
import torch
from _tasks import Task, classification_data
from torch import nn

from lightning_fisher import AdaptiveLoRA, AllocationSettings, analyze
from lightning_fisher.analysis.candidates import num_parameters, rank_cost, weight_shape
from lightning_fisher.analysis.fingerprint import model_fingerprint, parameter_count
from lightning_fisher.peft_factory import adapter_ranks, check_model, quantization_declared, quantization_flags
from lightning_fisher.analysis.spectrum import SpectrumSet

bnb = pytest.importorskip("bitsandbytes")

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, logger=False)
# bitsandbytes repacks a 4-bit weight for its CPU kernel at the first inference forward (eval,
# input without grad); that needs in_features a multiple of the block size (64) and
# out_features a multiple of 32, so the quantized layers are 64 wide.
WIDTH = 64


def quantize(module: nn.Module, kind: str) -> nn.Module:
    """Every ``nn.Linear`` under ``module`` replaced by a bitsandbytes layer with its weights."""
    for name, child in list(module.named_children()):
        if type(child) is not nn.Linear:
            quantize(child, kind)
            continue
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type=kind)
        layer.load_state_dict(child.state_dict())
        setattr(module, name, layer.to("cpu"))  # quantized on the move to a device
    return module


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def new_task(kind=None, lr=1e-2):
    """A base of three linear layers (quantized unless ``kind`` is None) and a full-precision head."""
    task = Task(Net, head=lambda: nn.Linear(WIDTH, 4), lr=lr, record_losses=True)
    if kind is not None:
        quantize(task.model, kind)
    return task


def data():
    return classification_data(128, WIDTH, classes=4, batch_size=16)


def run_analysis(task, criterion="trace"):
    allocation = AllocationSettings(rank=4, rank_min=1, rank_max=8, mode="budget", criterion=criterion)
    return analyze(task, data(), allocation=allocation, convergence_patience=2, min_batches=8,
                   stability_threshold=0.0, trainer_kwargs=QUIET)


@pytest.fixture(scope="module")
def maps():
    return {kind: run_analysis(new_task(kind)) for kind in (None, "nf4", "fp4", "int8")}


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_sizes_come_from_in_and_out_features_not_the_packed_weight(kind):
    plain = nn.Sequential(nn.Linear(2 * WIDTH, WIDTH), nn.Linear(WIDTH, 2 * WIDTH, bias=False))
    quantized = quantize(nn.Sequential(nn.Linear(2 * WIDTH, WIDTH), nn.Linear(WIDTH, 2 * WIDTH, bias=False)), kind)
    layer = quantized[0]
    if kind != "int8":  # int8 keeps the [out, in] layout; 4-bit packs two values per byte
        assert tuple(layer.weight.shape) == (WIDTH * WIDTH, 1)
    assert weight_shape(layer) == (WIDTH, 2 * WIDTH)
    assert rank_cost(layer) == 3 * WIDTH
    assert num_parameters(layer) == 2 * WIDTH * WIDTH + WIDTH  # the normaliser of the trace score
    assert num_parameters(quantized[1]) == 2 * WIDTH * WIDTH
    assert model_fingerprint(quantized) == model_fingerprint(plain)
    assert parameter_count(quantized) == parameter_count(plain) == 4 * WIDTH * WIDTH + WIDTH
    quantized.eval()
    with torch.no_grad():
        quantized(torch.randn(2, 2 * WIDTH))  # bitsandbytes may repack a 4-bit weight for CPU here
    assert model_fingerprint(quantized) == model_fingerprint(plain)
    spectra = SpectrumSet({"0": layer}, rank_max=4)
    assert (spectra.accumulators["0"].d_in, spectra.accumulators["0"].d_out) == (2 * WIDTH, WIDTH)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_trace_map_of_a_quantized_base_matches_the_full_precision_one(maps, kind):
    full, quantized = maps[None], maps[kind]
    assert set(quantized.scores) == set(full.scores) == {"model.layers.0", "model.layers.1", "model.layers.2", "head"}
    records = {m.name: m for m in quantized.modules}
    for f in full.modules:
        q, name = records[f.name], f.name
        assert (q.shape, q.rank_cost) == (f.shape, f.rank_cost)
        # Rounded weights, the same logical numel: within 6 % here (the packed numel would double a 4-bit score).
        assert 0.8 < q.score / f.score < 1.25, name
    assert quantized.model.fingerprint == full.model.fingerprint
    assert quantized.model.num_parameters == full.model.num_parameters == 3 * (WIDTH * WIDTH + WIDTH) + WIDTH * 4 + 4
    assert check_model(full, new_task(kind)) is None  # a map made in full precision applies to the quantized base


@pytest.fixture(scope="module")
def full_precision_spectrum_map():
    return run_analysis(new_task(), criterion="spectrum")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_spectrum_criterion_on_a_quantized_base(full_precision_spectrum_map, kind):
    fisher_map = run_analysis(new_task(kind), criterion="spectrum")
    full = {m.name: m for m in full_precision_spectrum_map.modules}
    for record in fisher_map.modules:
        assert len(record.sigma_sq) == len(full[record.name].sigma_sq) == min(8, *record.shape)  # rank_max values
        assert 0.8 < record.sigma_sq[0] / full[record.name].sigma_sq[0] < 1.25, record.name
    assert set(fisher_map.ranks) == set(full_precision_spectrum_map.ranks) == {"model.layers.0", "model.layers.1"}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adaptive_lora_trains_and_exports_on_a_quantized_base(maps, kind, tmp_path):
    task = new_task(kind, lr=1e-2)
    packed = task.model.layers[1].weight.detach().clone()
    callback = AdaptiveLoRA(fisher_map=maps["nf4"], adapter_root="model", export_dir=tmp_path / "adapter")
    trainer = pl.Trainer(max_epochs=3, callbacks=[callback], enable_checkpointing=False, **QUIET)
    trainer.fit(task, train_dataloaders=data())

    expected = {name[len("model."):]: rank for name, rank in maps["nf4"].ranks.items() if name.startswith("model.")}
    assert adapter_ranks(task.model) == expected
    bnb_layer = peft.tuners.lora.bnb.Linear4bit if kind == "nf4" else peft.tuners.lora.bnb.Linear8bitLt
    for name in expected:
        assert isinstance(task.model.get_submodule(name), bnb_layer)  # PEFT's bnb layer: merging dequantizes
    assert not hasattr(task.model, "is_loaded_in_4bit") and not hasattr(task.model, "is_loaded_in_8bit")
    adapted = task.model.get_submodule(next(iter(expected)))
    assert adapted.lora_B["default"].weight.abs().sum() > 0  # LoRA B starts at zero: the adapter trained
    assert torch.equal(task.model.layers[1].base_layer.weight, packed)  # the quantized base stayed frozen
    epoch = len(task.losses) // 3
    assert sum(task.losses[-epoch:]) < sum(task.losses[:epoch])

    saved = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    ranks = {key[len("base_model.model."):-len(".lora_A.weight")]: value.shape[0]
             for key, value in saved.items() if key.endswith("lora_A.weight")}
    assert ranks == expected
    base = new_task(kind).model  # the same seed: the same quantized weights
    with quantization_declared(base):
        loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert adapter_ranks(loaded) == expected and isinstance(base.layers[0], bnb_layer)
    x = torch.randn(5, WIDTH)
    task.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), task.model(x), atol=1e-4)


def test_quantization_declared_sets_only_the_missing_flags_and_restores_them():
    quantized = quantize(nn.Sequential(nn.Linear(WIDTH, WIDTH)), "nf4")
    assert quantization_flags(quantized) == ["is_loaded_in_4bit"]
    assert quantization_flags(nn.Sequential(nn.Linear(WIDTH, WIDTH))) == []
    with quantization_declared(quantized):
        assert quantized.is_loaded_in_4bit is True
    assert not hasattr(quantized, "is_loaded_in_4bit")
    quantized.is_loaded_in_4bit = False
    with quantization_declared(quantized):
        assert quantized.is_loaded_in_4bit is True
    assert quantized.is_loaded_in_4bit is False
