"""Pretraining the digits model: it learns, the checkpoint is cached, and it loads with overrides."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_fisher.examples.digits_flow import (
    digits_split,
    held_out_denoising_loss,
    load_pretrained_digits_flow,
    pretrain_digits_flow,
)
from lightning_fisher.examples.digits_flow import pretraining
from lightning_fisher.examples.digits_flow.model import DigitsFlowMatching

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def low():
    return digits_split("low")


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


def test_checkpoint_is_written_atomically_and_reused(tmp_path, monkeypatch):
    trained = []

    def fake_pretrain(settings):  # the checkpoint path without 16 s of training
        trained.append(settings)
        return DigitsFlowMatching(), 2.0, 0.5

    monkeypatch.setattr(pretraining, "_pretrain", fake_pretrain)
    path = pretrain_digits_flow(tmp_path / "new" / "flow.pt", epochs=1)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["settings"]["epochs"] == 1 and checkpoint["test_loss"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["flow.pt"]
    assert pretrain_digits_flow(path, epochs=1) == path and len(trained) == 1  # cached

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        pretrain_digits_flow(path, epochs=2)  # other settings: trains again, then fails to save
    assert torch.load(path, weights_only=True)["settings"]["epochs"] == 1  # the old checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["flow.pt"]

