"""Baselines measured beside the arms: majority class and a linear probe (reviews), the unadapted model (digits)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_fisher.data.atomic_io import atomic_writer

from quality_bench.data import datamodule, folder_labels
from quality_bench.measures import PRETRAINED_LOW_HALF, pretraining_half_loss
from quality_bench.protocol import TIE_TOLERANCE, TaskSpec
from quality_bench.runs import build_model, task_threads, trainer
from quality_bench.store import ResultStore


def reviews_baselines(store: ResultStore, task: TaskSpec, folders: dict[str, Path], workdir: Path) -> None:
    """Majority-class rate and a linear probe on frozen mean-pooled MiniLM features (C chosen on validation)."""
    if store.baseline(task.name, "majority") is None:
        store.set_baseline(task.name, "majority", {
            split: majority(folder_labels(folders[split])) for split in ("train", "val", "test")})
    if store.baseline(task.name, "linear_probe") is None:
        started = time.perf_counter()
        probe = linear_probe(folders, workdir)
        probe["seconds"] = round(time.perf_counter() - started, 1)
        store.set_baseline(task.name, "linear_probe", probe)
    if store.baseline(task.name, "linear_probe_train_val") is None:
        store.set_baseline(task.name, "linear_probe_train_val",
                           probe_on_train_and_val(folders, workdir, store.baseline(task.name, "linear_probe")["C"]))


def majority(labels: list[int]) -> float:
    return max(labels.count(c) for c in set(labels)) / len(labels)


@torch.no_grad()
def frozen_features(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled last hidden states of the pretrained MiniLM (eval mode), exactly as the classifier pools."""
    from lightning_fisher.examples.text_classifier import MiniLMClassifier
    from lightning_fisher.data.tensor_folder import TensorFolderDataset

    model = MiniLMClassifier(num_classes=9).eval()
    dataset = TensorFolderDataset(folder)
    features, labels = [], []
    for start in range(0, len(dataset), 32):
        batch = [dataset[i] for i in range(start, min(start + 32, len(dataset)))]
        ids = torch.stack([b["input_ids"] for b in batch])
        mask = torch.stack([b["attention_mask"] for b in batch])
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        features.append((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))
        labels.extend(int(b["label"]) for b in batch)
    return torch.cat(features), torch.tensor(labels)


def probe_features(folders: dict[str, Path], workdir: Path) -> dict[str, tuple]:
    """Frozen features and labels per split as NumPy arrays (computed once, cached in ``workdir``)."""
    cache = workdir / "probe_features.pt"
    if cache.is_file():
        features = torch.load(cache, weights_only=True)
    else:
        features = {split: frozen_features(folders[split]) for split in ("train", "val", "test")}
        with atomic_writer(cache) as handle:  # an interrupted run leaves no truncated cache behind
            torch.save(features, handle)
    return {split: (x.numpy(), y.numpy()) for split, (x, y) in features.items()}


def fit_probe(x, y, c: float):
    """Logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(x, y)


def probe_metrics(probe, x, y, prefix: str) -> dict[str, float]:
    from sklearn.metrics import log_loss

    return {f"{prefix}_loss": log_loss(y, probe.predict_proba(x), labels=list(range(9))),
            f"{prefix}_acc": float((probe.predict(x) == y).mean())}


def rounded(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}


def linear_probe(folders: dict[str, Path], workdir: Path) -> dict[str, Any]:
    """The probe on the 480 training reviews the arms train on; C chosen by validation log loss."""
    features = probe_features(folders, workdir)
    best = None
    for c in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0):
        probe = fit_probe(*features["train"], c)
        scores = probe_metrics(probe, *features["val"], "val")
        if best is None or scores["val_loss"] < best["val_loss"] - TIE_TOLERANCE:
            best = {"C": c, **scores, "probe": probe}
    probe = best.pop("probe")
    return rounded({**best, **probe_metrics(probe, *features["test"], "test")})


def probe_on_train_and_val(folders: dict[str, Path], workdir: Path, c: float) -> dict[str, Any]:
    """The same probe (same C) fitted on all 600 training reviews, as the brief's 0.739 figure was.

    Not comparable with the arms, which train on 480 (the other 120 choose their LR); its
    equal-data counterpart is flat LoRA refitted on the same 600 (``quality_bench/refit.py``).
    """
    features = probe_features(folders, workdir)
    x = np.concatenate([features["train"][0], features["val"][0]])
    y = np.concatenate([features["train"][1], features["val"][1]])
    return rounded({"C": c, "train_samples": len(y), **probe_metrics(fit_probe(x, y, c), *features["test"], "test")})


def digits_baselines(store: ResultStore, task: TaskSpec, folders: dict[str, Path]) -> None:
    """The pretrained (0-4) model's held-out denoising loss on digits 5-9, and on 0-4, before any adaptation."""
    if store.baseline(task.name, PRETRAINED_LOW_HALF) is None:
        with task_threads(task):
            loss = pretraining_half_loss(task, build_model(task, 1e-3, 0, folders))
        store.set_baseline(task.name, PRETRAINED_LOW_HALF, {"test_loss": loss})
    if store.baseline(task.name, "pretrained") is not None:
        return
    with task_threads(task):
        model = build_model(task, 1e-3, 0, folders)
        data = datamodule(task, folders, 0)
        evaluation = trainer(task, fit=False)
        val = evaluation.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
        test = evaluation.test(model, datamodule=data, verbose=False)[0]["test_loss"]
    store.set_baseline(task.name, "pretrained", {"val_loss": round(float(val), 4), "test_loss": round(float(test), 4)})
