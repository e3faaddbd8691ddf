"""Analysis batch vs plain training step: time and peak memory, side by side, same process.

Model: the real all-MiniLM-L6-v2 encoder with a 9-class head (``MiniLMClassifier``), batch 16 x
128 tokens of real drug reviews (condition labels), eval mode (dropout off) for every variant.

Variants, timed in interleaved rounds (the order rotates every round) so drift and background
load hit them alike; the reported ratio is the median over rounds of each variant's time
divided by the plain step's time in the same round:

- ``train_step``: forward + backward, all weights trainable (the reference, 1.00).
- ``frozen_floor``: forward + backward with every weight frozen and no hooks; the embedding
  output requires grad so backward runs through the network. No per-sample method can beat it.
- ``analysis_auto`` / ``analysis_ghost`` / ``analysis_materialize``: one analysis batch as
  ``FisherAnalysisModule`` runs it: frozen weights, collector hooks, exact per-sample norms for
  all 37 Linear modules, accumulator update.
- ``analysis_spectrum``: ``analysis_auto`` plus the ``spectrum`` criterion's statistics (the
  mean gradient's exact sums or sketches of width ``rank_max + 10`` = 42 for every module, as
  ``--criterion spectrum --rank-max 32`` collects them).
- ``analysis_spectrum_stop``: ``analysis_spectrum`` plus the spectrum criterion's stopping check
  after the batch (each half's sketch, spectra, floor and allocation, and their rank
  correlation, as ``FisherStability`` runs it; rank 8, ranks 2 to 32, median mode).

Peak memory: each variant runs again in a fresh subprocess in which every tensor above 64 KB
gets its own memory mapping (``MALLOC_MMAP_THRESHOLD_``), so the resident size follows the
live tensors; after a warm-up step the kernel's high-water mark is reset
(``/proc/self/clear_refs``) and ``VmHWM`` read after one more step: reported is that step's
peak above the resident size before it.

Run:  python benchmarks/analysis_speed.py [--rounds 11] [--json benchmarks/results/analysis_speed.json]
      python benchmarks/analysis_speed.py --model bert:768:4:512:4 --json benchmarks/results/analysis_speed_bert_768_512.json

``--model bert:HIDDEN:LAYERS:TOKENS:BATCH`` times a random-initialised BERT encoder (no weights
needed) instead, for the cost at longer sequences.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = (
    "train_step", "frozen_floor", "analysis_auto", "analysis_ghost", "analysis_materialize", "analysis_spectrum",
    "analysis_spectrum_stop",
)


MINILM = "minilm"


def parse_model(spec: str) -> dict:
    """``minilm`` (the real model on real reviews) or ``bert:HIDDEN:LAYERS:TOKENS:BATCH``.

    The second is a random-initialised ``transformers`` BERT encoder (no weights needed;
    ``HIDDEN / 64`` heads, feed-forward ``4 * HIDDEN``) with the same 9-class head on random
    tokens: for the cost at longer sequences and larger widths.
    """
    if spec == MINILM:
        return {"name": MINILM, "tokens": 128, "batch": 16}
    kind, *numbers = spec.split(":")
    if kind != "bert" or len(numbers) != 4:
        raise SystemExit(f"--model {spec!r}: expected 'minilm' or 'bert:HIDDEN:LAYERS:TOKENS:BATCH'")
    hidden, layers, tokens, batch = (int(n) for n in numbers)
    return {"name": spec, "hidden": hidden, "layers": layers, "tokens": tokens, "batch": batch}


def load_batch(spec: dict):
    if spec["name"] != MINILM:
        generator = torch.Generator().manual_seed(0)
        size = (spec["batch"], spec["tokens"])
        return {
            "input_ids": torch.randint(1000, 30000, size, generator=generator),
            "attention_mask": torch.ones(size, dtype=torch.long),
            "label": torch.randint(0, 9, (spec["batch"],), generator=generator),
        }
    from lightning_fisher.examples.drug_reviews import default_cache_dir, write_condition_dataset
    from lightning_fisher.tensor_folder import TensorFolderDataset

    folder = write_condition_dataset(default_cache_dir() / "condition_train_128", split="train", max_length=128)
    dataset = TensorFolderDataset(folder)
    samples = [dataset[i] for i in range(spec["batch"])]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class RandomBertClassifier(torch.nn.Module):
    """A random-initialised BERT encoder with a linear head on the first token."""

    def __init__(self, hidden: int, layers: int, tokens: int) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
            intermediate_size=4 * hidden, max_position_embeddings=max(512, tokens),
        )
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = torch.nn.Linear(hidden, 9)

    def forward(self, input_ids, attention_mask):
        return self.head(self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])


def load_model(spec: dict):
    torch.manual_seed(0)
    if spec["name"] == MINILM:
        from lightning_fisher.examples.text_classifier import MiniLMClassifier

        model = MiniLMClassifier(num_classes=9)
    else:
        model = RandomBertClassifier(spec["hidden"], spec["layers"], spec["tokens"])
    model.eval()
    return model


def loss_of(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits, batch["label"])


class Runner:
    """Holds the model in the state each variant needs and runs one step of it."""

    def __init__(self, model, batch):
        from lightning_fisher import FisherAccumulator, FisherCollector

        self.model = model
        self.batch = batch
        self.collectors = {
            strategy: FisherCollector(model, norm_strategy=strategy) for strategy in ("auto", "ghost", "materialize")
        }
        names = self.collectors["auto"].names
        self.accumulator = FisherAccumulator(names)
        from lightning_fisher.spectrum import SpectrumSet

        self.spectra = SpectrumSet(self.collectors["auto"].candidates, rank_max=32)
        self.collectors["spectrum"] = FisherCollector(model, norm_strategy="auto", observer=self.spectra.observe)
        embeddings = model.encoder.embeddings
        self._leaf_hook = None
        self._embeddings = embeddings

    def _freeze(self, frozen: bool) -> None:
        for p in self.model.parameters():
            p.requires_grad_(not frozen)

    def train_step(self) -> None:
        self._freeze(False)
        self.model.zero_grad(set_to_none=True)
        loss_of(self.model, self.batch).backward()
        self.model.zero_grad(set_to_none=True)

    def frozen_floor(self) -> None:
        self._freeze(True)
        handle = self._embeddings.register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
        try:
            loss_of(self.model, self.batch).backward()
        finally:
            handle.remove()

    def _analysis(self, strategy: str) -> None:
        self._freeze(True)
        collector = self.collectors[strategy]
        with collector:
            with collector.batch(batch_size=self.batch["label"].shape[0]) as record:
                loss_of(self.model, self.batch).backward()
        self.accumulator.update(record.values, record.finite)

    def analysis_auto(self) -> None:
        self._analysis("auto")

    def analysis_ghost(self) -> None:
        self._analysis("ghost")

    def analysis_materialize(self) -> None:
        self._analysis("materialize")

    def analysis_spectrum(self) -> None:
        self._analysis("spectrum")

    def analysis_spectrum_stop(self) -> None:
        from lightning_fisher import AllocationSettings, spectrum_split_half_correlation

        self._analysis("spectrum")
        settings = AllocationSettings(rank=8, rank_min=2, rank_max=32, criterion="spectrum")
        halves = self.spectra.half_spectra(self.spectra.half_sketch())
        spectrum_split_half_correlation(halves, self.spectra.rank_costs, settings)

    def run(self, variant: str) -> float:
        start = time.perf_counter()
        getattr(self, variant)()
        return time.perf_counter() - start


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(variant: str, spec: dict) -> dict:
    """Run in a fresh process: peak resident memory of one step above the level before it."""
    torch.set_num_threads(torch.get_num_threads())
    model = load_model(spec)
    batch = load_batch(spec)
    runner = Runner(model, batch)
    getattr(runner, variant)()  # warm-up: lazy initialisations
    # The parent runs this with MALLOC_MMAP_THRESHOLD_ set, so tensors live in their own
    # mappings and freed ones leave the resident set at once; trim what the heap still holds.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the high-water mark to the current resident size
    before = _status_kb("VmRSS")
    getattr(runner, variant)()
    peak = _status_kb("VmHWM")
    return {"variant": variant, "before_mb": before / 1024, "peak_above_before_mb": (peak - before) / 1024}


def timings(rounds: int, spec: dict) -> dict:
    model = load_model(spec)
    batch = load_batch(spec)
    runner = Runner(model, batch)
    for variant in VARIANTS:  # warm-up
        runner.run(variant)
    times = {v: [] for v in VARIANTS}
    ratios = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        this_round = {v: runner.run(v) for v in order}
        for v in VARIANTS:
            times[v].append(this_round[v])
            ratios[v].append(this_round[v] / this_round["train_step"])
    return {
        v: {
            "median_seconds": statistics.median(times[v]),
            "median_ratio_to_train_step": statistics.median(ratios[v]),
            "ratio_min": min(ratios[v]),
            "ratio_max": max(ratios[v]),
        }
        for v in VARIANTS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "analysis_speed.json")
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--model", default=MINILM, help="minilm (default) or bert:HIDDEN:LAYERS:TOKENS:BATCH")
    parser.add_argument("--measure-memory", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = parse_model(args.model)
    if args.measure_memory:
        print(json.dumps(measure_memory(args.measure_memory, spec)))
        return

    results = {"timing": timings(args.rounds, spec), "memory": {}}
    for variant in VARIANTS:
        peaks = []
        for _ in range(args.memory_repeats):
            out = subprocess.run(
                [sys.executable, __file__, "--measure-memory", variant, "--model", args.model],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
            )
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_above_before_mb"])
        results["memory"][variant] = statistics.median(peaks)
    reference_memory = results["memory"]["train_step"]
    real = spec["name"] == MINILM
    results["setup"] = {
        "model": "all-MiniLM-L6-v2 + 9-class head (MiniLMClassifier), eval mode" if real else (
            f"random-initialised BERT, hidden {spec['hidden']}, {spec['layers']} layers, + 9-class head, eval mode"),
        "batch": f"{spec['batch']} x {spec['tokens']} tokens, " + ("real drug reviews" if real else "random tokens"),
        "rounds": args.rounds,
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")

    print(f"{results['setup']['model']}, batch {results['setup']['batch']}, {args.rounds} interleaved rounds, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    print("| variant | median time | time / train step (median, min-max) | step peak memory | memory / train step |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        t = results["timing"][variant]
        m = results["memory"][variant]
        print(
            f"| {variant} | {t['median_seconds'] * 1000:.0f} ms | {t['median_ratio_to_train_step']:.2f} "
            f"({t['ratio_min']:.2f}-{t['ratio_max']:.2f}) | {m:.0f} MB | {m / reference_memory:.2f} |"
        )
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
