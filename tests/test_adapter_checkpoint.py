"""The adapters' record in checkpoints (training/adapter_checkpoint.py), and the Lightning hook order it relies on."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher import ModelMismatchError
from lightning_fisher.training.adapter_checkpoint import CHECKPOINT_KEY, check_resumed_ranks, guard_checkpoint_loading

QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False)


class Recorder(pl.Callback):
    def __init__(self, order):
        self.order = order

    @property
    def state_key(self):
        return "Recorder"

    def setup(self, trainer, pl_module, stage):
        self.order.append("callback.setup")

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self.order.append("callback.on_load_checkpoint")

    def state_dict(self):
        return {"saved": True}

    def load_state_dict(self, state_dict):
        self.order.append("callback.load_state_dict")


class Recorded(pl.LightningModule):
    def __init__(self, order):
        super().__init__()
        self.order = order
        self.layer = nn.Linear(2, 1)

    def on_load_checkpoint(self, checkpoint):
        self.order.append("module.on_load_checkpoint")

    def load_state_dict(self, *args, **kwargs):
        self.order.append("module.load_state_dict")
        return super().load_state_dict(*args, **kwargs)

    def configure_optimizers(self):
        self.order.append("module.configure_optimizers")
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()


def test_callback_state_arrives_after_the_weights(tmp_path):
    """Why the resume check wraps the module's hook: a callback's state loads after the module's weights."""
    order = []
    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=1, callbacks=[Recorder(order)], **QUIET)
    trainer.fit(Recorded(order), data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    order.clear()
    trainer = pl.Trainer(max_epochs=2, callbacks=[Recorder(order)], **QUIET)
    trainer.fit(Recorded(order), data, ckpt_path=tmp_path / "run.ckpt")
    assert order == [
        "callback.setup",
        "module.on_load_checkpoint",
        "module.load_state_dict",
        "callback.on_load_checkpoint",
        "callback.load_state_dict",
        "module.configure_optimizers",
    ]


def test_check_resumed_ranks_names_the_modules():
    stored = {CHECKPOINT_KEY: {"fisher_map": None, "adapter_ranks": {"a": 4, "b": 8, "c": 2}}}
    check_resumed_ranks(stored, {"a": 4, "b": 8, "c": 2})
    check_resumed_ranks({}, {"a": 4})  # not written by AdaptiveLoRA: nothing to check
    with pytest.raises(ModelMismatchError, match=r"in 3 module\(s\), e.g. \['c', 'd', 'b'\]: the map changed"):
        check_resumed_ranks(stored, {"a": 4, "b": 6, "d": 2})


def test_guard_runs_before_the_module_hook_and_wraps_once():
    order = []
    module = Recorded(order)
    guard_checkpoint_loading(module, lambda: {"a": 4})
    guard_checkpoint_loading(module, lambda: {"a": 5})  # a second setup: still the first guard
    module.on_load_checkpoint({CHECKPOINT_KEY: {"fisher_map": None, "adapter_ranks": {"a": 4}}})
    assert order == ["module.on_load_checkpoint"]
    with pytest.raises(ModelMismatchError, match=r"e.g. \['a'\]"):
        module.on_load_checkpoint({CHECKPOINT_KEY: {"fisher_map": None, "adapter_ranks": {"a": 8}}})
    assert order == ["module.on_load_checkpoint"]  # the module's own hook did not run
