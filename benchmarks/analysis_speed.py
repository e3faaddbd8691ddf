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
needed) instead, for the cost at longer sequences; ``--model llama:HIDDEN:LAYERS:TOKENS:BATCH`` a
random-initialised Llama-shaped causal language model with its own next-token loss.
``benchmarks/memory_curves.py`` sweeps both over width and sequence length with this machinery.
``--model digits`` times the small flow-matching model of the digits example
(``lightning_fisher.examples.digits_flow``: width 64, 3 blocks, 22 ``nn.Linear`` modules of 4 to
128 features, 16 patch tokens) on a batch of 64 real digits at fixed timesteps and noise, one
torch thread, with the demo's spectrum settings (rank 4, ranks 1 to 16, sketch width 26): the
point where fixed per-module costs, not the products, set the analysis' time.
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
from typing import Optional

import torch
import torch.nn.functional as F

VARIANTS = (
    "train_step", "frozen_floor", "analysis_auto", "analysis_auto_stop", "analysis_ghost", "analysis_materialize",
    "analysis_spectrum", "analysis_spectrum_stop",
)
#: Variants the speed table leaves out: the spectrum statistics with every module forced to one method.
EXTRA_VARIANTS = ("analysis_spectrum_sketch", "analysis_spectrum_exact")
#: ``--check-every``: the spectrum stopping check's period in batches (``None``: the library's default).
CHECK_EVERY = None
#: ``rank_max`` of the spectrum variants (``--criterion spectrum --rank-max 32``: sketches of width 42).
SPECTRUM_RANK_MAX = 32


MINILM = "minilm"
DIGITS = "digits"
LLAMA_VOCAB = 32000
#: The stopping check's allocation settings per model family: the digits demo's (rank 4, ranks 1
#: to 16), else rank 8, ranks 2 to ``SPECTRUM_RANK_MAX``.
STOP_SETTINGS = {DIGITS: dict(rank=4, rank_min=1, rank_max=16)}


def parse_model(spec: str) -> dict:
    """``minilm`` (the real model on real reviews), ``bert:HIDDEN:LAYERS:TOKENS:BATCH`` or
    ``llama:HIDDEN:LAYERS:TOKENS:BATCH``.

    ``bert`` is a random-initialised ``transformers`` BERT encoder (no weights needed;
    ``HIDDEN / 64`` heads, feed-forward ``4 * HIDDEN``) with the same 9-class head on random
    tokens: for the cost at longer sequences and larger widths. ``llama`` is a random-initialised
    ``LlamaForCausalLM`` shaped like TinyLlama (``HIDDEN / 64`` heads, an eighth of them for keys
    and values, feed-forward about ``8/3 * HIDDEN``, vocabulary 32,000, untied output layer)
    trained on its own next-token loss over random tokens.
    """
    if spec == MINILM:
        return {"name": MINILM, "family": MINILM, "tokens": 128, "batch": 16}
    if spec == DIGITS:
        return {"name": DIGITS, "family": DIGITS, "hidden": 64, "layers": 3, "tokens": 16, "batch": 64}
    kind, *numbers = spec.split(":")
    if kind not in ("bert", "llama") or len(numbers) != 4:
        raise SystemExit(
            f"--model {spec!r}: expected 'minilm', 'digits', 'bert:HIDDEN:LAYERS:TOKENS:BATCH' or "
            "'llama:HIDDEN:LAYERS:TOKENS:BATCH'"
        )
    hidden, layers, tokens, batch = (int(n) for n in numbers)
    return {"name": spec, "family": kind, "hidden": hidden, "layers": layers, "tokens": tokens, "batch": batch}


def stop_settings(spec: dict):
    """The spectrum criterion's allocation settings for ``spec`` (its ``rank_max`` sets the sketch width)."""
    from lightning_fisher import AllocationSettings

    values = STOP_SETTINGS.get(spec.get("family"), dict(rank=8, rank_min=2, rank_max=SPECTRUM_RANK_MAX))
    return AllocationSettings(criterion="spectrum", **values)


