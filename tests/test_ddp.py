"""Real DDP: two CPU processes on gloo, launched by Lightning's own DDP strategy."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fisher import FisherMap

SCRIPT = Path(__file__).parent / "scripts" / "ddp_analysis.py"
# Per-sample values are identical however samples are batched; the sums differ only in the
# order of float64 additions (per process, then across processes).
TOLERANCE = 1e-12


def run(mode, out, *extra):
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(out), *extra], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}


@pytest.mark.slow
def test_ddp_scores_equal_single_process_over_same_samples(tmp_path):
    ddp = run("ddp", tmp_path / "ddp")
    single = run("single", tmp_path / "single")
    assert set(ddp) == {0, 1} and set(single) == {0}
    reference = single[0]
    for rank, seen in ddp.items():
        assert seen["world_size"] == 2 and seen["samples"] == reference["samples"] == 96
        assert seen["batches"] == 6 and reference["batches"] == 12  # each rank ran its half of the shard
        for name, value in reference["scores"].items():
            assert seen["scores"][name] == pytest.approx(value, rel=TOLERANCE), (rank, name)
        assert seen["ranks"] == reference["ranks"]
    assert ddp[0]["scores"] == ddp[1]["scores"]  # bitwise: all ranks hold the all-reduced sums
    # only rank zero wrote the map, and it is the one every rank returned
    written = FisherMap.load(tmp_path / "ddp")
    assert written.scores == ddp[0]["scores"] and written.analysis.world_size == 2


@pytest.mark.slow
def test_ddp_ranks_stop_at_the_same_batch(tmp_path):
    ddp = run("ddp", tmp_path / "ddp", "--stability")
    assert ddp[0]["stop_reason"] == ddp[1]["stop_reason"] == "converged"
    assert ddp[0]["batches"] == ddp[1]["batches"] < 6
    assert ddp[0]["history"] == ddp[1]["history"]


@pytest.mark.slow
def test_ddp_ranks_stop_at_the_same_batch_on_the_spectrum_allocation(tmp_path):
    # the halves' sketches are summed over processes after every batch: one verdict for all ranks
    ddp = run("ddp", tmp_path / "ddp", "--stability", "--spectrum")
    assert ddp[0]["stop_reason"] == ddp[1]["stop_reason"] == "converged"
    assert ddp[0]["batches"] == ddp[1]["batches"] < 6
    assert ddp[0]["history"] == ddp[1]["history"]
    assert ddp[0]["method"] == "split-half spearman of the spectrum allocation's ranks over all modules"


@pytest.mark.slow
def test_ddp_spectra_sum_over_processes_and_equal_one_process(tmp_path):
    ddp = run("ddp", tmp_path / "ddp", "--spectrum")
    single = run("single", tmp_path / "single", "--spectrum")
    reference = single[0]
    assert ddp[0]["sigma_sq"] == ddp[1]["sigma_sq"] and ddp[0]["floors"] == ddp[1]["floors"]
    assert ddp[0]["ranks"] == ddp[1]["ranks"]
    for name, values in reference["sigma_sq"].items():
        # the mean gradient is the same sum over the same 96 samples, split over two processes
        assert ddp[0]["sigma_sq"][name] == pytest.approx(values, rel=1e-6), name
        # the floor compares two sample halves, which the processes split differently: same scale
        assert 0.2 < ddp[0]["floors"][name] / reference["floors"][name] < 5.0, name


FIT_SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


def fit(mode, map_file, out):
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(FIT_SCRIPT), mode, str(map_file), str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}


@pytest.mark.slow
def test_ddp_fit_with_a_map_trains_the_same_adapters_as_one_process(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FIT_SCRIPT.parent))
    from ddp_fit import Task
    from torch.utils.data import DataLoader, TensorDataset

    import torch

    from lightning_fisher import analyze

    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 2] > 0).long()), batch_size=16)
    fisher_map = analyze(Task(), data, output=tmp_path / "fisher_map.json", exclude=["head"], rank=4, rank_min=1,
                         rank_max=16, convergence_patience=10_000, min_batches=0, max_batches=None,
                         trainer_kwargs=dict(accelerator="cpu", devices=1, enable_progress_bar=False))
    ddp = fit("ddp", fisher_map.path, tmp_path / "ddp")
    single = fit("single", fisher_map.path, tmp_path / "single")
    assert set(ddp) == {0, 1} and set(single) == {0}
    expected_ranks = {name.removeprefix("encoder."): rank for name, rank in fisher_map.ranks.items()}
    for seen in (*ddp.values(), single[0]):
        assert seen["adapter_ranks"] == expected_ranks
        assert seen["steps"] == 6
    assert ddp[0]["world_size"] == 2
    assert ddp[0]["trainable"] == ddp[1]["trainable"]  # bitwise: DDP keeps the replicas equal
    assert any("lora_A" in name for name in single[0]["trainable"])
    assert set(ddp[0]["trainable"]) == set(single[0]["trainable"])
    for name, values in single[0]["trainable"].items():
        assert ddp[0]["trainable"][name] == pytest.approx(values, rel=1e-9, abs=1e-12), name
    assert ddp[0]["frozen"] == single[0]["frozen"]
    # rank zero exported a PEFT adapter folder that loads with the map's ranks and the trained weights
    import peft

    from lightning_fisher.peft_factory import adapter_ranks

    loaded = peft.PeftModel.from_pretrained(Task().encoder, str(tmp_path / "ddp" / "adapter"))
    assert adapter_ranks(loaded) == expected_ranks
    for name, parameter in loaded.named_parameters():
        if "lora_" in name:
            trained = ddp[0]["trainable"]["encoder." + name.removeprefix("base_model.model.")]
            assert parameter.detach().flatten().tolist() == trained, name
