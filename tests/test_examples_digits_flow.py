"""The digits flow-matching example: real sklearn digits, real Trainer, the timestep protocol."""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_fisher.examples.digits_flow import (
    DigitsFlowMatching,
    LogitNormalTimestepSampler,
    digits_split,
    held_out_denoising_loss,
    load_pretrained_digits_flow,
    pretrain_digits_flow,
    single_threaded,
    write_digits_dataset,
)
from lightning_fisher.tensor_folder import TensorFolderDataset, list_sample_files
from lightning_fisher.timesteps import RecordingTimestepSampler, UniformTimestepSampler, timestep_focus_applied

pytest.importorskip("sklearn")
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


@pytest.fixture(autouse=True)
def _one_thread():
    # The model is tiny; on a busy 2-core machine two intra-op threads make each step ~20x slower.
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def low():
    return digits_split("low")


def _batch(images, n=32):
    return {"x": images[:n], "label": torch.zeros(n, dtype=torch.int64)}


def _quiet_step(model, batch):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        return model.training_step(batch, 0)


def test_halves_are_disjoint_deterministic_and_scaled(low):
    high = digits_split("high")
    assert set(low.train_labels.tolist()) | set(low.test_labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(high.train_labels.tolist()) | set(high.test_labels.tolist()) == {5, 6, 7, 8, 9}
    total = sum(len(h.train_labels) + len(h.test_labels) for h in (low, high))
    assert total == 1797
    assert len(low.test_labels) == round(0.2 * (len(low.train_labels) + len(low.test_labels)))
    assert low.train_images.shape[1:] == (1, 8, 8) and low.train_images.dtype == torch.float32
    assert float(low.train_images.min()) == -1.0 and float(low.train_images.max()) == 1.0
    again = digits_split("low")
    assert torch.equal(again.test_images, low.test_images)
    with pytest.raises(ValueError, match="half"):
        digits_split("middle")


def test_written_dataset_folder(tmp_path, low):
    out = write_digits_dataset(tmp_path / "low_test", "low", "test")
    files = list_sample_files(out)
    assert len(files) == len(low.test_labels)
    sample = TensorFolderDataset(out)[3]
    assert set(sample) == {"x", "label"}
    assert sample["x"].dtype == torch.float32 and sample["x"].shape == (1, 8, 8)
    assert sample["label"].dtype == torch.int64 and sample["label"].dim() == 0
    assert torch.equal(sample["x"], low.test_images[3]) and int(sample["label"]) == int(low.test_labels[3])
    stamps = [os.stat(f).st_mtime_ns for f in files]
    write_digits_dataset(out, "low", "test")
    assert [os.stat(f).st_mtime_ns for f in files] == stamps


def test_lora_targets_are_linear_layers_over_tokens():
    model = DigitsFlowMatching()
    names = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    for part in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2"):
        assert f"blocks.0.{part}" in names
    assert model.blocks[0].attn.q.in_features == 64
    assert model(torch.zeros(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)


def test_training_step_draws_timesteps_from_the_sampler(low):
    torch.manual_seed(0)
    model = DigitsFlowMatching()
    assert isinstance(model.timestep_sampler, UniformTimestepSampler)
    batch = _batch(low.train_images)

    calls = []

    def constant(batch_size, device=None):
        calls.append(batch_size)
        return torch.full((batch_size,), 0.25, device=device)

    recorder = RecordingTimestepSampler(constant)
    model.timestep_sampler = recorder
    loss = _quiet_step(model, batch)
    assert calls == [32] and recorder.observed_range == (0.25, 0.25)
    assert loss.dim() == 0 and loss.requires_grad

    # t = 0 means the input is clean data: the loss equals the loss of the same noise at t = 0.
    model.timestep_sampler = lambda n, device=None: torch.zeros(n, device=device)
    torch.manual_seed(1)
    at_zero = _quiet_step(model, batch)
    torch.manual_seed(1)
    noise = torch.randn_like(batch["x"])
    expected = torch.nn.functional.mse_loss(model(batch["x"], torch.zeros(32)), noise - batch["x"])
    assert float(at_zero.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)

    # The library's focus context swaps the same attribute in and out.
    model.timestep_sampler = UniformTimestepSampler()
    with timestep_focus_applied(model, "structure") as focused:
        _quiet_step(model, batch)
    lo, hi = focused.observed_range
    assert 0.6 <= lo <= hi <= 1.0
    assert isinstance(model.timestep_sampler, UniformTimestepSampler)


def test_logit_normal_sampler_follows_the_protocol():
    torch.manual_seed(0)
    t = LogitNormalTimestepSampler()(10_000, "cpu")
    assert t.shape == (10_000,) and 0.0 < float(t.min()) and float(t.max()) < 1.0
    assert float(t.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(((t > 0.25) & (t < 0.75)).float().mean()) > 0.6  # more mass mid-schedule than uniform's 0.5
    model = DigitsFlowMatching(timestep_distribution="logit_normal")
    assert isinstance(model.timestep_sampler, LogitNormalTimestepSampler)


def test_held_out_loss_is_fixed_across_calls_and_global_seed(low):
    model = DigitsFlowMatching()
    torch.manual_seed(1)
    first = held_out_denoising_loss(model, low.test_images)
    torch.manual_seed(2)
    assert held_out_denoising_loss(model, low.test_images) == first


def test_loss_decreases_in_a_few_steps_with_a_real_trainer(low):
    pl.seed_everything(0, verbose=False)
    model = DigitsFlowMatching()
    before = held_out_denoising_loss(model, low.test_images)
    train = [{"x": x, "label": y} for x, y in zip(low.train_images, low.train_labels)]
    test = [{"x": x, "label": y} for x, y in zip(low.test_images, low.test_labels)]
    trainer = pl.Trainer(
        max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=64, shuffle=True))
    after = held_out_denoising_loss(model, low.test_images)
    assert after < 0.8 * before
    # test_step logs the same fixed-noise loss (one batch of the whole split: same seed).
    result = trainer.test(model, torch.utils.data.DataLoader(test, batch_size=256), verbose=False)
    assert result[0]["test_loss"] == pytest.approx(after, rel=1e-5)


@pytest.mark.slow
def test_pretraining_beats_the_untrained_model_and_is_cached(pretrained_digits_flow, low):
    path = pretrained_digits_flow
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["test_loss"] < 0.6 * checkpoint["untrained_test_loss"]
    model = load_pretrained_digits_flow(path)
    assert held_out_denoising_loss(model, low.test_images) == pytest.approx(checkpoint["test_loss"], rel=1e-6)
    # The high half (digits 5-9) was never seen: the pretrained model does worse there.
    assert held_out_denoising_loss(model, digits_split("high").test_images) > checkpoint["test_loss"]

    stamp = os.stat(path).st_mtime_ns
    assert pretrain_digits_flow(path) == path
    assert os.stat(path).st_mtime_ns == stamp
    assert load_pretrained_digits_flow(path, learning_rate=1e-4).hparams.learning_rate == 1e-4
