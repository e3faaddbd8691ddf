"""Comparison results (compare_results.py): the table, the verdict against seed noise, and the JSON record."""

import json

import pytest

from lightning_fisher.compare_plan import CompareArm
from lightning_fisher.compare_results import CompareResult, RunResult
from lightning_fisher.errors import CompareError


def test_verdict_and_table_from_numbers():
    def run(arm, seed, loss, parameters):
        return RunResult(arm, seed, parameters, 4, loss, {"val_loss": loss, "val_acc": 0.5}, 1.0, 10)

    arms = [CompareArm(name, 4, 1.0, None if name == "flat" else object(), {}, 0) for name in ("flat", "fisher")]
    noisy = CompareResult(arms, [0, 1, 2], [run("flat", s, l, 100) for s, l in enumerate([1.0, 1.2, 0.8])]
                          + [run("fisher", s, l, 96) for s, l in enumerate([1.05, 1.1, 0.85])])
    assert noisy.verdicts() == ["fisher vs flat: val_loss +0.0000 at 0.96x the parameters, "
                                "seed spread 0.1000 over 3 seeds: within noise"]
    clear = CompareResult(arms, [0, 1, 2], [run("flat", s, l, 100) for s, l in enumerate([1.0, 1.2, 0.8])]
                          + [run("fisher", s, l - 0.1 - 0.01 * s, 100) for s, l in enumerate([1.0, 1.2, 0.8])])
    assert clear.verdicts()[0].endswith("seed spread 0.0115 over 3 seeds: fisher better")
    table = clear.to_markdown().splitlines()
    assert "val_acc (mean ± std)" in table[0]
    assert [cell.strip() for cell in table[2].split("|")[1:8]] == [
        "flat", "4", "4", "100", "1.00x", "1.0000 ± 0.2000", "0.5000 ± 0.0000"]


def test_save_writes_the_runs_and_verdicts(tmp_path):
    arms = [CompareArm("flat", 4, 1.0, None, {"a": 4}, 40), CompareArm("fisher", 4, 1.0, object(), {"a": 3}, 30)]
    runs = [RunResult("flat", 0, 40, 1, 0.5, {"val_loss": 0.5}, 1.0, 3),
            RunResult("fisher", 0, 30, 1, 0.4, {"val_loss": 0.4}, 1.0, 3)]
    result = CompareResult(arms, [0], runs, fisher_map_path="m.json", notes=["a note"])
    path = result.save(tmp_path / "out" / "results.json")
    saved = json.loads(path.read_text())
    assert saved["fisher_map"] == "m.json" and saved["monitor"] == "val_loss" and saved["notes"] == ["a note"]
    assert [run["lora_parameters"] for run in saved["runs"]] == [40, 30]
    assert saved["arms"][1] == {"name": "fisher", "rank": 4, "budget_fraction": 1.0, "expected_lora_parameters": 30,
                                "modules": {"a": 3}}
    assert saved["verdicts"] == ["fisher vs flat: val_loss -0.1000 at 0.75x the parameters; one seed, so no noise "
                                 "estimate (run more seeds, e.g. --seeds 0,1,2)"]
    (tmp_path / "file").write_text("")
    with pytest.raises(CompareError, match="output: cannot write"):
        result.save(tmp_path / "file" / "results.json")