def load_batch(spec: dict):
    if spec["name"] == DIGITS:
        from lightning_fisher.examples.digits_flow.data import digits_split

        x, _ = digits_split("high").split("train")
        generator = torch.Generator().manual_seed(0)
        x0 = x[: spec["batch"]].reshape(-1, 1, 8, 8).float()
        return {"x": x0, "t": torch.rand(x0.shape[0], generator=generator),
                "noise": torch.randn(x0.shape, generator=generator)}
    if spec["name"] != MINILM:
        generator = torch.Generator().manual_seed(0)
        size = (spec["batch"], spec["tokens"])
        return {
            "input_ids": torch.randint(1000, 30000, size, generator=generator),
            "attention_mask": torch.ones(size, dtype=torch.long),
            "label": torch.randint(0, 9, (spec["batch"],), generator=generator),
        }
    from lightning_fisher.examples.drug_reviews import default_cache_dir, write_condition_dataset
    from lightning_fisher.data.tensor_folder import TensorFolderDataset

    folder = write_condition_dataset(default_cache_dir() / "condition_train_128", split="train", max_length=128)
    dataset = TensorFolderDataset(folder)
    samples = [dataset[i] for i in range(spec["batch"])]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def llama_config(hidden: int, layers: int, tokens: int):
    """TinyLlama's proportions at any width (TinyLlama 1.1B is ``llama_config(2048, 22, 2048)``)."""
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    return LlamaConfig(
        vocab_size=LLAMA_VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 8), intermediate_size=256 * round(8 * hidden / 3 / 256),
        max_position_embeddings=max(2048, tokens), tie_word_embeddings=False,
    )


class RandomLlamaLM(torch.nn.Module):
    """A random-initialised Llama-shaped causal language model; its loss is the mean next-token loss.

    Every sample has the same length, so the token mean over the batch is the mean of the
    samples' own token means: a batch-mean loss, as the collector's default assumes.
    """

    def __init__(self, hidden: int, layers: int, tokens: int) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.encoder = LlamaForCausalLM(llama_config(hidden, layers, tokens))

    def loss(self, batch) -> torch.Tensor:
        return self.encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]
        ).loss


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
    elif spec["name"] == DIGITS:
        from lightning_fisher.examples.digits_flow import DigitsFlowMatching

        model = DigitsFlowMatching()
    elif spec["family"] == "llama":
        model = RandomLlamaLM(spec["hidden"], spec["layers"], spec["tokens"])
    else:
        model = RandomBertClassifier(spec["hidden"], spec["layers"], spec["tokens"])
    model.eval()
    return model


def loss_of(model, batch):
    if "x" in batch:  # the digits model: its denoising loss at the batch's fixed timesteps and noise
        from lightning_fisher.examples.digits_flow import denoising_loss

        return denoising_loss(model, batch["x"], batch["t"], batch["noise"])
    if isinstance(model, RandomLlamaLM):
        return model.loss(batch)
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits, batch["label"])


