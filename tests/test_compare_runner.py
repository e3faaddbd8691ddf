"""Running a comparison (training/compare_runner.py): real Lightning fits of every arm and seed."""

import lightning.pytorch as pl
import pytest

from cli_models import TinyClassifier
from compare_data import budget_parameters, dataset  # noqa: F401 (dataset is a fixture)
from lightning_fisher import AdaptiveLoRA, FisherMap, TensorDirectoryDataModule
from lightning_fisher.errors import CompareError
from lightning_fisher.training.compare_runner import compare_fisher_map


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


def test_arms_keep_your_alpha_scaling_and_options(dataset, tmp_path):
    """Your lora_alpha is the alpha at the map's base rank: every arm gets the same scaling; map-owned options are noted."""
    callbacks = []

    def make_run():
        callback = AdaptiveLoRA(adapter_root="backbone", lora_kwargs={"lora_alpha": 2.0, "lora_dropout": 0.0, "r": 32})
        callbacks.append(callback)
        trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback])
        return TinyClassifier(), TensorDirectoryDataModule(dataset, batch_size=8, val_fraction=0.25), trainer

    result = compare_fisher_map(make_run, dataset, budgets=[0.5], seeds=[0])
    assert [arm.name for arm in result.arms] == ["flat", "flat@0.5", "fisher", "fisher@0.5"]
    # one model and callback serve the first run; the others build their own
    flat, twin, fisher, half = callbacks
    assert flat.config.r == 4 and flat.config.lora_alpha == 2.0 and flat.config.lora_dropout == 0.0
    assert twin.config.r == 2 and twin.config.lora_alpha == 1.0 and twin.config.lora_dropout == 0.0
    assert fisher.config.lora_alpha == 2.0
    assert half.config.r == 2 and half.config.lora_alpha == 1.0  # alpha / rank stays 2 / 4
    # the twin is flat LoRA at half the rank on the same modules: half flat's parameters, counted after injection
    counted = {run.arm: (run.lora_parameters, run.adapted_modules) for run in result.runs}
    assert counted["flat@0.5"] == (counted["flat"][0] // 2, counted["flat"][1]) == (
        2 * sum(FisherMap.load(dataset).rank_costs.values()), 4)
    assert result.verdicts()[1].startswith("fisher@0.5 vs flat@0.5: val_loss ")
    assert any("lora_kwargs r: ignored" in note for note in result.notes)


def test_bad_seeds_fail_before_any_run(dataset):
    def make_run():
        raise AssertionError("no run may start")

    with pytest.raises(CompareError, match="seeds: need one or more distinct integers"):
        compare_fisher_map(make_run, dataset, seeds=[1, 1])
    with pytest.raises(CompareError, match="budgets: each must be a positive fraction"):
        compare_fisher_map(make_run, dataset, budgets=[0], seeds=[0])


def test_python_api_with_learning_rates(dataset, tmp_path):
    """With lrs, make_run takes the learning rate; every arm runs at each and picks its own on validation."""
    def make_run(lr):
        trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[AdaptiveLoRA(adapter_root="backbone", lora_kwargs={"lora_dropout": 0.0})])
        return TinyClassifier(lr=lr), TensorDirectoryDataModule(dataset, batch_size=8, val_fraction=0.25), trainer

    result = compare_fisher_map(make_run, dataset, seeds=[0], lrs=[1e-1, 1e-5])
    assert [(run.arm, run.lr) for run in result.runs] == [("flat", 1e-5), ("fisher", 1e-5), ("flat", 1e-1), ("fisher", 1e-1)]
    by_lr = {run.lr: run.val_loss for run in result.runs if run.arm == "flat"}
    assert result.chosen_lrs()["flat"] == min(by_lr, key=by_lr.get)
    assert result.verdicts()[0].startswith("at each arm's own best learning rate: ")
