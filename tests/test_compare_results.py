"""Comparison results (compare_results.py): the table, the verdict against seed noise, and the JSON record."""

import json

import pytest

from lightning_fisher.compare.plan import CompareArm
from lightning_fisher.compare.results import CompareResult, FrontierPoint, RunResult
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
                                "modules": {"a": 3}, "family": "fisher", "twin": None}
    assert saved["verdicts"] == ["fisher vs flat: val_loss -0.1000 at 0.75x the parameters; one seed, so no noise "
                                 "estimate (run more seeds, e.g. --seeds 0,1,2)"]
    (tmp_path / "file").write_text("")
    with pytest.raises(CompareError, match="output: cannot write"):
        result.save(tmp_path / "file" / "results.json")


def test_choose_learning_rate_ties_diverged_runs_and_shared_seeds():
    from lightning_fisher.compare.results import choose_learning_rate

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


def twin_result(lrs=None):
    """flat, its twin flat@0.5 and three fisher arms over 3 seeds; fisher@0.5 loses to flat, beats its twin."""
    arms = [CompareArm("flat", 4, 1.0, None, {}, 100), CompareArm("flat@0.5", 2, 0.5, None, {}, 50),
            CompareArm("fisher", 4, 1.0, object(), {}, 96, twin="flat"),
            CompareArm("fisher@0.5", 2, 0.5, object(), {}, 48, twin="flat@0.5"),
            CompareArm("fisher-spectrum@0.5", 2, 0.5, object(), {}, 50, twin="flat@0.5")]
    losses = {"flat": [1.0, 1.2, 0.8], "flat@0.5": [1.5, 1.7, 1.3], "fisher": [1.05, 1.1, 0.85],
              "fisher@0.5": [1.3, 1.49, 1.12], "fisher-spectrum@0.5": [1.6, 1.81, 1.41]}
    parameters = {"flat": 100, "flat@0.5": 50, "fisher": 96, "fisher@0.5": 48, "fisher-spectrum@0.5": 50}
    runs = [RunResult(arm, seed, parameters[arm], 4, loss, {"val_loss": loss}, 1.0, 10, lr=lr)
            for lr in (lrs or [None]) for arm, values in losses.items() for seed, loss in enumerate(values)]
    return CompareResult(arms, [0, 1, 2], runs, lrs=lrs)


def test_each_fisher_arm_is_judged_against_its_flat_twin():
    result = twin_result()
    # fisher@0.5 is 0.3 worse than full-rank flat, but it is judged against flat@0.5, which it beats
    assert result.verdicts() == [
        "fisher vs flat: val_loss +0.0000 at 0.96x the parameters, seed spread 0.1000 over 3 seeds: within noise",
        "fisher@0.5 vs flat@0.5: val_loss -0.1967 at 0.96x the parameters, seed spread 0.0176 over 3 seeds: "
        "fisher@0.5 better",
        "fisher-spectrum@0.5 vs flat@0.5: val_loss +0.1067 at 1.00x the parameters, seed spread 0.0067 over 3 seeds: "
        "flat@0.5 better",
    ]
    assert [(v.arm, v.twin, v.outcome) for v in result.twin_verdicts()] == [
        ("fisher", "flat", "parity"), ("fisher@0.5", "flat@0.5", "ahead"), ("fisher-spectrum@0.5", "flat@0.5", "behind")]
    assert result.summary() == (
        "At equal parameters (paired by seed, judged by the seed spread): at 1 of rank 4, parity of fisher and flat; "
        "at 0.5 of rank 4, fisher ahead of flat@0.5 by 0.1967 val_loss, flat@0.5 ahead of fisher-spectrum by "
        "0.1067 val_loss.")
    assert str(result).endswith(result.summary())
    saved = result.to_dict()
    assert [arm["twin"] for arm in saved["arms"]] == [None, None, "flat", "flat@0.5", "flat@0.5"]
    assert saved["twin_verdicts"][1] == {"arm": "fisher@0.5", "twin": "flat@0.5", "budget_fraction": 0.5,
                                         "delta": pytest.approx(-0.19667, abs=1e-5),
                                         "spread": pytest.approx(0.017638, abs=1e-5), "outcome": "ahead"}
    assert saved["summary"] == result.summary()
    # the table keeps full-rank flat as context: the twin is at 0.50x its parameters
    rows = {line.split("|")[1].strip(): line for line in result.to_markdown().splitlines()[2:]}
    assert "| 0.50x " in rows["flat@0.5"] and "| 0.48x " in rows["fisher@0.5"]


def test_with_lrs_each_fisher_arm_meets_its_twin_at_their_own_best_lrs():
    result = twin_result(lrs=[1e-3])
    verdicts = result.verdicts()
    assert verdicts[0] == "at each arm's own best learning rate: flat (val_loss 1.0000 ± 0.2000 at lr 0.001) is best"
    assert verdicts[1] == ("  fisher vs flat (val_loss 1.0000 ± 0.2000 at lr 0.001): +0.0000, within the seed spread "
                           "0.2000 (sample std): no clear winner")
    assert verdicts[2] == ("  fisher@0.5 vs flat@0.5 (val_loss 1.5000 ± 0.2000 at lr 0.001): -0.1967, within the seed "
                           "spread 0.2000 (sample std): no clear winner")
    assert verdicts[4].startswith("at lr 0.001, fisher vs flat: val_loss +0.0000")
    assert result.summary().startswith("At equal parameters (each arm at its own best learning rate, judged by the "
                                       "seed spread): at 1 of rank 4, parity of fisher and flat; at 0.5 of rank 4, "
                                       "parity of fisher and flat@0.5, parity of fisher-spectrum and flat@0.5")


def test_frontier_points_per_family_at_the_chosen_lr():
    result = twin_result(lrs=[1e-3, 1e-2])
    frontier = result.frontier()
    assert list(frontier) == ["flat", "fisher", "fisher-spectrum"]
    flat = frontier["flat"]
    assert [(p.arm, p.parameters, p.lr, p.seeds) for p in flat] == [("flat@0.5", 50, 1e-3, 3), ("flat", 100, 1e-3, 3)]
    assert flat[1].mean == pytest.approx(1.0) and flat[1].std == pytest.approx(0.2)
    assert [p.arm for p in frontier["fisher"]] == ["fisher@0.5", "fisher"]
    one_seed = CompareResult(result.arms[:1], [0], [RunResult("flat", 0, 100, 4, 0.7, {"val_loss": 0.7}, 1.0, 10)])
    assert one_seed.frontier() == {"flat": [FrontierPoint("flat", "flat", 100, 0.7, None, None, 1)]}
    assert one_seed.summary() == ""
