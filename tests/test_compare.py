"""lightning-fisher compare: flat LoRA versus the map at the same budget, on real Lightning fits."""

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from cli_models import TinyClassifier
from lightning_fisher import AdaptiveLoRA, FisherMap, FisherMapNotFoundError, TensorDirectoryDataModule, write_sample_folder
from lightning_fisher.allocation import allocate_ranks, lora_parameters
from lightning_fisher.cli import main
from lightning_fisher.cli.compare import run_compare
from lightning_fisher.training.compare import CompareArm, CompareError, CompareResult, RunResult, compare_fisher_map, plan_arms

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


class NoValLossClassifier(TinyClassifier):
    """Same parameters as TinyClassifier (so the map fits), but validation logs only an accuracy."""

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch["x"]).argmax(-1) == batch["label"]).float().mean())


def write_dataset(folder):
    generator = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 8, generator=generator)
    write_sample_folder(folder, [{"x": x, "label": torch.tensor(int(x[0] > 0) + int(x[1] > 0))} for x in xs])
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A dataset folder with a map from `lightning-fisher analyze` (median mode, rank 4)."""
    folder = write_dataset(tmp_path_factory.mktemp("compare") / "data")
    code = main(["analyze", "--model", "cli_models.TinyClassifier", "--dataset-dir", str(folder), "--rank", "4",
                 "--rank-min", "1", "--rank-max", "16", "--exclude", "head", "--data.batch_size", "8",
                 "--convergence-patience", "2", "--min-batches", "2", "--stability-threshold", "0.0", *QUIET])
    assert code == 0
    return folder


def fit_config(path, dataset, root, model="cli_models.TinyClassifier"):
    """A fit config as users have them: checkpoints, an export folder, no validation."""
    config = {
        "model": {"class_path": model},
        "dataset_dir": str(dataset),
        "data": {"class_path": "lightning_fisher.TensorDirectoryDataModule", "init_args": {"batch_size": 8}},
        "adaptive_lora": {"adapter_root": "backbone", "export_dir": str(root / "adapter")},
        "trainer": {"max_epochs": 3, "default_root_dir": str(root), "limit_val_batches": 0,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}]},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def files_under(folder):
    return {p for p in Path(folder).rglob("*") if p.is_file()}


def budget_parameters(fisher_map, rank):
    """LoRA parameters of the map's scores allocated in budget mode at ``rank``, computed independently."""
    b = fisher_map.budget
    ranks = allocate_ranks(fisher_map.scores, rank=rank, rank_min=b.rank_min, rank_max=b.rank_max, mode="budget",
                           rank_costs=fisher_map.rank_costs, score_power=b.score_power,
                           exclude_threshold=b.exclude_threshold)
    return lora_parameters(ranks, fisher_map.rank_costs)


def test_compare_runs_flat_fisher_and_half_budget(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = fit_config(tmp_path / "fit.yaml", dataset, tmp_path / "runs")
    before = files_under(tmp_path) | files_under(dataset)
    output = tmp_path / "results.json"
    code = main(["compare", "--config", str(config), "--budgets", "1.0,0.5", "--seeds", "0,1", "--max-steps", "8",
                        "--output", str(output)])
    assert code == 0

    fisher_map = FisherMap.load(dataset)
    assert fisher_map.budget.mode == "median" and fisher_map.budget.rank == 4
    costs = fisher_map.rank_costs
    step = max(costs.values())  # one rank step of the widest module
    flat = 4 * sum(costs.values())
    fisher = budget_parameters(fisher_map, 4)
    half = budget_parameters(fisher_map, 2)
    assert flat - step < fisher <= flat
    assert 2 * sum(costs.values()) - step < half <= 2 * sum(costs.values())

    results = json.loads(output.read_text())
    runs = results["runs"]
    assert len(runs) == 6
    assert {(r["arm"], r["seed"]) for r in runs} == {(a, s) for a in ("flat", "fisher", "fisher@0.5") for s in (0, 1)}
    counted = {r["arm"]: r["lora_parameters"] for r in runs}  # counted in the model after injection
    assert counted == {"flat": flat, "fisher": fisher, "fisher@0.5": half}
    assert 0.4 < half / flat <= 0.5
    for run in runs:
        assert math.isfinite(run["val_loss"]) and run["val_loss"] > 0
        assert run["metrics"]["val_loss"] == run["val_loss"] and 0 <= run["metrics"]["val_acc"] <= 1
        assert run["steps"] == 8
    by_seed = {r["seed"]: r["val_loss"] for r in runs if r["arm"] == "flat"}
    assert by_seed[0] != by_seed[1]
    assert [arm["name"] for arm in results["arms"]] == ["flat", "fisher", "fisher@0.5"]
    assert results["arms"][0]["modules"] == {"0": 4, "2": 4, "4": 4, "6": 4}  # the map's candidates, rebased

    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    assert [row.split("|")[1].strip() for row in rows] == ["flat", "fisher", "fisher@0.5"]
    flat_losses = [r["val_loss"] for r in runs if r["arm"] == "flat"]
    mean = sum(flat_losses) / 2
    std = abs(flat_losses[0] - flat_losses[1]) / math.sqrt(2)
    assert f"{mean:.4f} ± {std:.4f}" in rows[0] and f"{flat:,}" in rows[0] and "1.00x" in rows[0]
    assert f"{half / flat:.2f}x" in rows[2]
    assert "fisher vs flat: val_loss" in out and "seed spread" in out
    assert "val_fraction=0.2" in out  # the config had no validation data: compare says what it did

    # Checkpoints, the export folder, logs and the trainer's root: none of them were written.
    assert files_under(tmp_path) | files_under(dataset) == before | {output}
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob("*.ckpt"))


