"""``lightning-fisher show MAP``: a map as a readable table, as JSON or CSV records, optionally a heatmap."""

from __future__ import annotations

import argparse
import shutil
import sys

from lightning_fisher.fisher_map import FisherMap
from lightning_fisher.report import format_map_table, map_csv, map_json, plot_map

__all__ = ["run_show"]

FORMATS = ("text", "json", "csv")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-fisher show",
        description="Print a fisher map: scores with uncertainty and ranks, grouped by block and module type.",
    )
    parser.add_argument("map", help="fisher_map.json, or the dataset folder that holds it")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="text: header, table and rank matrix (default); json / csv: one record per module (name, type, "
        "shape, score, stderr, rank, alpha, excluded), nothing else on stdout",
    )
    parser.add_argument("--sort", choices=("name", "score", "rank"), default="name", help="row order (default: by block)")
    parser.add_argument("--top", type=int, default=None, help="show only the first N rows")
    parser.add_argument("--plot", metavar="OUT.png", default=None, help="also write a heatmap of scores and ranks")
    return parser


def run_show(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top: expected a positive number of rows, got {args.top}")
    fisher_map = FisherMap.load(args.map)
    if args.format == "text":
        width = shutil.get_terminal_size(fallback=(120, 24)).columns
        print(format_map_table(fisher_map, sort=args.sort, top=args.top, width=width))
    else:
        render = map_json if args.format == "json" else map_csv
        print(render(fisher_map, sort=args.sort, top=args.top), end="" if args.format == "csv" else "\n")
    if args.plot:
        # stdout holds only the records in a data format, so a pipe gets clean JSON / CSV
        print(f"heatmap written to {plot_map(fisher_map, args.plot)}", file=sys.stdout if args.format == "text" else sys.stderr)
    return 0
