"""``lightning-fisher show MAP``: a map as a readable table, optionally a heatmap."""

from __future__ import annotations

import argparse
import shutil

from lightning_fisher.fisher_map import FisherMap
from lightning_fisher.report import format_map_table, plot_map

__all__ = ["run_show"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-fisher show",
        description="Print a fisher map: scores with uncertainty and ranks, grouped by block and module type.",
    )
    parser.add_argument("map", help="fisher_map.json, or the dataset folder that holds it")
    parser.add_argument("--sort", choices=("name", "score", "rank"), default="name", help="row order (default: by block)")
    parser.add_argument("--top", type=int, default=None, help="show only the first N rows")
    parser.add_argument("--plot", metavar="OUT.png", default=None, help="also write a heatmap of scores and ranks")
    return parser


def run_show(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    fisher_map = FisherMap.load(args.map)
    width = shutil.get_terminal_size(fallback=(120, 24)).columns
    print(format_map_table(fisher_map, sort=args.sort, top=args.top, width=width))
    if args.plot:
        print(f"heatmap written to {plot_map(fisher_map, args.plot)}")
    return 0