def test_python_api(dataset, tmp_path):
    """compare_fisher_map from a script: a factory of fresh (model, datamodule, trainer)."""
    def make_run():
        trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[AdaptiveLoRA(adapter_root="backbone", lora_kwargs={"lora_dropout": 0.0})])
        return TinyClassifier(), TensorDirectoryDataModule(dataset, batch_size=8, val_fraction=0.25), trainer

    result = compare_fisher_map(make_run, dataset, seeds=[3])
    assert [arm.name for arm in result.arms] == ["flat", "fisher"]
    assert [(run.arm, run.seed, run.steps) for run in result.runs] == [("flat", 3, 4), ("fisher", 3, 4)]
    fisher_map = FisherMap.load(dataset)
    assert result.runs[0].lora_parameters == 4 * sum(fisher_map.rank_costs.values())
    assert result.runs[1].lora_parameters == budget_parameters(fisher_map, 4)
    assert "one seed, so no noise estimate" in result.verdicts()[0]
    assert not list(tmp_path.rglob("*"))


def test_plan_reuses_a_budget_map_and_checks_budgets(dataset):
    median_map = FisherMap.load(dataset)
    b = median_map.budget
    budget_map = FisherMap.from_scores(median_map.scores, TinyClassifier(), rank=4, rank_min=b.rank_min,
                                       rank_max=b.rank_max, mode="budget")
    arms = plan_arms(budget_map, TinyClassifier(), budgets=[0.5, 1.0], adapter_root="backbone")
    assert [arm.name for arm in arms] == ["flat", "fisher", "fisher@0.5"]  # 1.0 first, whatever the order given
    assert arms[1].fisher_map is budget_map and arms[2].rank == 2
    assert arms[1].modules == {name.split(".")[1]: r for name, r in budget_map.ranks.items()}
    # Same scaling in every arm: alpha / rank of the smaller budget equals the map's.
    assert arms[2].fisher_map.alpha.lora_alpha / 2 == budget_map.alpha.lora_alpha / 4

    with pytest.raises(CompareError, match=r"budgets: 0.9 and 1 both give rank 4"):
        plan_arms(budget_map, TinyClassifier(), budgets=[1.0, 0.9])
    with pytest.raises(CompareError, match="above the map's rank_max 16"):
        plan_arms(budget_map, TinyClassifier(), budgets=[5.0])
    with pytest.raises(CompareError, match="adapter_root='head'"):
        plan_arms(budget_map, TinyClassifier(), adapter_root="head")


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


def test_missing_map_is_a_clear_error(tmp_path):
    folder = write_dataset(tmp_path / "no_map")
    config = fit_config(tmp_path / "fit.yaml", folder, tmp_path / "runs")
    with pytest.raises(FisherMapNotFoundError, match="run lightning-fisher analyze first") as error:
        run_compare(["--config", str(config)])
    assert str(folder / "fisher_map.json") in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_model_without_val_loss_is_a_clear_error(dataset, tmp_path):
    config = fit_config(tmp_path / "fit.yaml", dataset, tmp_path / "runs", model="test_compare.NoValLossClassifier")
    with pytest.raises(CompareError, match=r"logs no 'val_loss' in validation \(validation metrics logged: val_acc\)"):
        run_compare(["--config", str(config), "--seeds", "0", "--max-steps", "2"])


@pytest.mark.parametrize(
    "extra, message",
    [(["--budgets", "1.0,zero"], "--budgets: expected comma-separated numbers"),
     (["--budgets", "-0.5"], "--budgets: each must be a positive fraction"),
     (["--seeds", "0,0"], "--seeds: each seed once"),
     (["--max-steps", "0"], "--max_steps: must be a positive number")],
)
def test_option_errors_name_the_option(dataset, tmp_path, extra, message):
    config = fit_config(tmp_path / "fit.yaml", dataset, tmp_path / "runs")
    with pytest.raises(CompareError, match=message.replace("(", r"\(")):
        run_compare(["--config", str(config), *extra])
