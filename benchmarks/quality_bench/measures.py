"""Measurements of every run beside its final validation and test: how fast it adapts, and what it forgets.

- ``first_epoch_val_loss`` (both tasks): the validation loss after the first training epoch,
  computed as the model's ``validation_step`` computes it (same validation folder, batches,
  ``limit_eval_batches``, eval mode; for digits the same fixed timesteps and noise). A callback
  measures it inside the fit without drawing from any random generator the training uses, so
  the run trains exactly as it would without the measurement: a run re-measured with
  ``--remeasure`` reproduces the stored run's numbers (the report counts how many did).
- ``pretrain_test_loss`` (digits): the held-out denoising loss on the test split of the
  PRETRAINING half (digits 0-4, 180 images) after adaptation, with the evaluation of the
  adaptation's test loss (fixed timesteps and noise seeded per batch, the task's batch size).
  Forgetting is this minus the pretrained model's loss on the same images (the baseline
  ``pretrained_low_half``), so 0 means nothing forgotten.

Runs stored before these measurements existed lack the fields; the report says "not measured"
for them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from quality_bench.protocol import TaskSpec

#: The fields each task's runs carry once measured (``--remeasure`` reruns stored runs lacking one).
MEASURES = {"reviews": ("first_epoch_val_loss",), "digits": ("first_epoch_val_loss", "pretrain_test_loss")}
#: Baseline: the pretrained digits model's ``pretrain_test_loss``, before adaptation.
PRETRAINED_LOW_HALF = "pretrained_low_half"


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside the block; every submodule's own mode restored after it."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.train(training)


def held_out_loss(task: TaskSpec, model: torch.nn.Module, samples: Sequence[dict[str, torch.Tensor]]) -> float:
    """The task's validation loss of ``model`` on ``samples``, in order, as its ``validation_step`` computes it.

    Batches of ``task.batch_size`` (at most ``task.limit_eval_batches`` of them); the mean over
    batches weighted by batch size, as Lightning averages the logged ``val_loss``.
    """
    from lightning_fisher.examples.digits_flow import held_out_denoising_loss

    if task.limit_eval_batches is not None:
        samples = samples[: task.limit_eval_batches * task.batch_size]
    with evaluation_mode(model):
        if task.name == "digits":
            # Batch i is seeded with eval_seed + i, exactly as DigitsFlowMatching.validation_step.
            images = torch.stack([sample["x"] for sample in samples])
            return held_out_denoising_loss(model, images, batch_size=task.batch_size)
        total = 0.0
        for start in range(0, len(samples), task.batch_size):
            batch = torch.utils.data.default_collate(list(samples[start : start + task.batch_size]))
            logits = model(batch["input_ids"], batch["attention_mask"])
            total += float(F.cross_entropy(logits, batch["label"])) * len(batch["label"])
        return total / len(samples)


def dataset_samples(dataset: Any) -> list[dict[str, torch.Tensor]]:
    return list(dataset.samples) if hasattr(dataset, "samples") else [dataset[i] for i in range(len(dataset))]


class FirstEpochValidation(pl.Callback):
    """Records the validation loss after the first training epoch (``val_loss``; ``None`` until then).

    Reads the validation samples from the datamodule directly (no DataLoader, whose iterator
    would draw a seed from the global generator), and computes under ``fork_rng`` as well, so
    that the training after the measurement is the same as without it.
    """

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        self.val_loss: Optional[float] = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 0:
            return
        with torch.random.fork_rng(devices=[]):
            self.val_loss = held_out_loss(self.task, pl_module, dataset_samples(trainer.datamodule.val_dataset))


@functools.lru_cache(maxsize=1)
def pretraining_half_samples() -> tuple[dict[str, torch.Tensor], ...]:
    """The test split of digits 0-4 (the half the digits model was pretrained on), as samples."""
    from lightning_fisher.examples.digits_flow import digits_split

    images, labels = digits_split("low").split("test")
    return tuple({"x": x, "label": y} for x, y in zip(images, labels))


def pretraining_half_loss(task: TaskSpec, model: torch.nn.Module) -> float:
    """``pretrain_test_loss``: held-out denoising loss on digits 0-4 (see the module docstring)."""
    return held_out_loss(task, model, pretraining_half_samples())


def forgetting(run: dict[str, Any], reference: Optional[float]) -> Optional[float]:
    """Loss on the pretraining half after adaptation minus before; ``None`` when not measured (or diverged)."""
    value = run.get("pretrain_test_loss")
    if value is None or reference is None or not math.isfinite(value):
        return None
    return value - reference
