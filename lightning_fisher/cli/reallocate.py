"""``lightning-fisher reallocate MAP --output NEW [--rank ...]``: another budget or criterion, no new analysis.

The flags are the allocation settings' own (``--rank``, ``--rank-min``, ``--rank-max``,
``--rank-mode``, ``--criterion``, ``--score-power``, ``--exclude-threshold``), defaulting to the
map's settings, so only what changes needs saying. The new map keeps the analysis and
provenance of the old one; the old file is never touched (``--output`` must name another file).

``--output`` names a ``.json`` file or a folder (which gets ``fisher_map.json``). A map already
there is kept as ``.bak``, as ``analyze`` keeps one; any other file there is refused, never
replaced. A name that is neither a ``.json`` file nor an existing folder is refused unless it
ends in ``/`` (then the folder is created); every folder created is named in the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path

from lightning_fisher.allocation.settings import AllocationSettings, field_help
from lightning_fisher.data.atomic_io import folders_to_create, unwritable_reason
from lightning_fisher.errors import FisherMapWriteError
from lightning_fisher.fisher_map.map import FisherMap, resolve_map_path
from lightning_fisher.fisher_map.codec import FISHER_MAP_FILENAME
from lightning_fisher.fisher_map.backup import read_previous, save_keeping_previous
from lightning_fisher.wording import folders_created

__all__ = ["build_parser", "run_reallocate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-fisher reallocate",
        description="Allocate the ranks of a stored fisher map again with other settings (budget, bounds, mode or "
        "criterion), without a new analysis. Unset flags keep the map's values.",
    )
    parser.add_argument("map", help="fisher_map.json, or the dataset folder that holds it")
    parser.add_argument(
        "--output", required=True,
        help="where to write the new map: a .json file, or a folder (an existing one, or a new one written with a "
        "trailing /). A map already there is kept as .bak; any other file there is refused",
    )
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


def output_file(output: str, source: Path) -> Path:
    """The file ``--output`` names, checked before any work: see the module docstring for the rule.

    Raises:
        FisherMapWriteError: naming the file, when writing there would lose data or could not work.
    """
    path = Path(output)
    as_folder = output.endswith(("/", os.sep))
    if not as_folder and path.suffix.lower() != ".json" and not path.is_dir():
        raise FisherMapWriteError(
            f"{path}: --output is neither a .json file name nor an existing folder; name a file such as "
            f"{path.with_suffix('.json')}, or a folder to create with a trailing / ({output.rstrip('/')}/)",
            path=path,
        )
    target = path / FISHER_MAP_FILENAME if as_folder else resolve_map_path(path)
    if target.resolve() == source.resolve():
        raise FisherMapWriteError(
            f"{target}: --output names the map being reallocated; write the new map to another file", path=target
        )
    reason = unwritable_reason(target)
    if reason is not None:
        raise FisherMapWriteError(f"{target}: cannot write the new map there ({reason}); pass another --output", path=target)
    if target.exists():
        previous, problem = read_previous(target)
        if previous is None:
            raise FisherMapWriteError(
                f"{target}: --output names an existing file that is not a fisher map ({problem}); it is not replaced. "
                "Pass another --output, or move that file away first",
                path=target,
            )
    return target


def run_reallocate(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    fisher_map = FisherMap.load(args.map)
    source = resolve_map_path(args.map)
    target = output_file(args.output, source)
    changes = {f.name: getattr(args, f.name) for f in AllocationSettings.fields() if getattr(args, f.name) is not None}
    settings = dataclasses.replace(fisher_map.allocation, **changes)
    new = fisher_map.reallocate(settings, lora_alpha=args.lora_alpha)
    created = folders_to_create(target)
    saved = save_keeping_previous(new, target)
    lines = [f"{saved.path}{folders_created(created)}: {settings.describe()}", f"  {new.summary()}",
             f"  from {source}: {fisher_map.summary()}"]
    if saved.note:
        lines.append(f"  {saved.note}")
    if saved.previous is not None:
        lines.append(f"  was: {saved.previous.summary()}")
    print("\n".join(lines))
    return 0
