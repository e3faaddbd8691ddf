"""A small classifier task and its seeded data, shared by the tests.

:class:`Task` puts a network in a LightningModule the way most tests need one: cross-entropy on
``(x, y)`` batches, optionally a head, an optimizer, a logged or a recorded loss.
:func:`classification_data` makes seeded batches for it; :func:`write_dataset` writes seeded
samples as a dataset folder, for the command line.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher import write_sample_folder


class Task(pl.LightningModule):
    """A classifier: ``network``, then ``head`` if given, trained with cross-entropy on ``(x, y)``.

    Args:
        network: builds the network, kept as ``task.<attribute>``; a map's module names start with
            ``attribute`` (``model.layers.0``), so a test keeps the name its expectations use.
        attribute: the network's attribute name, ``model`` by default.
        head: builds a layer applied to the network's output, ``task.head``, after the network.
        seed: ``torch.manual_seed(seed)`` right before the network is built, so each instance has
            the same weights; None builds from the global generator as it stands.
        lr: ``configure_optimizers`` gives AdamW over the parameters that need gradients (after an
            adapter is injected: the adapter and whatever it left trainable) at this rate; None
            gives no optimizer (an analysis steps none).
        log_loss: ``self.log("train_loss", loss)`` at each step.
        record_losses: each step's loss, as a float, appended to ``task.losses``.

    Named ``Task`` as the tests' own classes were: a map records the class name, and messages
    name it.
    """

    def __init__(
        self,
        network: Callable[[], nn.Module],
        *,
        attribute: str = "model",
        head: Optional[Callable[[], nn.Module]] = None,
        seed: Optional[int] = 0,
        lr: Optional[float] = None,
        log_loss: bool = False,
        record_losses: bool = False,
    ) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.attribute = attribute
        setattr(self, attribute, network())
        self.head = head() if head is not None else None
        self.lr = lr
        self.log_loss = log_loss
        self.record_losses = record_losses
        self.losses: list[float] = []

    def forward(self, x):
        out = getattr(self, self.attribute)(x)
        return out if self.head is None else self.head(out)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.log_loss:
            self.log("train_loss", loss)
        if self.record_losses:
            self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        if self.lr is None:
            return None
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def classification_data(
    n: int,
    features: int,
    *,
    classes: int = 2,
    batch_size: int = 8,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
    shuffle: bool = False,
) -> DataLoader:
    """``n`` standard normal inputs of ``features`` values from a generator seeded with ``seed``.

    The label is the sign of the first input (``classes=2``), or of the first two as two bits
    (``classes=4``: ``x0 > 0`` plus twice ``x1 > 0``). ``shuffle`` draws the order from the
    global generator, as ``DataLoader(shuffle=True)`` does.
    """
    if classes not in (2, 4):
        raise ValueError(f"classes must be 2 or 4, got {classes}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=dtype)
    y = (x[:, 0] > 0).long()
    if classes == 4:
        y = y + 2 * (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def write_dataset(folder: Path, n: int = 64) -> Path:
    """A dataset folder of ``n`` seeded samples: ``x`` (8 values), ``label`` (how many of the first two are > 0)."""
    generator = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 8, generator=generator)
    write_sample_folder(folder, [{"x": x, "label": torch.tensor(int(x[0] > 0) + int(x[1] > 0))} for x in xs])
    return folder
