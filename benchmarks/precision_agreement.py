"""Do mixed and low precisions give the float32 map? Scores, spectra and ranks per Lightning precision.

On two real tasks, the same samples are analysed under ``Trainer(precision=...)`` =
``32-true`` (the reference), ``bf16-mixed``, ``bf16-true`` (weights in bf16), ``16-true``
(weights in fp16) and ``16-mixed`` (fp16 autocast; on a CPU Lightning replaces it with
``bf16-mixed`` and warns, which the table records):

* **MiniLM**: all-MiniLM-L6-v2 with a 9-class head (excluded from the candidates), the real
  drug reviews, batch 16 x 128 tokens, 36 encoder ``nn.Linear`` candidates;
* **digits**: the small flow-matching transformer pretrained on digits 0-4, analysed on
  digits 5-9 (random timesteps and noise, seeded: the same draws in every run), batch 32.

Each run collects the statistics of both allocation criteria (``criterion="spectrum"``, whose
run also yields the ``trace`` scores; the ``trace`` ranks come from
:meth:`~lightning_fisher.FisherMap.reallocate`). Per precision and criterion: the largest and
median relative difference of the modules' values from the float32 run's (``trace``: the
score; ``spectrum``: the top squared singular value of the mean gradient, ``sigma_1^2``), the
Spearman correlation of those values with float32's, how many modules got the same rank, and
the analysis time over float32's (the analysis module's own clock, without the Trainer's and
the model's set-up; one run each after a float32 warm-up, so the ratio is rough).

Run:  python benchmarks/precision_agreement.py [--batches 4] [--json benchmarks/results/precision_agreement.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch
from torchmetrics.functional import spearman_corrcoef

from lightning_fisher import AllocationSettings, FisherMap, TensorDirectoryDataModule, analyze
from lightning_fisher.data.atomic_io import write_text_atomic
from lightning_fisher.examples.drug_reviews import default_cache_dir, write_condition_dataset

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true", "16-mixed")
QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)
ALLOCATION = AllocationSettings(rank=8, rank_min=2, rank_max=32, mode="budget", criterion="spectrum")
FALLBACK = "not supported on CPU"


def minilm_task(workdir: Path) -> tuple[Callable[[], pl.LightningModule], Path, int, list[str]]:
    from lightning_fisher.examples.text_classifier import MiniLMClassifier

    def model() -> pl.LightningModule:
        torch.manual_seed(0)
        return MiniLMClassifier(num_classes=9)

    return model, write_condition_dataset(workdir / "train", split="train", max_length=128), 16, ["head"]


def digits_task(workdir: Path) -> tuple[Callable[[], pl.LightningModule], Path, int, list[str]]:
    from lightning_fisher.examples.digits_flow import DigitsFlowMatching, prepare_digits_example

    train, _, checkpoint = prepare_digits_example(workdir / "digits")

    def model() -> pl.LightningModule:
        torch.manual_seed(0)
        return DigitsFlowMatching(checkpoint_dir=str(checkpoint))

    return model, train, 32, []


def run(task: Callable[[], pl.LightningModule], folder: Path, batch_size: int, exclude: list[str], precision: str,
        batches: int, output: Path) -> tuple[FisherMap, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fisher_map = analyze(
            task(), TensorDirectoryDataModule(folder, batch_size=batch_size, seed=0), output=output,
            exclude=exclude, allocation=ALLOCATION, seed=0, max_batches=batches, min_batches=0,
            convergence_patience=10_000, trainer_kwargs={**QUIET, "precision": precision},
        )
    notes = sorted({str(w.message).split("\n")[0] for w in caught if FALLBACK in str(w.message)})
    return fisher_map, notes


def agreement(values: dict[str, float], reference: dict[str, float], ranks: dict, reference_ranks: dict) -> dict:
    names = list(reference)
    gaps = [abs(values[n] - reference[n]) / reference[n] for n in names if reference[n] > 0]
    rho = float(spearman_corrcoef(
        torch.tensor([values[n] for n in names], dtype=torch.float64),
        torch.tensor([reference[n] for n in names], dtype=torch.float64),
    ))
    return {
        "max_relative_difference": max(gaps),
        "median_relative_difference": statistics.median(gaps),
        "spearman": rho,
        "same_rank": sum(ranks.get(n) == reference_ranks.get(n) for n in names),
        "modules": len(names),
        "ranks_identical": ranks == reference_ranks,
    }


def compare(fisher_map: FisherMap, reference: FisherMap) -> dict:
    trace = dataclasses.replace(ALLOCATION, criterion="trace")
    top = {m.name: m.sigma_sq[0] for m in fisher_map.modules}
    reference_top = {m.name: m.sigma_sq[0] for m in reference.modules}
    return {
        "trace": agreement(fisher_map.scores, reference.scores, fisher_map.reallocate(trace).ranks,
                           reference.reallocate(trace).ranks),
        "spectrum": agreement(top, reference_top, fisher_map.ranks, reference.ranks),
    }


def same_keys(a: object, b: object) -> bool:
    """Whether two JSON values have the same keys at every level (values may differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_keys(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_keys(x, y) for x, y in zip(a, b))
    return type(a) is type(b) or {type(a), type(b)} <= {int, float}


def markdown(results: dict) -> str:
    lines = [
        "| task | precision | criterion | max / median relative difference | Spearman | same rank | time / float32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, rows in results["tasks"].items():
        for precision, row in rows.items():
            if precision == "32-true":
                continue
            label = precision + (" (ran as bf16-mixed)" if row["fallback"] else "")
            for criterion in ("trace", "spectrum"):
                a = row[criterion]
                identical = "all" if a["ranks_identical"] else f"{a['same_rank']}/{a['modules']}"
                lines.append(
                    f"| {task} | {label} | {criterion} | {a['max_relative_difference']:.1e} / "
                    f"{a['median_relative_difference']:.1e} | {a['spearman']:.4f} | {identical} "
                    f"({a['modules']}) | {row['time_ratio']:.2f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4, help="analysis batches per run")
    parser.add_argument("--tasks", nargs="+", default=["minilm", "digits"], choices=["minilm", "digits"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "precision_agreement.json")
    parser.add_argument("--workdir", type=Path, default=default_cache_dir() / "benchmarks")
    args = parser.parse_args()
    builders = {"minilm": minilm_task, "digits": digits_task}

    results = {"batches": args.batches, "allocation": dataclasses.asdict(ALLOCATION), "tasks": {}}
    with tempfile.TemporaryDirectory() as maps:
        for name in args.tasks:
            model, folder, batch_size, exclude = builders[name](args.workdir)
            rows, reference, reference_json = {}, None, None
            # Warm-up (thread pools, first-call set-up), so that the float32 run is not the slow one.
            run(model, folder, batch_size, exclude, "32-true", 1, Path(maps) / "warm_up.json")
            for precision in ["32-true"] + [p for p in args.precisions if p != "32-true"]:
                output = Path(maps) / f"{name}_{precision}.json"
                fisher_map, notes = run(model, folder, batch_size, exclude, precision, args.batches, output)
                written = json.loads(output.read_text())
                if reference is None:
                    reference, reference_json = fisher_map, written
                seconds = fisher_map.analysis.seconds  # the analysis itself: no Trainer or model set-up
                row = {
                    "seconds": seconds,
                    "time_ratio": seconds / reference.analysis.seconds,
                    "samples": fisher_map.analysis.samples,
                    "skipped_samples": fisher_map.analysis.skipped_samples,
                    "fallback": notes,
                    "map_keys_same_as_float32": same_keys(written, reference_json),
                    **compare(fisher_map, reference),
                }
                rows[precision] = row
                print(f"{name} {precision}: {seconds:.1f} s, trace max {row['trace']['max_relative_difference']:.1e}, "
                      f"spectrum max {row['spectrum']['max_relative_difference']:.1e}", flush=True)
            results["tasks"][name] = rows

    table = markdown(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps(results, indent=2) + "\n", make_parents=True)
    notes = sorted({note for rows in results["tasks"].values() for row in rows.values() for note in row["fallback"]})
    text = "\n".join([
        f"Analysis of {args.batches} batches per run; values against the `32-true` run on the same samples.",
        "",
        table,
        "",
        "Written maps with the same keys at every level as the float32 run's: "
        + ("all" if all(row["map_keys_same_as_float32"] for rows in results["tasks"].values() for row in rows.values())
           else "NOT all (see the JSON)") + ".",
        "",
        *(f"Lightning: {note}" for note in notes),
    ])
    write_text_atomic(args.json.with_suffix(".md"), text.rstrip() + "\n")
    print(text)
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
