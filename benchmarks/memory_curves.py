"""Peak memory and time of an analysis batch against a plain training step, over width and sequence length.

Random-initialised ``transformers`` models (no weights needed, random tokens), built by
``benchmarks/analysis_speed.py`` (``bert:`` and ``llama:`` model specs; see its docstring):

- ``bert``: BERT encoder (``HIDDEN / 64`` heads, feed-forward ``4 * HIDDEN``, vocabulary 30,522)
  with a 9-class head on the first token.
- ``llama``: Llama-shaped causal LM in TinyLlama's proportions (``HIDDEN / 64`` heads, an eighth
  of them for keys and values, feed-forward ``~8/3 * HIDDEN``, vocabulary 32,000, untied output
  layer) on its own next-token loss. TinyLlama 1.1B is ``llama`` at width 2,048, 22 layers.

Points: for each family, a width sweep at ``--width-sweep-tokens`` tokens, and a sequence-length
sweep at width ``--tokens-sweep-width``; every point has ``--layers`` layers and ``--batch``
samples. ``--points`` runs given model specs instead (e.g. one big point alone); ``--max-params``
skips points above a parameter count. Results are merged into ``--json`` by model spec, so big
points can be added later with one command and the table and figure are redrawn from everything.

Variants (``analysis_speed.Runner``; eval mode, no optimizer step):

- ``train_step``: forward + backward, all weights trainable (the reference, 1.00).
- ``frozen_floor``: every weight frozen, no hooks; backward still runs through the network.
- ``analysis_auto``: one analysis batch of the default ``trace`` criterion: frozen weights,
  collector hooks on every ``nn.Linear`` (the output layer included), exact per-sample norms with
  the ``auto`` strategy, accumulator update.
- ``analysis_spectrum_sketch``: ``analysis_auto`` plus the ``spectrum`` criterion's statistics with
  every module sketched (``rank_max`` 32, sketch width ``k = 42``).
- ``analysis_spectrum_exact``: the same with every module's exact float64 sums ``[2, d_out, d_in]``;
  only where those sums stay under ``--exact-max-mb`` in all.

Time: the variants in interleaved rounds (order rotating) in one fresh process per point; the
ratio is the median over rounds of the variant's time over the training step's in the same
round, so background load hits both alike (the load average is recorded with each point).

Memory: each variant in its own fresh process (``analysis_speed.measure_memory``: tensors above
64 KB memory-mapped so the resident size follows live tensors; after a warm-up step the
high-water mark is reset and read after one more step). Two figures per variant:

- ``peak_above_start_mb``: peak resident memory above the process before the model was built:
  weights, what the variant keeps between batches (the spectrum sums) and the step's own peak.
  The memory ratio in the table is this one's, analysis over training step: whether the
  analysis fits where a training step fits (a training step with AdamW would hold two more
  copies of the weights, which this reference leaves out).
- ``peak_above_before_mb``: the step's own peak above the resident size just before it
  (activations, weight gradients, per-sample temporaries).

Spectrum state per module: :attr:`SpectrumAccumulator.state_size` (built on the ``meta`` device,
nothing allocated) in both methods, against a rank-``k`` LoRA adapter's ``k (d_in + d_out)``
parameters, ``k = 42`` the sketch width.

Run (the default: both families, widths 384, 512, 1,024 and 2,048 at 128 tokens, 128, 512 and
1,024 tokens at width 512, 2 layers, batch 2; about 15 minutes on 2 shared cores), then the
2,048-token points (about 10 minutes more):

    python benchmarks/memory_curves.py
    python benchmarks/memory_curves.py --points bert:512:2:2048:2,llama:512:2:2048:2

Bigger points, alone (each merges into the stored results; the 1.1 B-parameter TinyLlama shape
holds 4.4 GB of weights and as much again of weight gradients in its training step, so it needs
a machine with about 12 GB free):

    python benchmarks/memory_curves.py --points llama:2048:22:128:2 --rounds 2
    python benchmarks/memory_curves.py --family bert,llama --widths 384,768,1024,1536,2048 \
        --tokens 128,512,1024,2048 --layers 22 --max-params 1.2e9
    python benchmarks/memory_curves.py --report-only     # redraw the table and figure from the JSON
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_fisher.data.atomic_io import write_bytes_atomic, write_text_atomic

sys.path.insert(0, str(Path(__file__).parent))
import analysis_speed  # noqa: E402  (a sibling script, not a package)

RESULTS = Path(__file__).parent / "results"
VARIANTS = (
    "train_step", "frozen_floor", "analysis_auto", "analysis_auto_stop", "analysis_spectrum_sketch",
    "analysis_spectrum_exact", "analysis_spectrum_stop",
)
ANALYSES = VARIANTS[1:]
M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
PRELOAD = [
    "torch", "transformers", "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama",
    "lightning_fisher", "lightning_fisher.analysis.spectrum", "lightning_fisher.allocation.criteria.spectrum",
    "lightning_fisher.examples.digits_flow", "torchmetrics.functional",
]


def model_spec(family: str, hidden: int, layers: int, tokens: int, batch: int) -> str:
    return f"{family}:{hidden}:{layers}:{tokens}:{batch}"


def sweep_points(args) -> list[str]:
    """Model specs of the sweep: widths at one length, then lengths at one width, per family."""
    if args.points:
        return args.points.split(",")
    points = []
    for family in args.family.split(","):
        for width in _ints(args.widths):
            points.append(model_spec(family, width, args.layers, args.width_sweep_tokens, args.batch))
        for tokens in _ints(args.tokens):
            spec = model_spec(family, args.tokens_sweep_width, args.layers, tokens, args.batch)
            if spec not in points:
                points.append(spec)
    return points


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def describe(spec_text: str) -> dict:
    """Parameter counts and spectrum state sizes of a point's model, built on the meta device."""
    from lightning_fisher.analysis.candidates import select_candidates
    from lightning_fisher.analysis.spectrum import SpectrumAccumulator, sketch_width

    spec = analysis_speed.parse_model(spec_text)
    with torch.device("meta"):
        model = analysis_speed.load_model(spec)
    width = sketch_width(analysis_speed.stop_settings(spec).rank_max)
    shapes: dict[tuple[int, int], dict] = {}
    for name, module in select_candidates(model).items():
        d_out, d_in = module.weight.shape
        entry = shapes.setdefault((d_in, d_out), {"d_in": d_in, "d_out": d_out, "modules": 0, "example": name})
        entry["modules"] += 1
    exact_total = sketch_total = 0
    for entry in shapes.values():
        d_in, d_out = entry["d_in"], entry["d_out"]
        sizes = {
            method: SpectrumAccumulator("m", d_in, d_out, width=width, method=method, device="meta").state_size
            for method in ("exact", "sketch", "auto")
        }
        auto = SpectrumAccumulator("m", d_in, d_out, width=width, device="meta").method
        entry.update(
            weight=d_in * d_out, exact_state=sizes["exact"], sketch_state=sizes["sketch"], auto_method=auto,
            lora_params=width * (d_in + d_out),
        )
        exact_total += sizes["exact"] * entry["modules"]
        sketch_total += sizes["sketch"] * entry["modules"]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "candidate_params": sum(e["weight"] * e["modules"] for e in shapes.values()),
        "sketch_width": width,
        "spectrum_exact_state_mb": exact_total * 8 / 2**20,
        "spectrum_sketch_state_mb": sketch_total * 8 / 2**20,
        "module_shapes": list(shapes.values()),
    }


