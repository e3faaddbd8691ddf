"""What the two diffusers examples share: running one as a user does, and checking the steps they share
(``diffusers_digits.pretrain_analyse_adapt_reload``) from its record."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from lightning_fisher import FisherMap

LORA_FILE = "pytorch_lora_weights.safetensors"


def run_example(module: str, out) -> tuple[dict, str, str]:
    """``python -m lightning_fisher.examples.MODULE OUT --focus texture``: its record, stdout and stderr."""
    result = subprocess.run([sys.executable, "-m", f"lightning_fisher.examples.{module}", str(out), "--focus", "texture"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "record.json").read_text())
    assert f"{len(record['ranks'])} adapters reloaded with the map's ranks" in result.stdout
    return record, result.stdout, result.stderr


def expected_layout(fisher_map: FisherMap) -> dict:
    """``{module: [rank, scale]}`` the map asks for (scale = alpha / rank)."""
    return {name: [rank, fisher_map.alphas[name] / rank] for name, rank in fisher_map.ranks.items()}


def assert_round_trip(out, record: dict) -> None:
    """Every module has the map's rank and alpha after training and after diffusers' save and load, no other
    module has an adapter, the reloaded LoRA gives the trained output, the analysis left the base unchanged and
    the fit moved every ``lora_B`` and lowered the held-out loss."""
    fisher_map = FisherMap.load(out)
    assert record["ranks"] == fisher_map.ranks and len(set(fisher_map.ranks.values())) > 2  # non-uniform
    assert record["alphas"] == fisher_map.alphas and record["loaded_ranks"] == fisher_map.ranks
    for name, (rank, scale) in expected_layout(fisher_map).items():
        assert record["trained"][name] == pytest.approx([rank, scale]), name
        assert record["loaded"][name] == pytest.approx([rank, scale]), name
    assert set(record["loaded"]) == set(fisher_map.ranks)
    assert record["reloaded_output_identical"]
    assert record["base_change_by_analysis"] == 0.0
    before, after = record["held_out_loss"]
    assert after < before
    weights = load_file(out / "lora" / LORA_FILE)
    assert min(float(w.abs().max()) for key, w in weights.items() if ".lora_B." in key) > 0.0  # PEFT starts them at 0
