"""When the stability rule stops, is the map already right? And the cost of getting it.

On the real all-MiniLM-L6-v2 (+ 9-class head, excluded from the candidates) and the real drug
reviews, batch 16 x 128 tokens:

1. **Stop**: the analysis with the default stopping rule (split-half Spearman >= 0.9 for 5
   batches, at least 5 batches); samples used.
2. **Reference**: the same analysis over every review there is (600 train + 379 test), no early
   stop; the ratio of samples reference / stop is reported.
3. **Agreement**: Spearman correlation of the two maps' scores over all 36 modules, and how many
   modules got the same rank.
4. **Passes per sample**: model forward and backward passes actually run, counted with hooks,
   divided by samples, against the reference tool's procedure (batch size 1, the three module
   groups scored on separate passes, three runs: 9 passes per sample).
5. **Allocation time** for 100,000 modules, in median and budget mode.

Run:  python benchmarks/convergence.py [--json benchmarks/results/convergence.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch
from torchmetrics.functional import spearman_corrcoef

from lightning_fisher import TensorDirectoryDataModule, allocate_ranks, analyze
from lightning_fisher.data.atomic_io import write_text_atomic
from lightning_fisher.examples.drug_reviews import default_cache_dir, write_condition_dataset
from lightning_fisher.examples.text_classifier import MiniLMClassifier
from lightning_fisher.data.tensor_folder import TensorFolderDataset

REFERENCE_TOOL_PASSES_PER_SAMPLE = 9  # batch size 1 x 3 module groups on separate passes x 3 runs
QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False)


class PassCounter:
    """Counts samples through the encoder's forward and the loss's backward."""

    def __init__(self, model: MiniLMClassifier) -> None:
        self.forward_samples = 0
        self.backward_samples = 0
        model.encoder.register_forward_pre_hook(self._forward, with_kwargs=True)
        model.head.register_full_backward_hook(self._backward)

    def _forward(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.forward_samples += int(ids.shape[0])

    def _backward(self, module, grad_input, grad_output) -> None:
        self.backward_samples += int(grad_output[0].shape[0])


def model() -> MiniLMClassifier:
    torch.manual_seed(0)
    return MiniLMClassifier(num_classes=9)


def run_analysis(folder: Path, **stopping) -> tuple:
    task = model()
    counter = PassCounter(task)
    started = time.perf_counter()
    fisher_map = analyze(
        task, TensorDirectoryDataModule(folder, batch_size=16, seed=0), exclude=["head"], rank=8, rank_min=2,
        rank_max=32, rank_mode="budget", seed=0, trainer_kwargs=QUIET, **stopping,
    )
    return fisher_map, counter, time.perf_counter() - started


def everything_folder(workdir: Path, train: Path, test: Path) -> Path:
    """One folder with all 979 reviews (links to the two split folders' files)."""
    folder = workdir / "all"
    folder.mkdir(parents=True, exist_ok=True)
    for split in (train, test):
        for file in TensorFolderDataset(split).files:
            link = folder / f"{split.name}_{file.name}"
            if not link.exists():
                os.symlink(file.resolve(), link)
    return folder


def allocation_seconds(modules: int = 100_000, repeats: int = 3) -> dict:
    rng = random.Random(0)
    scores = {f"model.layers.{i // 7}.proj{i % 7}": rng.lognormvariate(0.0, 1.5) for i in range(modules)}
    costs = {name: rng.choice((768, 1920, 8192, 15104)) for name in scores}
    result = {}
    for mode in ("median", "budget"):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            allocate_ranks(scores, rank=64, rank_min=16, rank_max=128, mode=mode, rank_costs=costs)
            times.append(time.perf_counter() - start)
        result[mode] = statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "convergence.json")
    parser.add_argument("--workdir", type=Path, default=default_cache_dir() / "benchmarks")
    args = parser.parse_args()

    train = write_condition_dataset(args.workdir / "train", split="train", max_length=128)
    test = write_condition_dataset(args.workdir / "test", split="test", max_length=128)
    pool = everything_folder(args.workdir, train, test)

    stopped, stop_counter, stop_seconds = run_analysis(train)
    reference, _, reference_seconds = run_analysis(pool, convergence_patience=10_000, max_batches=None, min_batches=0)
    names = list(stopped.scores)
    rho = float(spearman_corrcoef(
        torch.tensor([stopped.scores[n] for n in names], dtype=torch.float64),
        torch.tensor([reference.scores[n] for n in names], dtype=torch.float64),
    ))
    same_rank = sum(stopped.ranks.get(n) == reference.ranks.get(n) for n in names)
    rank_gap = statistics.mean(abs((stopped.ranks.get(n) or 0) - (reference.ranks.get(n) or 0)) for n in names)
    samples = stopped.analysis.samples
    passes = (stop_counter.forward_samples + stop_counter.backward_samples) / 2 / samples
    results = {
        "stop": {
            "samples": samples, "batches": stopped.analysis.batches, "reason": stopped.analysis.stop_reason,
            "split_half_history": list(stopped.analysis.stability.history), "seconds": stop_seconds,
        },
        "reference": {"samples": reference.analysis.samples, "seconds": reference_seconds},
        "reference_to_stop_samples": reference.analysis.samples / samples,
        "spearman_stop_vs_reference": rho,
        "modules_same_rank": same_rank,
        "modules": len(names),
        "mean_abs_rank_difference": rank_gap,
        "passes_per_sample": {
            "forward": stop_counter.forward_samples / samples,
            "backward": stop_counter.backward_samples / samples,
            "reference_tool": REFERENCE_TOOL_PASSES_PER_SAMPLE,
            "ratio": REFERENCE_TOOL_PASSES_PER_SAMPLE / passes,
        },
        "allocation_seconds_100k_modules": allocation_seconds(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps(results, indent=2) + "\n", make_parents=True)

    p = results["passes_per_sample"]
    a = results["allocation_seconds_100k_modules"]
    print("| measure | value |")
    print("|---|---|")
    print(f"| samples until the stability rule stopped | {samples} ({stopped.analysis.batches} batches, {stopped.analysis.stop_reason}) |")
    print(f"| reference run | {reference.analysis.samples} samples ({results['reference_to_stop_samples']:.1f}x) |")
    print(f"| Spearman, stop map vs reference (36 modules) | {rho:.3f} |")
    print(f"| modules with the same rank | {same_rank}/{len(names)} (mean rank difference {rank_gap:.2f}) |")
    print(f"| forward / backward passes per sample | {p['forward']:.2f} / {p['backward']:.2f} (reference tool: 9), {p['ratio']:.1f}x fewer |")
    print(f"| allocation, 100,000 modules | median mode {a['median']:.2f} s, budget mode {a['budget']:.2f} s |")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
