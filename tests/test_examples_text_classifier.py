"""MiniLMClassifier on a real batch of drug reviews, with real PEFT and a real Trainer."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model

from lightning_fisher.errors import LightningFisherError
from lightning_fisher.examples.drug_reviews import condition_label_names, condition_labels, load_drug_reviews
from lightning_fisher.examples.text_classifier import (
    MiniLMClassifier,
    ModelCheckpointNotFoundError,
    minilm_checkpoint_dir,
)

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


@pytest.fixture(scope="module")
def batch():
    """Eight real training reviews, tokenized like write_condition_dataset does (default cache)."""
    from transformers import AutoTokenizer

    rows = load_drug_reviews("train")
    names = condition_label_names(rows)
    picked = rows[:8]
    tokens = AutoTokenizer.from_pretrained(str(minilm_checkpoint_dir()))(
        [row.review for row in picked], padding="max_length", truncation=True, max_length=64, return_tensors="pt"
    )
    return {
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "label": torch.tensor(condition_labels(picked, names)),
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniLMClassifier()


def _training_loss(module, batch):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        return module.training_step(batch, 0)


def test_modules_and_hyperparameters(model):
    assert model.head.in_features == 384 and model.head.out_features == 9
    assert not any("pooler" in name for name, _ in model.named_parameters())
    assert model.hparams.pooling == "mean" and model.hparams.num_classes == 9
    # A fresh module trains: nothing is frozen and every submodule is in train mode.
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_training_step_returns_the_mean_loss_over_samples(model, batch):
    model.eval()  # no dropout, so per-sample losses can be recomputed exactly
    try:
        loss = _training_loss(model, batch)
        assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
        value = float(loss.detach())
        # A random head on 9 classes: close to log(9).
        assert 1.5 < value < 3.0
        per_sample = torch.stack(
            [_training_loss(model, {key: tensor[i : i + 1] for key, tensor in batch.items()}) for i in range(8)]
        )
        assert value == pytest.approx(float(per_sample.detach().sum() / 8), rel=1e-4)
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"])
        assert value == pytest.approx(float(F.cross_entropy(logits, batch["label"])), rel=1e-5)
    finally:
        model.train()


def test_mean_pooling_ignores_padding(model, batch):
    model.eval()
    try:
        with torch.no_grad():
            short = model(batch["input_ids"][:1, :32], batch["attention_mask"][:1, :32])
            ids = torch.cat([batch["input_ids"][:1, :32], torch.zeros(1, 32, dtype=torch.int64)], dim=1)
            mask = torch.cat([batch["attention_mask"][:1, :32], torch.zeros(1, 32, dtype=torch.int64)], dim=1)
            padded = model(ids, mask)
        assert torch.allclose(short, padded, atol=1e-5)
    finally:
        model.train()


def _optimizer_of(module, batch, **trainer_kwargs):
    """configure_optimizers under a real Trainer (it needs estimated_stepping_batches)."""
    loader = torch.utils.data.DataLoader(
        [{key: value[i] for key, value in batch.items()} for i in range(8)], batch_size=4
    )
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module, loader)
    return trainer


def test_optimizer_sees_only_trainable_parameters_after_freezing(batch):
    torch.manual_seed(0)
    module = MiniLMClassifier(learning_rate=1e-3, head_learning_rate=5e-3)
    module.encoder.requires_grad_(False)
    encoder_before = {name: p.detach().clone() for name, p in module.encoder.named_parameters()}
    head_before = module.head.weight.detach().clone()
    trainer = _optimizer_of(module, batch, max_steps=1)
    optimizer = trainer.optimizers[0]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.head.parameters()}
    assert [group["name"] for group in optimizer.param_groups] == ["head"]
    assert optimizer.param_groups[0]["initial_lr"] == 5e-3
    assert not torch.equal(module.head.weight, head_before)
    assert all(torch.equal(p, encoder_before[name]) for name, p in module.encoder.named_parameters())


def test_lora_adapters_and_head_get_their_own_learning_rates_and_schedule(batch):
    torch.manual_seed(0)
    module = MiniLMClassifier(learning_rate=1e-3, head_learning_rate=4e-3, warmup_fraction=0.25)
    inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]), module.encoder
    )
    trainer = _optimizer_of(module, batch, max_steps=2)
    optimizer = trainer.optimizers[0]
    adapters, head = optimizer.param_groups
    assert adapters["name"] == "adapters" and head["name"] == "head"
    lora_ids = {id(p) for name, p in module.encoder.named_parameters() if "lora_" in name}
    assert {id(p) for p in adapters["params"]} == lora_ids and len(lora_ids) == 6 * 2 * 2
    assert (adapters["initial_lr"], head["initial_lr"]) == (1e-3, 4e-3)
    # Total 2 steps with warm-up 0.25 * 2 -> 0 steps: the learning rate decays linearly to 0.
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert adapters["lr"] == pytest.approx(0.0) and head["lr"] == pytest.approx(0.0)


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelCheckpointNotFoundError, match="not a folder"):
        MiniLMClassifier(checkpoint_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ModelCheckpointNotFoundError, match="config.json") as info:
        MiniLMClassifier(checkpoint_dir=str(tmp_path))
    assert isinstance(info.value, LightningFisherError)
