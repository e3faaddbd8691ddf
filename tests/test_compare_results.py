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


def test_choose_learning_rate_ties_diverged_runs_and_shared_seeds():
    from lightning_fisher.compare_results import choose_learning_rate

    # Lowest mean over seeds wins; a diverged seed (None, NaN, inf) makes its LR the worst.
    assert choose_learning_rate({1e-4: {0: 0.9, 1: 0.7}, 1e-3: {0: 0.5, 1: 0.6}, 1e-2: {0: 0.1, 1: None}}) == 1e-3
    assert choose_learning_rate({1e-4: {0: 0.9}, 1e-3: {0: float("nan")}, 1e-2: {0: float("inf")}}) == 1e-4
    assert choose_learning_rate({1e-3: {0: None}, 1e-2: {0: None}}) == 1e-3  # every LR diverged: the lowest
    # Within the tolerance (1e-4) is a tie: the lower LR, unless the tie score of a higher one is better.
    tied = {1e-3: {0: 0.50000}, 3e-3: {0: 0.49995}}
    assert choose_learning_rate(tied) == 1e-3
    assert choose_learning_rate(tied, tie_scores={1e-3: {0: 0.6}, 3e-3: {0: 0.7}}) == 3e-3
    assert choose_learning_rate(tied, tie_scores={1e-3: {0: 0.7}, 3e-3: {0: 0.6}}) == 1e-3
    assert choose_learning_rate(tied, tolerance=0.0) == 3e-3
    # Means over the seeds every LR has: 3e-3's easy extra seeds do not count.
    assert choose_learning_rate({1e-3: {0: 0.80}, 3e-3: {0: 0.85, 1: 0.1, 2: 0.1}}) == 1e-3
    with pytest.raises(CompareError, match="no learning rates"):
        choose_learning_rate({})


def lr_result(losses):
    """``{(arm, lr): [val_loss per seed]}`` as a CompareResult over learning rates 1e-3 and 1e-2."""
    arms = [CompareArm(name, 4, 1.0, None if name == "flat" else object(), {}, 0) for name in ("flat", "fisher")]
    runs = [RunResult(arm, seed, 100, 4, loss, {"val_loss": loss}, 1.0, 10, lr=lr)
            for (arm, lr), values in losses.items() for seed, loss in enumerate(values)]
    return CompareResult(arms, list(range(len(next(iter(losses.values()))))), runs, lrs=[1e-3, 1e-2])


def test_each_arm_at_its_own_best_lr_against_the_seed_spread():
    # flat is best at 1e-2, fisher at 1e-3; fisher's best beats flat's best by 0.1 with stds 0.02 and 0.01
    result = lr_result({("flat", 1e-3): [0.90, 0.92, 0.88], ("flat", 1e-2): [0.60, 0.62, 0.58],
                        ("fisher", 1e-3): [0.50, 0.51, 0.49], ("fisher", 1e-2): [0.70, 0.70, 0.70]})
    assert result.chosen_lrs() == {"flat": 1e-2, "fisher": 1e-3}
    verdicts = result.verdicts()
    assert verdicts[0] == "at each arm's own best learning rate: fisher (val_loss 0.5000 ± 0.0100 at lr 0.001) is best"
    assert verdicts[1] == ("  fisher vs flat (val_loss 0.6000 ± 0.0200 at lr 0.01): -0.1000, more than the seed "
                           "spread 0.0200 (sample std): fisher better")
    assert verdicts[2].startswith("at lr 0.001, fisher vs flat: val_loss -0.4000") and verdicts[2].endswith("fisher better")
    assert verdicts[3].startswith("at lr 0.01, fisher vs flat: val_loss +0.1000") and verdicts[3].endswith("flat better")
    table = result.to_markdown()
    best, equal = table.split("At equal learning rates:")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in best.splitlines()
            if line.startswith("| f")}
    assert rows["flat"][5:7] == ["0.01", "0.6000 ± 0.0200"] and rows["fisher"][5:7] == ["0.001", "0.5000 ± 0.0100"]
    assert "| val_loss at lr 0.001 | val_loss at lr 0.01" in equal and "0.9000 ± 0.0200" in equal
    assert result.to_dict()["chosen_lrs"] == {"flat": 1e-2, "fisher": 1e-3}
    assert result.to_dict()["runs"][0]["lr"] == 1e-3

    close = lr_result({("flat", 1e-3): [0.52, 0.56, 0.48], ("flat", 1e-2): [0.9, 0.9, 0.9],
                       ("fisher", 1e-3): [0.50, 0.51, 0.49], ("fisher", 1e-2): [0.9, float("nan"), 0.9]})
    assert close.verdicts()[1].endswith("-0.0200, within the seed spread 0.0400 (sample std): no clear winner")
    assert "diverged" in close.to_markdown().split("At equal learning rates:")[1]
