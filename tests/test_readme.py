"""The README's runnable snippets run as written."""

import re
import subprocess
import sys
from pathlib import Path

from lightning_fisher import FisherMap

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(section: str) -> str:
    """The first ```python block under the README heading ``section``."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    block = re.search(r"```python\n(.*?)```", text[start:end], re.DOTALL)
    assert block, f"no python snippet under '## {section}'"
    return block.group(1)


def test_outside_the_trainer_snippet_writes_a_spectrum_map_that_peft_applies(tmp_path):
    code = snippet("Outside the Trainer")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fisher_map = FisherMap.load(tmp_path / "analysis")
    assert fisher_map.allocation.criterion == "spectrum" and fisher_map.ranks
    assert fisher_map.summary() in result.stdout
    assert "lightning" not in code.replace("lightning_fisher", "")  # no Lightning in sight
