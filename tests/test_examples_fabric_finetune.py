"""The Fabric example: analysis inside ``fabric.launch`` with DDP (2 processes, gloo) gives the map of one process."""

import json
import subprocess
import sys

import pytest

from lightning_fisher import FisherMap

# Per-sample values are identical however samples are shared out; the sums differ only in the
# order of float64 additions (per process, then across processes).
TOLERANCE = 1e-12


def run(out, devices, *extra):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_fisher.examples.fabric_finetune", str(out), "--devices", str(devices), *extra],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}, result.stdout


@pytest.mark.slow
def test_fabric_ddp_analysis_equals_one_process_and_the_adapters_train(tmp_path):
    ddp, printed = run(tmp_path / "ddp", 2, "--whole-data")
    single, _ = run(tmp_path / "single", 1, "--whole-data")
    assert set(ddp) == {0, 1} and set(single) == {0}
    reference = single[0]
    assert reference["samples"] == 96 and reference["batches"] == 12
    for rank, seen in ddp.items():
        assert seen["world_size"] == 2 and seen["samples"] == 96 and seen["batches"] == 6  # each its half
        for name, value in reference["scores"].items():
            assert seen["scores"][name] == pytest.approx(value, rel=TOLERANCE), (rank, name)
        assert seen["ranks"] == reference["ranks"] == seen["adapter_ranks"]
    assert ddp[0]["scores"] == ddp[1]["scores"]  # bitwise: every process holds the all-reduced sums
    assert len(set(reference["ranks"].values())) > 1  # an adaptive map, not a flat one
    # only rank zero wrote the map, and it is the one every process returned
    written = FisherMap.load(tmp_path / "ddp")
    assert written.scores == ddp[0]["scores"] and written.analysis.world_size == 2
    # the adapters trained: the loss (averaged over processes) went down over the steps
    assert ddp[0]["losses"] == ddp[1]["losses"] and ddp[0]["losses"][-1] < ddp[0]["losses"][0]
    assert f"adapters {ddp[0]['adapter_ranks']}" in printed


@pytest.mark.slow
def test_fabric_ddp_processes_stop_at_the_same_batch(tmp_path):
    ddp, _ = run(tmp_path / "ddp", 2)  # the default stopping rule
    assert ddp[0]["stop_reason"] == ddp[1]["stop_reason"] == "converged"
    assert ddp[0]["batches"] == ddp[1]["batches"] < 6 and ddp[0]["history"] == ddp[1]["history"]
    assert ddp[0]["scores"] == ddp[1]["scores"] and ddp[0]["adapter_ranks"] == ddp[1]["adapter_ranks"]
