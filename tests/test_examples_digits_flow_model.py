"""The digits flow-matching model: real sklearn digits, real Trainer, the timestep protocol."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_fisher.examples.digits_flow import (
    DigitsFlowMatching,
    digits_split,
    held_out_denoising_loss,
    single_threaded,
)
from lightning_fisher.analysis.timesteps import (
    LogitNormalTimestepSampler,
    RecordingTimestepSampler,
    UniformTimestepSampler,
    timestep_focus_applied,
)

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


def test_timestep_distribution_picks_the_sampler():
    assert isinstance(DigitsFlowMatching().timestep_sampler, UniformTimestepSampler)
    logit_normal = DigitsFlowMatching(timestep_distribution="logit_normal")
    assert isinstance(logit_normal.timestep_sampler, LogitNormalTimestepSampler)
    with pytest.raises(ValueError, match="timestep_distribution"):
        DigitsFlowMatching(timestep_distribution="cosine")


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
