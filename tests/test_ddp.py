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
