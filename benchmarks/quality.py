"""Quality benchmark: at an equal number of trainable LoRA parameters, does the Fisher map beat flat LoRA?

Two tasks, each a real model on real data, every arm trained with the same optimizer, schedule,
steps and head learning rate; only where the adapters go (and at what rank) differs.

``reviews``: all-MiniLM-L6-v2 + a 9-class head on the drug-review condition task (8 most
frequent training conditions + other), 128 tokens, batch 16. The 600 training reviews are split
once (fixed seed, independent of the run seeds) into 480 train / 120 validation; the test set is
the 379 test reviews. Baselines measured in the same run: majority class, a linear probe on
frozen mean-pooled features (C chosen on validation), and a head-only fit for the same steps.
To meet the brief's probe figure (fitted on all 600 reviews) on equal data, the probe is also
fitted on all 600, and flat LoRA refitted on all 600 at its chosen LR (``quality_bench/refit.py``).

``digits``: a rectified-flow model pretrained on scikit-learn digits 0-4, adapted to digits 5-9.
The 5-9 train folder is split once (20 % validation, fixed seed); the metric is the held-out
denoising loss (fixed timesteps and noise, the model's ``test_step``) on the 5-9 test folder.
Baseline: the pretrained model's loss before adaptation. Fisher arms run once per timestep focus.

Arms (candidates: the 36 encoder Linear modules of MiniLM, or every Linear of the flow model):
flat LoRA at the base rank; Fisher map in budget mode at the base rank (equal parameters);
PEFT's EVA (data-driven init + rank redistribution, equal total rank); Fisher map in median
mode (the seed tool's rule; parameters float); Fisher budget at 50 % and 25 % of flat; Fisher
budget with rsLoRA scaling; the same with the ``spectrum`` criterion. The frontier (issue 19):
flat LoRA at 25 %, 50 % and 200 % of the base rank (main arms: the full grid), and the maps of
both criteria at 200 %, so that every map has a flat *twin* with its rank budget. Alpha policy: alpha/r constant (alpha = 2r at the base rank), so
every module of every arm has PEFT scaling 2; the rsLoRA arm scales each module by
alpha/sqrt(r_m) with alpha = 2*sqrt(r_base), i.e. scaling 2 at the base rank.

Selection: for every arm the adapter learning rate is chosen on VALIDATION (mean over seeds of
the validation loss; ties within 1e-4 go to the higher validation accuracy); the table reports
TEST metrics at that learning rate, mean and spread over seeds. Every run re-seeds before
fitting, so the same seed gives the same head init, data order and dropout in every arm.

Protocol size. The full grid (every arm x 3 LRs x 3 seeds, ``--full``) would take about 4 hours
on 2 quiet CPU cores. The default takes about 3 hours there (digits about 15 minutes): flat
LoRA and the equal-budget Fisher map (and the head-only baseline) get the full grid; the other
arms are *staged*: LR sweep on seed 0, then seeds 1 and 2 at the LR seed 0 chose on validation.
``--arms`` runs a subset; every invocation adds its runs to the same results file.

Reviews protocol (see ``quality_bench/protocol.py`` for the reasons): 3 epochs (90 steps on
480 reviews; 5 epochs were no better on seed 0), adapter LRs 3e-4 / 1e-3 / 3e-3 (flat LoRA and
the equal-budget map also 1e-2, EVA also 1e-4), head LR 1e-2 for every arm. The head LR was raised from 3e-3
after the first full run, in which flat LoRA was not clearly above the linear probe; that run's
results are kept in ``benchmarks/results/quality_reviews_head_lr_0.003.json``. The report
states whether flat LoRA clearly beats the baselines. Digits: 10 epochs (90 steps), which
bring the held-out loss on 5-9 from 0.641 (pretrained on 0-4) to about 0.59.

Measured in every run besides the final metrics (``quality_bench/measures.py``): the validation
loss after the first epoch (how fast an arm adapts), and on digits the held-out loss on the
PRETRAINING half (digits 0-4, same fixed timesteps and noise) after adaptation, i.e. forgetting.
The report tabulates both per arm, forgetting at every LR as well as at the chosen one (a lower
LR forgets less by itself), and draws ``results/forgetting_digits.png`` (adaptation loss against
forgetting per arm across LRs). The frontier section (``quality_bench/frontier.py``) draws
``results/frontier_<task>.png`` (test metric against LoRA parameters, one line per family: flat,
trace map, spectrum map) and judges each map against its flat twin at the chosen LRs and at
equal LR; arms not yet run are named as such. The measures do not change the training (no random draw), so
runs stored before they existed are re-measured in place with ``--remeasure``: each reruns and
replaces its stored record, keeping the old numbers under ``previous``; the report counts how
many reproduced them exactly. Runs not re-measured show "not measured". On 2 CPU cores a digits
run takes about 4.5 s, so ``--task digits --remeasure`` (151 runs, 9 analyses, 3 EVA
initialisations, pretraining when the work folder is new) takes about 12-15 minutes.

Resumable: every finished run is appended to ``benchmarks/results/quality.json`` (written
atomically); a rerun skips runs already there. Fisher maps and EVA initialisations are cached
per seed (and focus) in the work folder, so an interrupted benchmark does not analyse twice.

Run (from the repository root):
    python benchmarks/quality.py                   # the default protocol, both tasks
    python benchmarks/quality.py --full            # every arm on the full grid (extends the same file)
    python benchmarks/quality.py --quick           # smoke test, ~2-3 minutes, separate result files
    python benchmarks/quality.py --task digits --remeasure   # add forgetting + first-epoch loss to the stored runs
    python benchmarks/quality.py --report-only     # rewrite quality.md from quality.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

# OpenMP threads that spin while waiting made a MiniLM step 4x slower (10 s instead of 2.5 s)
# when another process shared the 2 cores; passive waiting removes that cliff. Read by the
# OpenMP runtime when torch loads, so it must be set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from quality_bench.plan import run_task  # noqa: E402
from quality_bench.protocol import ARMS, DIGITS, HEAD_ONLY, RESULTS_DIR, REVIEWS, Arm, TaskSpec  # noqa: E402
from quality_bench.report import write_report  # noqa: E402
from quality_bench.runs import quiet_lightning  # noqa: E402
from quality_bench.store import ResultStore  # noqa: E402


def quick_variant(task: TaskSpec) -> TaskSpec:
    """Smoke mode: one seed, one LR, a handful of batches; every code path, no meaningful numbers."""
    return replace(task, seeds=(0,), lrs=(task.lrs[1],), arm_lrs=(), epochs=1, limit_train_batches=3, limit_eval_batches=2,
                   analysis_max_batches=3, focuses=task.focuses[:1], staged=True, default_arms=None)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("reviews", "digits", "all"), default="all")
    parser.add_argument("--seeds", help="comma-separated run seeds (default 0,1,2)")
    parser.add_argument("--lrs", help="comma-separated adapter learning rates (default per task)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default per task)")
    parser.add_argument("--head-lr", type=float,
                        help="learning rate of the reviews classification head (default 1e-2); part of the "
                             "protocol, so give a separate --results file")
    parser.add_argument("--arms", help=f"comma-separated arms (default all: {', '.join(a.name for a in ARMS)}, head_only)")
    parser.add_argument("--full", action="store_true",
                        help="every arm, each on the full LR x seed grid (default: the reduced protocol, "
                             "see REVIEWS / DIGITS)")
    parser.add_argument("--quick", action="store_true", help="smoke test (separate quality_quick.* files)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the JSON")
    parser.add_argument("--remeasure", action="store_true",
                        help="rerun stored runs made before the first-epoch / forgetting measures and replace them "
                             "(same protocol; the old numbers are kept under 'previous')")
    parser.add_argument("--results", type=Path, help="results JSON (default benchmarks/results/quality.json)")
    parser.add_argument("--workdir", type=Path, help="data, maps and feature cache (default ~/.cache/lightning_fisher/quality)")
    return parser.parse_args(argv)


def selected_tasks(args: argparse.Namespace) -> list[TaskSpec]:
    # digits first: minutes for the whole task, so an interrupted run still has one complete table
    tasks = [t for t in (DIGITS, REVIEWS) if args.task in ("all", t.name)]
    if args.quick:
        tasks = [quick_variant(t) for t in tasks]
    if args.seeds:
        tasks = [replace(t, seeds=tuple(int(s) for s in args.seeds.split(","))) for t in tasks]
    if args.full:
        tasks = [replace(t, staged=False, default_arms=None) for t in tasks]
    if args.epochs:
        tasks = [replace(t, epochs=args.epochs) for t in tasks]
    if args.head_lr:
        tasks = [replace(t, head_lr=args.head_lr) if t.head_lr is not None else t for t in tasks]
    if args.lrs:
        tasks = [replace(t, lrs=tuple(float(s) for s in args.lrs.split(",")), arm_lrs=()) for t in tasks]
    return tasks


def selected_arms(args: argparse.Namespace, task: TaskSpec) -> tuple[Arm, ...]:
    every = ((HEAD_ONLY,) if task.name == "reviews" else ()) + ARMS
    if not args.arms:
        return every if task.default_arms is None else tuple(a for a in every if a.name in task.default_arms)
    wanted = args.arms.split(",")
    unknown = set(wanted) - {a.name for a in every}
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {sorted(unknown)} for {task.name}")
    return tuple(a for a in every if a.name in wanted)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    name = "quality_quick" if args.quick else "quality"
    results = args.results or RESULTS_DIR / f"{name}.json"
    report = results.with_suffix(".md")
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    store = ResultStore(results)
    if args.report_only and store.data["invocations"]:
        command = store.data["invocations"][-1]["command"] + "  (report rewritten with --report-only)"
    if not args.report_only:
        from lightning_fisher.examples.drug_reviews import default_cache_dir

        quiet_lightning()
        workdir = args.workdir or default_cache_dir() / "quality"
        store.data["invocations"].append({"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                          "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()})
        store.save()
        for task in selected_tasks(args):
            run_task(store, task, selected_arms(args, task), workdir, remeasure=args.remeasure)
    text = write_report(store, report, command, None if args.report_only else time.perf_counter() - started)
    print("\n" + text)


if __name__ == "__main__":
    main()