class Runner:
    """Holds the model in the state each variant needs and runs one step of it."""

    def __init__(self, model, batch, spec: Optional[dict] = None):
        from lightning_fisher import FisherAccumulator, FisherCollector

        self.model = model
        self.batch = batch
        self.batch_size = next(iter(batch.values())).shape[0]
        family = (spec or {}).get("family")
        self.settings = stop_settings(spec or {})
        self.check_every = CHECK_EVERY  # None: the library's default
        self.collectors = {
            strategy: FisherCollector(model, norm_strategy=strategy) for strategy in ("auto", "ghost", "materialize")
        }
        names = self.collectors["auto"].names
        self.accumulator = FisherAccumulator(names)
        self.spectra = {}  # method -> SpectrumSet, built on first use: their sums stay resident
        # The floor's backward starts at the embeddings' output (BERT: the whole embedding block).
        if family == DIGITS:
            self._embeddings = model.patch_embed
        else:
            self._embeddings = getattr(model.encoder, "embeddings", None) or model.encoder.get_input_embeddings()

    def spectrum_set(self, method: str):
        """The ``SpectrumSet`` of every candidate with ``method`` (``auto``, ``sketch``, ``exact``), built once."""
        if method not in self.spectra:
            from lightning_fisher import FisherCollector
            from lightning_fisher.analysis.spectrum import SpectrumSet

            spectra = SpectrumSet(
                self.collectors["auto"].candidates, rank_max=self.settings.rank_max, method=method,
                check_every=self.check_every,
            )
            self.spectra[method] = spectra
            self.collectors[f"spectrum_{method}"] = FisherCollector(
                self.model, norm_strategy="auto", observer=spectra.observe
            )
        return self.spectra[method]

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
            with collector.batch(batch_size=self.batch_size) as record:
                loss_of(self.model, self.batch).backward()
        self.accumulator.update(record.values, record.finite)

    def analysis_auto(self) -> None:
        self._analysis("auto")

    def analysis_ghost(self) -> None:
        self._analysis("ghost")

    def analysis_materialize(self) -> None:
        self._analysis("materialize")

    def analysis_spectrum(self) -> None:
        self.spectrum_set("auto")
        self._analysis("spectrum_auto")

    def analysis_spectrum_sketch(self) -> None:
        self.spectrum_set("sketch")
        self._analysis("spectrum_sketch")

    def analysis_spectrum_exact(self) -> None:
        self.spectrum_set("exact")
        self._analysis("spectrum_exact")

    def analysis_auto_stop(self) -> None:
        from lightning_fisher.allocation.criteria.trace import split_half_correlation

        self._analysis("auto")
        split_half_correlation(self.accumulator)

    def analysis_spectrum_stop(self) -> None:
        """``check_every`` analysis batches with the criterion's check after each, as ``AnalysisSession`` runs them.

        The check runs in full on one of every ``check_every`` batches (the spectrum set's own
        period): :meth:`run` reports the time per batch of the whole cycle.
        """
        from lightning_fisher.allocation.criteria.spectrum import SpectrumCriterion

        spectra = self.spectrum_set("auto")
        for _ in range(spectra.check_every):
            self._analysis("spectrum_auto")
            SpectrumCriterion().split_half_correlation(self.accumulator, spectra, self.settings, lambda t: t)

    def run(self, variant: str) -> float:
        """Seconds per analysis batch of one call of ``variant``."""
        batches = self.spectrum_set("auto").check_every if variant == "analysis_spectrum_stop" else 1
        start = time.perf_counter()
        getattr(self, variant)()
        return (time.perf_counter() - start) / batches


def _library_check_every() -> int:
    from lightning_fisher.analysis.spectrum import STOP_CHECK_EVERY

    return STOP_CHECK_EVERY


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(variant: str, spec: dict) -> dict:
    """Run in a fresh process: peak resident memory of one step above the level before it.

    Also ``peak_above_start_mb``: the step's peak above the resident size before the model was
    built, i.e. weights, whatever the variant keeps between steps (spectrum sums) and the step.
    """
    torch.set_num_threads(torch.get_num_threads())
    if spec["name"] == MINILM:  # from_pretrained refuses the meta device: import its code only
        from lightning_fisher.examples.text_classifier import MiniLMClassifier  # noqa: F401
        from transformers import AutoModel  # noqa: F401
    else:
        with torch.device("meta"):
            load_model(spec)  # imports the model's code, so the start level below holds it
    from lightning_fisher import FisherAccumulator, FisherCollector  # noqa: F401  (likewise)
    from lightning_fisher.analysis.spectrum import SpectrumSet  # noqa: F401
    from lightning_fisher.allocation.criteria.spectrum import SpectrumCriterion  # noqa: F401  (the stop variants')
    from lightning_fisher.allocation.criteria.trace import split_half_correlation  # noqa: F401
    # The stopping checks' Spearman correlation imports torchmetrics on first use (40-60 MB
    # resident, once; a Lightning run has it loaded already): part of the start level, not a step.
    import torchmetrics.functional  # noqa: F401
    # Likewise the LAPACK code the spectrum's reconstructions call (about 9 MB resident once
    # loaded; a fifth of the digits model's whole training step).
    probe = torch.randn(8, 4, dtype=torch.float64)
    torch.linalg.eigvalsh(torch.linalg.solve_triangular(torch.linalg.qr(probe).R, torch.eye(4, dtype=torch.float64),
                                                        upper=True))
    torch.linalg.svdvals(probe)

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = _status_kb("VmRSS")
    model = load_model(spec)
    batch = load_batch(spec)
    runner = Runner(model, batch, spec)
    getattr(runner, variant)()  # warm-up: lazy initialisations
    # The parent runs this with MALLOC_MMAP_THRESHOLD_ set, so tensors live in their own
    # mappings and freed ones leave the resident set at once; trim what the heap still holds.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the high-water mark to the current resident size
    before = _status_kb("VmRSS")
    getattr(runner, variant)()
    peak = _status_kb("VmHWM")
    return {
        "variant": variant, "start_mb": start / 1024, "before_mb": before / 1024,
        "peak_above_before_mb": (peak - before) / 1024, "peak_above_start_mb": (peak - start) / 1024,
    }


