"""``lightning-fisher show MAP``: a map as a readable table, as JSON or CSV records, optionally a heatmap."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

from lightning_fisher.data.atomic_io import folders_to_create, unwritable_reason
from lightning_fisher.errors import ReportWriteError
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.report import format_map_table, map_csv, map_json, plot_map
from lightning_fisher.report.plot import PLOT_INSTALL_HINT
from lightning_fisher.wording import folders_created

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
    if args.plot:
        check_plot_destination(Path(args.plot))  # before the table: nothing printed, then an error
    if args.format == "text":
        width = shutil.get_terminal_size(fallback=(120, 24)).columns
        print(format_map_table(fisher_map, sort=args.sort, top=args.top, width=width))
    else:
        render = map_json if args.format == "json" else map_csv
        print(render(fisher_map, sort=args.sort, top=args.top), end="" if args.format == "csv" else "\n")
    if args.plot:
        created = folders_to_create(args.plot)
        try:
            written = plot_map(fisher_map, args.plot)
        except OSError as error:  # the folder was checked; this is a full disk or a change since
            raise ReportWriteError(f"{args.plot}: cannot write the heatmap ({error})", path=args.plot) from error
        # stdout holds only the records in a data format, so a pipe gets clean JSON / CSV
        print(f"heatmap written to {written}{folders_created(created)}", file=sys.stdout if args.format == "text" else sys.stderr)
    return 0


def check_plot_destination(path: Path) -> None:
    """Refuse ``--plot`` before anything is printed when the heatmap could not be written.

    Raises:
        ReportWriteError: naming the file, when it does not end in ``.png`` or its folder is not writable.
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    if path.suffix.lower() != ".png":
        raise ReportWriteError(f"{path}: --plot writes a PNG image; give a file name ending in .png", path=path)
    reason = unwritable_reason(path)
    if reason is not None:
        raise ReportWriteError(f"{path}: cannot write the heatmap there ({reason}); pass another --plot", path=path)
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(PLOT_INSTALL_HINT)
