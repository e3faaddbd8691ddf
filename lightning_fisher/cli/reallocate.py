"""``lightning-fisher reallocate MAP --output NEW [--rank ...]``: another budget or criterion, no new analysis.

The flags are the allocation settings' own (``--rank``, ``--rank-min``, ``--rank-max``,
``--rank-mode``, ``--criterion``, ``--score-power``, ``--exclude-threshold``), defaulting to the
map's settings, so only what changes needs saying. The new map keeps the analysis and
provenance of the old one; the old file is never touched (``--output`` must name another file).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from lightning_fisher.allocation_settings import AllocationSettings, field_help
from lightning_fisher.errors import FisherMapWriteError
from lightning_fisher.fisher_map import FisherMap, resolve_map_path

__all__ = ["build_parser", "run_reallocate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-fisher reallocate",
        description="Allocate the ranks of a stored fisher map again with other settings (budget, bounds, mode or "
        "criterion), without a new analysis. Unset flags keep the map's values.",
    )
    parser.add_argument("map", help="fisher_map.json, or the dataset folder that holds it")
    parser.add_argument("--output", required=True, help="where to write the new map (a .json file or a folder)")
    parser.add_argument("--lora_alpha", "--lora-alpha", type=float, default=None,
                        help="alpha at the new base rank (default: the map's alpha policy carried to it)")
    types = typing.get_type_hints(AllocationSettings)
    for f in AllocationSettings.fields():
        flag = f.metadata["flag"]
        kind = types[f.name]
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        spellings = dict.fromkeys((f"--{flag}", f"--{flag.replace('_', '-')}"))  # one when they agree
        parser.add_argument(
            *spellings, dest=f.name, default=None, choices=choices,
            type=str if choices else kind, help=f"{field_help(f)} (default: the map's)",
        )
    return parser


def run_reallocate(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    fisher_map = FisherMap.load(args.map)
    source, target = resolve_map_path(args.map), resolve_map_path(args.output)
    if target.resolve() == source.resolve():
        raise FisherMapWriteError(
            f"{target}: --output names the map being reallocated; write the new map to another file", path=target
        )
    changes = {f.name: getattr(args, f.name) for f in AllocationSettings.fields() if getattr(args, f.name) is not None}
    settings = dataclasses.replace(fisher_map.allocation, **changes)
    new = fisher_map.reallocate(settings, lora_alpha=args.lora_alpha)
    written = new.save(Path(args.output))
    print(f"{written}: {settings.describe()}\n  {new.summary()}\n  was: {fisher_map.summary()}")
    return 0
