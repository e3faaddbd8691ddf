"""Small LightningModules for command-line tests, importable as ``cli_models.TinyClassifier`` / ``cli_models.TinyFlow``."""

import time
from typing import Literal, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_fisher.analysis.timesteps import UniformTimestepSampler


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


class TinyFlow(pl.LightningModule):
    """A flow-matching denoiser on ``{"x": float[8]}`` samples, for the wizard: it has a
    ``timestep_sampler`` (so the timestep focus applies) and ``__init__`` arguments without
    defaults (so the wizard has to ask for them)."""

    def __init__(self, width: int, noise_scale: float, schedule: Literal["linear", "cosine"], lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(9, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 8))
        self.timestep_sampler = UniformTimestepSampler()

    def training_step(self, batch, batch_idx):
        x = batch["x"]
        t = self.timestep_sampler(x.shape[0], x.device)
        if self.hparams.schedule == "cosine":
            t = 1 - torch.cos(t * torch.pi / 2)
        noise = torch.randn_like(x) * self.hparams.noise_scale
        noisy = (1 - t[:, None]) * x + t[:, None] * noise
        prediction = self.net(torch.cat([noisy, t[:, None]], dim=-1))
        return ((prediction - (noise - x)) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class SlowClassifier(TinyClassifier):
    """:class:`TinyClassifier` that says on stdout which batch it is at and takes ``delay`` seconds a batch,
    so a test can interrupt an analysis while it runs."""

    def __init__(self, delay: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def training_step(self, batch, batch_idx):
        print(f"training_step {batch_idx}", flush=True)
        time.sleep(self.delay)
        return super().training_step(batch, batch_idx)
