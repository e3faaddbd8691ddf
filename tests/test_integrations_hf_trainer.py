"""FisherMapCallback under a real transformers Trainer and real PEFT, on a small BERT built from a config."""

import json
import logging

import peft
import pytest
import torch

transformers = pytest.importorskip("transformers")

from _fresh_python import assert_runs_in_fresh_python  # noqa: E402
from lightning_fisher import AdapterRankMismatchError, analyze, lora_config_from_fisher_map  # noqa: E402
from lightning_fisher.integrations.hf_trainer import FisherMapCallback  # noqa: E402

LABELS = 3


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=LABELS,
    )
    return transformers.BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def samples():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (32, 8), generator=generator)
    labels = (ids[:, 0] % LABELS).tolist()  # learnable from the first token
    return [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.int64), "labels": labels[i]}
            for i in range(len(labels))]


@pytest.fixture(scope="module")
def fisher_map(samples, tmp_path_factory):
    batches = [transformers.default_data_collator(samples[i:i + 8]) for i in range(0, 32, 8)]
    return analyze(tiny_bert(), batches, output=tmp_path_factory.mktemp("analysis"), exclude=["classifier"],
                   min_batches=2, convergence_patience=2, rank=4, rank_min=1, rank_max=8)


def trainer_for(model, samples, out, callback, **arguments):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2, report_to=[], use_cpu=True,
        disable_tqdm=True, **{"max_steps": 1, "save_strategy": "no", **arguments},
    )
    return transformers.Trainer(model=model, args=args, train_dataset=samples, callbacks=[callback])


def test_train_start_verifies_the_adapters_and_records_the_map(fisher_map, samples, tmp_path, caplog):
    model = peft.get_peft_model(tiny_bert(), lora_config_from_fisher_map(fisher_map, task_type="SEQ_CLS"))
    callback = FisherMapCallback(fisher_map.path.parent)  # the folder, as the user has it
    assert callback.record is None
    with caplog.at_level(logging.INFO, logger="lightning_fisher"):
        trainer_for(model, samples, tmp_path / "run", callback).train()
    assert f"Adapters match the fisher map {fisher_map.path}: {fisher_map.summary()}" in caplog.text
    record = callback.record["fisher_map"]
    assert record["ranks"] == fisher_map.ranks and len(record["ranks"]) == record["modules_adapted"] > 0
    assert "classifier" not in record["ranks"]  # the new head is trained in full, not adapted
    assert record["applied"] == str(fisher_map.path)
    assert (record["criterion"], record["rank"], record["rank_min"], record["rank_max"]) == (
        fisher_map.budget.criterion, 4, 1, 8)
    assert record["model_fingerprint"] == fisher_map.model.fingerprint
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert record["trainable_adapter_parameters"] == lora > 0  # the LoRA factors, not the head
    json.dumps(callback.record)  # JSON-ready, as trainer_state.json needs


def test_adapters_that_disagree_with_the_map_stop_the_run_before_its_first_step(fisher_map, samples, tmp_path):
    config = lora_config_from_fisher_map(fisher_map, task_type="SEQ_CLS")
    key, rank = next(iter(config.rank_pattern.items()))
    config.rank_pattern[key] = rank + 1  # e.g. the pattern edited after the map was applied
    model = peft.get_peft_model(tiny_bert(), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trainer_for(model, samples, tmp_path / "run", FisherMapCallback(fisher_map))
    name = key.lstrip("^")
    module = name.replace("\\.", ".")
    with pytest.raises(AdapterRankMismatchError, match=rf"{name}: adapter rank {rank + 1}, map says {rank}"):
        trainer.train()
    assert module in fisher_map.ranks and trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_a_checkpoint_holds_the_record_and_resuming_restores_the_callback(fisher_map, samples, tmp_path):
    model = peft.get_peft_model(tiny_bert(), lora_config_from_fisher_map(fisher_map, task_type="SEQ_CLS"))
    callback = FisherMapCallback(fisher_map)
    trainer_for(model, samples, tmp_path / "run", callback, save_strategy="steps", save_steps=1).train()
    state = json.loads((tmp_path / "run" / "checkpoint-1" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["FisherMapCallback"]
    assert saved["attributes"]["record"] == callback.record
    assert saved["args"] == {
        "fisher_map": str(fisher_map.path.resolve()), "adapter_name": "default", "adapter_root": None, "verbose": True}

    resumed = trainer_for(model, samples, tmp_path / "run", FisherMapCallback(fisher_map), max_steps=2,
                          save_strategy="steps", save_steps=1, restore_callback_states_from_checkpoint=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    restored = [c for c in resumed.callback_handler.callbacks if isinstance(c, FisherMapCallback)]
    assert len(restored) == 1 and restored[0].fisher_map.ranks == fisher_map.ranks
    assert restored[0].record == callback.record and resumed.state.global_step == 2


def test_a_map_without_a_file_is_refused(fisher_map):
    with pytest.raises(ValueError, match=r"has no file; save it first"):
        FisherMapCallback(fisher_map.with_path(None))
    assert FisherMapCallback(fisher_map).fisher_map is fisher_map


def test_the_callback_is_public_and_the_analysis_imports_no_transformers():
    assert_runs_in_fresh_python(
        "import sys\n"
        "import lightning_fisher\n"
        "from lightning_fisher import FisherMap, analyze\n"
        "import lightning_fisher.analysis.entry, lightning_fisher.analysis.plain_loop\n"
        "assert 'transformers' not in sys.modules\n"
        "from lightning_fisher import FisherMapCallback\n"
        "assert FisherMapCallback.__module__ == 'lightning_fisher.integrations.hf_trainer'\n"
        "assert 'transformers' in sys.modules and 'lightning' not in sys.modules\n"
    )


def test_no_module_outside_the_examples_and_this_adapter_imports_transformers():
    import ast
    from pathlib import Path

    import lightning_fisher

    package = Path(lightning_fisher.__file__).parent
    importing = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            if any(name.split(".")[0] == "transformers" for name in names):
                importing.add(path.relative_to(package).as_posix())
    assert {name for name in importing if not name.startswith("examples/")} == {"integrations/hf_trainer.py"}
