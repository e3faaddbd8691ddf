"""The frontier figure of a comparison (report/frontier.py): written atomically as a PNG, refused early where it cannot be."""

import os
import sys

import pytest

from lightning_fisher.compare.plan import CompareArm
from lightning_fisher.compare.results import CompareResult, RunResult
from lightning_fisher.errors import CompareError
from lightning_fisher.report.frontier import check_frontier_destination, plot_frontier

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def result_with_twins(lrs=None):
    arms = [CompareArm("flat", 4, 1.0, None, {}, 100), CompareArm("flat@0.5", 2, 0.5, None, {}, 50),
            CompareArm("fisher", 4, 1.0, object(), {}, 96, twin="flat"),
            CompareArm("fisher@0.5", 2, 0.5, object(), {}, 48, twin="flat@0.5"),
            CompareArm("fisher-spectrum@0.5", 2, 0.5, object(), {}, 50, twin="flat@0.5")]
    losses = {"flat": [1.0, 1.2], "flat@0.5": [1.5, 1.7], "fisher": [1.05, 1.1], "fisher@0.5": [1.3, 1.49],
              "fisher-spectrum@0.5": [1.6, float("nan")]}
    runs = [RunResult(arm.name, seed, arm.expected_parameters, 4, loss, {"val_loss": loss}, 1.0, 10, lr=lr)
            for lr in (lrs or [None]) for arm in arms for seed, loss in enumerate(losses[arm.name])]
    return CompareResult(arms, [0, 1], runs, lrs=lrs)


def test_frontier_is_a_png_written_atomically(tmp_path):
    result = result_with_twins(lrs=[1e-3, 1e-2])
    # the diverged arm has no point; the others are one line per family
    assert {family: [p.arm for p in points] for family, points in result.frontier().items()} == {
        "flat": ["flat@0.5", "flat"], "fisher": ["fisher@0.5", "fisher"]}
    target = tmp_path / "figures" / "frontier.png"
    assert plot_frontier(result, target) == target
    first = target.read_bytes()
    assert first.startswith(PNG_SIGNATURE) and len(first) > 10_000
    assert os.listdir(target.parent) == ["frontier.png"]  # no temporary file left beside it

    # an existing file is replaced whole; a refused call leaves it as it was, with no temporary file
    plot_frontier(result_with_twins(), target, figsize=(4.0, 3.0))
    second = target.read_bytes()
    assert second.startswith(PNG_SIGNATURE) and second != first
    with pytest.raises(ValueError, match="dpi and figsize must be positive"):
        plot_frontier(result, target, dpi=0)
    with pytest.raises(CompareError, match="nothing to draw"):
        plot_frontier(CompareResult(result.arms, [0]), target)
    assert target.read_bytes() == second and os.listdir(target.parent) == ["frontier.png"]


def test_destination_is_refused_before_anything_runs(tmp_path, monkeypatch):
    assert check_frontier_destination(tmp_path / "new" / "deeper" / "f.png") == tmp_path / "new" / "deeper" / "f.png"
    assert not (tmp_path / "new").exists()  # checked, not created
    (tmp_path / "file").write_text("")
    with pytest.raises(CompareError, match=r"--plot: cannot write .*file, not a folder"):
        check_frontier_destination(tmp_path / "file" / "f.png", option="--plot")
    with pytest.raises(CompareError, match=r"plot: .*f\.svg: the frontier is written as a PNG image"):
        check_frontier_destination(tmp_path / "f.svg")
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(CompareError, match="is a folder"):
        check_frontier_destination(tmp_path / "taken.png")
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(CompareError, match="cannot write"):
            check_frontier_destination(locked / "f.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(CompareError, match=r"--plot: plotting needs matplotlib: pip install 'lightning-fisher\[plot\]'"):
        check_frontier_destination(tmp_path / "f.png", option="--plot")
    assert sorted(os.listdir(tmp_path)) == ["file", "taken.png"]