def memory_in_fresh_processes(variant: str, model: str, repeats: int, timeout: float | None = None) -> list[dict]:
    """:func:`measure_memory` of ``variant`` in ``repeats`` fresh processes (tensors above 64 KB mmapped)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--measure-memory", variant, "--model", model, "--threads",
             str(torch.get_num_threads())] + ([] if CHECK_EVERY is None else ["--check-every", str(CHECK_EVERY)]),
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def timings(rounds: int, spec: dict, variants: tuple[str, ...] = VARIANTS) -> dict:
    """Median time and median per-round ratio to ``train_step`` (which ``variants`` must hold)."""
    model = load_model(spec)
    batch = load_batch(spec)
    runner = Runner(model, batch, spec)
    for variant in variants:  # warm-up
        runner.run(variant)
    times = {v: [] for v in variants}
    ratios = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        this_round = {v: runner.run(v) for v in order}
        for v in variants:
            times[v].append(this_round[v])
            ratios[v].append(this_round[v] / this_round["train_step"])
    return {
        v: {
            "median_seconds": statistics.median(times[v]),
            "median_ratio_to_train_step": statistics.median(ratios[v]),
            "ratio_min": min(ratios[v]),
            "ratio_max": max(ratios[v]),
        }
        for v in variants
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "analysis_speed.json")
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--model", default=MINILM, help="minilm (default) or bert:HIDDEN:LAYERS:TOKENS:BATCH")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 on a shared machine: idle threads spin in barriers)")
    parser.add_argument("--check-every", type=int, default=None,
                        help="the spectrum stopping check's period in batches (default: the library's)")
    parser.add_argument("--measure-memory", choices=VARIANTS + EXTRA_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global CHECK_EVERY
    CHECK_EVERY = args.check_every
    spec = parse_model(args.model)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif spec["family"] == DIGITS:
        torch.set_num_threads(1)  # its 64-wide matrices gain nothing from threads (see digits_flow.single_threaded)
    if args.measure_memory:
        print(json.dumps(measure_memory(args.measure_memory, spec)))
        return

    results = {"timing": timings(args.rounds, spec), "memory": {}}
    for variant in VARIANTS:
        runs = memory_in_fresh_processes(variant, args.model, args.memory_repeats)
        results["memory"][variant] = statistics.median(r["peak_above_before_mb"] for r in runs)
    reference_memory = results["memory"]["train_step"]
    real = spec["name"] == MINILM
    results["setup"] = {
        "model": "all-MiniLM-L6-v2 + 9-class head (MiniLMClassifier), eval mode" if real else
        "digits flow-matching model (DigitsFlowMatching: width 64, 3 blocks), random-initialised, denoising loss at "
        "fixed timesteps and noise, eval mode, 1 thread" if spec["family"] == DIGITS else (
            f"random-initialised Llama (TinyLlama shape), hidden {spec['hidden']}, {spec['layers']} layers, "
            "next-token loss, eval mode" if spec["family"] == "llama" else
            f"random-initialised BERT, hidden {spec['hidden']}, {spec['layers']} layers, + 9-class head, eval mode"),
        "batch": f"{spec['batch']} x {spec['tokens']} tokens, " + (
            "real drug reviews" if real else "real digits (5-9)" if spec["family"] == DIGITS else "random tokens"),
        "rounds": args.rounds,
        "spectrum_check_every": args.check_every if args.check_every is not None else _library_check_every(),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    from lightning_fisher.data.atomic_io import write_text_atomic  # here: the measured processes never import it

    write_text_atomic(args.json, json.dumps(results, indent=2) + "\n", make_parents=True)

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