def _measure_memory(variant: str, spec_text: str, threads: int) -> dict:
    # What MALLOC_MMAP_THRESHOLD_=65536 does for analysis_speed's subprocesses: every tensor
    # above 64 KB in its own mapping, so the resident size follows the live tensors.
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 65536)
    torch.set_num_threads(threads)
    return analysis_speed.measure_memory(variant, analysis_speed.parse_model(spec_text))


class FreshProcesses:
    """Runs each call in a new process forked from a server that has torch and transformers imported.

    As fresh as a new interpreter for memory (nothing has run in the server), without paying the
    imports (about 10 s on a busy 2-core machine) for every variant.
    """

    def __init__(self) -> None:
        import multiprocessing

        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)

    def apply(self, function, arguments: tuple):
        with self._context.Pool(1, maxtasksperchild=1) as pool:
            return pool.apply(function, arguments)


fresh_process = FreshProcesses()


def measure_point(spec_text: str, args) -> dict:
    info = describe(spec_text)
    if info["params"] > args.max_params:
        return {"model": spec_text, "skipped": f"{info['params']:,} parameters > --max-params {args.max_params:,.0f}"}
    exact_fits = info["spectrum_exact_state_mb"] <= args.exact_max_mb
    variants = [v for v in VARIANTS if v != "analysis_spectrum_exact" or exact_fits]
    load_before = os.getloadavg()
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--time-point", spec_text, "--rounds", str(args.rounds),
         "--variants", ",".join(variants), "--threads", str(args.threads)],
        capture_output=True, text=True, check=True,
    )
    timing = json.loads(out.stdout.strip().splitlines()[-1])
    memory = {}
    for variant in variants:
        runs = [
            fresh_process.apply(_measure_memory, (variant, spec_text, args.threads)) for _ in range(args.memory_repeats)
        ]
        memory[variant] = {
            key: sorted(r[key] for r in runs)[len(runs) // 2]
            for key in ("peak_above_start_mb", "peak_above_before_mb", "before_mb", "start_mb")
        }
    spec = analysis_speed.parse_model(spec_text)
    return {
        "model": spec_text,
        **{key: spec[key] for key in ("family", "hidden", "layers", "tokens", "batch")},
        **info,
        "timing": timing,
        "rounds": args.rounds,
        "memory": memory,
        "seconds": time.perf_counter() - started,
        "load_average_1min": [load_before[0], os.getloadavg()[0]],
    }


def time_point(spec_text: str, rounds: int, variants: tuple[str, ...]) -> dict:
    spec = analysis_speed.parse_model(spec_text)
    return analysis_speed.timings(rounds, spec, variants)


# ----------------------------------------------------------------------------- report


def ratios(point: dict) -> dict:
    """Time and memory of every variant as a fraction of the training step's."""
    t, m = point["timing"], point["memory"]
    out = {}
    for variant in ANALYSES:
        if variant in t:
            out[variant] = {
                "time": t[variant]["median_ratio_to_train_step"],
                "memory": m[variant]["peak_above_start_mb"] / m["train_step"]["peak_above_start_mb"],
                "step_memory": m[variant]["peak_above_before_mb"] / m["train_step"]["peak_above_before_mb"],
            }
    return out


def _f(value, fmt="{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def table(points: list[dict], setup: dict) -> str:
    lines = [
        "# Memory curves: analysis batch vs plain training step",
        "",
        f"Written by `python benchmarks/memory_curves.py` ({setup['cores']} cores, torch {setup['torch']}, "
        f"{setup['threads']} threads). Random-initialised `transformers` models, random tokens, eval mode, "
        "no optimizer step. Time: median over interleaved rounds of each variant's time / the training "
        "step's in the same round. Memory: peak resident memory above the process before the model was "
        "built (weights + state kept between batches + the step's peak), one fresh process per variant, "
        "as a fraction of the training step's; step-only: the step's own peak above the resident size "
        "just before it (no weights, no kept state). floor: frozen weights, no hooks; trace: the default "
        "analysis (`auto` norms); trace+stop: with its stopping check; sketch / exact: with the `spectrum` "
        "criterion's statistics (rank_max 32; the digits model 16), every module sketched / exact (exact only "
        "where its sums stay under `--exact-max-mb`); spectrum+stop: the `spectrum` criterion's statistics "
        "(`auto` method) with its stopping check, as an analysis batch runs them.",
        "",
        "| family | params | hidden | layers | tokens | batch | train step | time: floor / trace / trace+stop / sketch "
        "/ exact / spectrum+stop | train step peak (MB) | memory: floor / trace / trace+stop / sketch / exact / "
        "spectrum+stop | step-only memory: trace / trace+stop / sketch / exact / spectrum+stop "
        "| load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if "skipped" in p:
            lines.append(f"| {p['model']} | skipped: {p['skipped']} |" + " |" * 10)
            continue
        r = ratios(p)
        get = lambda v, k: r[v][k] if v in r else None  # noqa: E731
        lines.append(
            f"| {p['family']} | {p['params'] / 1e6:.0f} M | {p['hidden']} | {p['layers']} | {p['tokens']} "
            f"| {p['batch']} "
            f"| {p['timing']['train_step']['median_seconds']:.2f} s ({p.get('rounds', '?')} rounds) "
            f"| {' / '.join(_f(get(v, 'time')) for v in ANALYSES)} "
            f"| {p['memory']['train_step']['peak_above_start_mb']:.0f} "
            f"| {' / '.join(_f(get(v, 'memory')) for v in ANALYSES)} "
            f"| {' / '.join(_f(get(v, 'step_memory')) for v in ANALYSES[1:])} "
            f"| {p['load_average_1min'][0]:.1f}-{p['load_average_1min'][1]:.1f} |"
        )
    lines += [
        "",
        "`load`: the machine's 1-minute load average before and after the point (2 cores; other jobs "
        "shared the machine, which widens the time ratios' spread but hits both arms of a round alike).",
        "",
        "## Spectrum state per module vs a rank-k LoRA adapter",
        "",
        "State entries (float64) of one module's `SpectrumAccumulator` (`state_size`), against the "
        "`k (d_in + d_out)` parameters of a rank-k LoRA adapter on it, k = 42 (the sketch width for "
        "`rank_max` 32). Entries are float64, a LoRA parameter float32 (or less): in bytes the state is "
        "twice the entries' ratio. `auto` picks the exact sums where they cost at most twice the sketch. A "
        "sketch also keeps its two float64 test matrices, `Omega` `[d_in, k]` and `Psi` `[2k+1, d_out]` "
        "(not in `state_size`: they are not summed across processes, every process draws the same).",
        "",
        "| module (example) | d_in | d_out | weight | exact state | sketch state | + test matrices | LoRA k=42 | "
        "sketch state / LoRA | exact state / weight | auto picks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for p in points:
        k = p.get("sketch_width", 42)
        for e in p.get("module_shapes", []):
            key = (e["d_in"], e["d_out"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(
                f"| {p['family']} `{e['example'].split('.')[-1]}` | {e['d_in']} | {e['d_out']} | {e['weight']:,} | "
                f"{e['exact_state']:,} | {e['sketch_state']:,} | {test_matrices(e['d_in'], e['d_out'], k):,} | "
                f"{e['lora_params']:,} | {e['sketch_state'] / e['lora_params']:.2f} | "
                f"{e['exact_state'] / e['weight']:.2f} | {e['auto_method']} |"
            )
    return "\n".join(lines) + "\n"


def test_matrices(d_in: int, d_out: int, k: int) -> int:
    """Entries of a sketch's ``Omega`` (``d_in x k``) and ``Psi`` (``(2k + 1) x d_out``)."""
    return d_in * k + (2 * k + 1) * d_out


def figure(points: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    done = [p for p in points if "skipped" not in p]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    styles = {"analysis_auto": ("trace (auto)", "o-"), "analysis_spectrum_sketch": ("spectrum, sketch", "s--"),
              "analysis_spectrum_exact": ("spectrum, exact", "^:"), "frozen_floor": ("frozen floor", "x-.")}
    colors = {"bert": "tab:blue", "llama": "tab:red"}
    for col, (axis, fixed_key, fixed) in enumerate(
        (("hidden", "tokens", args.width_sweep_tokens), ("tokens", "hidden", args.tokens_sweep_width))
    ):
        for row, quantity in enumerate(("memory", "time")):
            ax = axes[row][col]
            for family in ("bert", "llama"):
                series = sorted(
                    (p for p in done if p["family"] == family and p[fixed_key] == fixed and p["layers"] == args.layers),
                    key=lambda p: p[axis],
                )
                for variant, (label, style) in styles.items():
                    xy = [(p[axis], ratios(p)[variant][quantity]) for p in series if variant in ratios(p)]
                    if xy:
                        ax.plot(*zip(*xy), style, color=colors[family], label=f"{family}: {label}", alpha=0.85)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            xs = sorted({p[axis] for p in done if p[fixed_key] == fixed and p["layers"] == args.layers})
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.yaxis.set_major_locator(ticker.FixedLocator([0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0]))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2g"))
            ax.yaxis.set_minor_locator(ticker.NullLocator())
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel(f"{axis} ({fixed_key} {fixed}, {args.layers} layers, batch {args.batch})")
            ax.set_ylabel(f"{quantity} / training step's")
    axes[0][0].set_title("peak memory (weights + kept state + step) vs width")
    axes[0][1].set_title("peak memory vs sequence length")
    axes[1][0].set_title("time vs width")
    axes[1][1].set_title("time vs sequence length")
    if any(not line.get_label().startswith("_") for line in axes[0][0].get_lines()):
        axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="bert,llama", help="comma-separated: bert, llama")
    parser.add_argument("--widths", default="384,1024,2048", help="hidden sizes of the width sweep")
    parser.add_argument("--tokens", default="128,512,1024", help="sequence lengths of the length sweep")
    parser.add_argument("--width-sweep-tokens", type=int, default=128)
    parser.add_argument("--tokens-sweep-width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--points", help="comma-separated model specs (family:HIDDEN:LAYERS:TOKENS:BATCH) instead of the sweep"
    )
    parser.add_argument("--max-params", type=float, default=float("inf"), help="skip points with more parameters")
    parser.add_argument("--exact-max-mb", type=float, default=512.0,
                        help="run the exact spectrum variant only where all its float64 sums stay under this")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: on a shared 2-core machine, 2 threads spent most of "
                             "the time waiting in OpenMP barriers, small ops most)")
    parser.add_argument("--json", type=Path, default=RESULTS / "memory_curves.json")
    parser.add_argument("--report-only", action="store_true", help="redraw the table and figure from --json")
    parser.add_argument("--time-point", help=argparse.SUPPRESS)
    parser.add_argument("--variants", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_point:
        torch.set_num_threads(args.threads)
        print(json.dumps(time_point(args.time_point, args.rounds, tuple(args.variants.split(",")))))
        return

    stored = json.loads(args.json.read_text()) if args.json.exists() else {"points": {}}
    setup = {
        "torch": str(torch.__version__), "threads": args.threads, "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "rounds": args.rounds, "memory_repeats": args.memory_repeats,
        "spectrum_rank_max": analysis_speed.SPECTRUM_RANK_MAX,
    }
    if not args.report_only:
        for spec_text in sweep_points(args):
            point = measure_point(spec_text, args)
            stored["points"][spec_text] = point
            stored["setup"] = setup
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(args.json, json.dumps(stored, indent=2) + "\n")  # after every point: a crash keeps the rest
            if "skipped" in point:
                print(f"{spec_text}: skipped ({point['skipped']})", flush=True)
                continue
            r = ratios(point)
            print(
                f"{spec_text}: {point['params'] / 1e6:.0f} M params, "
                f"train step {point['timing']['train_step']['median_seconds']:.2f} s, "
                f"{point['memory']['train_step']['peak_above_start_mb']:.0f} MB; "
                + ", ".join(f"{v} time {r[v]['time']:.2f} memory {r[v]['memory']:.2f}" for v in r)
                + f" ({point['seconds']:.0f} s)",
                flush=True,
            )
    points = sorted(
        stored["points"].values(),
        key=lambda p: (p["model"].split(":")[0], p.get("layers", 0), p.get("tokens", 0), p.get("hidden", 0)),
    )
    md = args.json.with_suffix(".md")
    write_text_atomic(md, table(points, stored.get("setup", setup)))
    figure(points, args.json.with_suffix(".png"), args)
    print(f"results: {args.json}, {md}, {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
