"""Where the fisher map is: one rule for the analysis that writes it and for every reader.

First match wins:

1. the path given explicitly (``fisher_map=`` / ``output=``): a ``.json`` file, or a folder
   holding ``fisher_map.json``;
2. ``dataset_dir / fisher_map.json``;
3. the datamodule's ``dataset_dir / fisher_map.json``.

A map given explicitly must exist when it is read; a map merely looked for in a dataset folder
may be absent (the caller then trains flat LoRA, or says that it needs one). This module imports
no PEFT, so commands that only read a map stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from lightning_fisher.errors import FisherMapNotFoundError
from lightning_fisher.fisher_map.map import FisherMap, resolve_map_path

__all__ = ["MapSource", "find_fisher_map", "fisher_map_path", "load_map"]

MapSource = Union[FisherMap, str, os.PathLike]


def fisher_map_path(
    fisher_map: Union[str, os.PathLike, None] = None,
    dataset_dir: Union[str, os.PathLike, None] = None,
    datamodule: Any = None,
) -> Optional[Path]:
    """The map file the path rule points at, or ``None`` when nothing names a place.

    Args:
        fisher_map: an explicit map file or folder (the analysis' ``output``).
        dataset_dir: the dataset folder to look in.
        datamodule: a datamodule, or anything else with a ``dataset_dir`` attribute; its
            folder is looked in last. Objects without one (a ``DataLoader``) are skipped.
    """
    if fisher_map is not None:
        return resolve_map_path(fisher_map)
    folder = dataset_dir if dataset_dir is not None else getattr(datamodule, "dataset_dir", None)
    return None if folder is None else resolve_map_path(folder)


def find_fisher_map(
    fisher_map: Union[MapSource, None] = None,
    dataset_dir: Union[str, os.PathLike, None] = None,
    datamodule: Any = None,
) -> Optional[FisherMap]:
    """The map the path rule finds, loaded; ``None`` when no dataset folder holds one.

    Args:
        fisher_map: a :class:`FisherMap` (returned as is), or an explicit file or folder,
            which must hold a map.
        dataset_dir: the dataset folder to look in.
        datamodule: as in :func:`fisher_map_path`.

    Raises:
        FisherMapNotFoundError: ``fisher_map`` names a place without a map.
        FisherMapError: a map file was found but cannot be read or validated.
    """
    if isinstance(fisher_map, FisherMap):
        return fisher_map
    path = fisher_map_path(fisher_map, dataset_dir, datamodule)
    if path is None:
        return None
    try:
        return FisherMap.load(path)
    except FisherMapNotFoundError:
        if fisher_map is not None:
            raise
        return None


def load_map(source: MapSource) -> FisherMap:
    """``source`` itself when it is a :class:`FisherMap`, else the map read from that file or folder."""
    return source if isinstance(source, FisherMap) else FisherMap.load(source)
