"""The runnable snippets of the docs pages run as written (the README's own: test_readme_example.py)."""

import re
import subprocess
import sys
from pathlib import Path

from lightning_fisher import FisherMap

DOCS = Path(__file__).resolve().parents[1] / "docs"


def snippet(page: str) -> str:
    """The first ```python block of the docs page ``page``."""
    block = re.search(r"```python\n(.*?)```", (DOCS / page).read_text(), re.DOTALL)
    assert block, f"no python snippet in docs/{page}"
    return block.group(1)


def test_outside_the_trainer_snippet_writes_a_spectrum_map_that_peft_applies(tmp_path):
    code = snippet("outside-the-trainer.md")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fisher_map = FisherMap.load(tmp_path / "analysis")
    assert fisher_map.allocation.criterion == "spectrum" and fisher_map.ranks
    assert fisher_map.summary() in result.stdout
    assert "lightning" not in code.replace("lightning_fisher", "")  # no Lightning in sight
