"""A small LightningModule for command-line tests, importable as ``cli_models.TinyClassifier``."""

from typing import Optional

import lightning.pytorch as pl
import torch
from torch import nn


class TinyClassifier(pl.LightningModule):
    """An MLP classifier on ``{"x": float[8], "label": int}`` samples.

    ``checkpoint_dir`` (the ``--checkpoint-dir`` convention) names a folder with ``weights.pt``
    to start from, standing in for a pretrained model.
    """

    def __init__(self, width: int = 16, depth: int = 4, classes: int = 3, lr: float = 1e-2, checkpoint_dir: Optional[str] = None):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(*[layer for i in range(depth) for layer in (nn.Linear(8 if i == 0 else width, width), nn.Tanh())])
        self.head = nn.Linear(width, classes)
        if checkpoint_dir is not None:
            self.backbone.load_state_dict(torch.load(f"{checkpoint_dir}/weights.pt", weights_only=True))

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch["x"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["x"])
        self.log("val_loss", nn.functional.cross_entropy(logits, batch["label"]))
        self.log("val_acc", (logits.argmax(-1) == batch["label"]).float().mean())

    def test_step(self, batch, batch_idx):
        logits = self(batch["x"])
        self.log("test_acc", (logits.argmax(-1) == batch["label"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
