"""Replacing a map file without losing the previous one: it is kept as ``<name>.bak``.

Re-running an analysis into the same folder is routine, and so is writing a reallocated map
over an earlier one; but the map replaced may be the one a finished training run used. So a
file already at the destination is first copied, atomically, to ``<name>.bak`` (one backup:
the latest previous file), and the caller gets a line saying so to show the user.
``analyze`` and ``lightning-fisher reallocate`` both save through :func:`save_keeping_previous`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from lightning_fisher.data.atomic_io import write_bytes_atomic
from lightning_fisher.errors import FisherMapError, FisherMapWriteError
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.fisher_map.codec import resolve_map_path
from lightning_fisher.fisher_map.summary import replaced_map_note

__all__ = ["BACKUP_SUFFIX", "SavedMap", "read_previous", "save_keeping_previous"]

#: A map that a new one replaces is kept next to it under its name plus this suffix.
BACKUP_SUFFIX = ".bak"


@dataclass(frozen=True)
class SavedMap:
    """What :func:`save_keeping_previous` did.

    Attributes:
        path: the map file written.
        previous: the map it replaced (``None``: there was none, or the file was not a readable map).
        note: the line saying what was replaced and where it is kept; ``None`` when nothing was.
    """

    path: Path
    previous: Optional[FisherMap] = None
    note: Optional[str] = None


def read_previous(file: Union[str, os.PathLike]) -> tuple[Optional[FisherMap], str]:
    """``(map, "")`` for a readable map at ``file``; ``(None, why not)`` otherwise (also when it does not exist)."""
    file = Path(file)
    try:
        return FisherMap.from_dict(json.loads(file.read_bytes()), path=file), ""
    except FileNotFoundError:
        return None, "no such file"
    except (FisherMapError, ValueError, OSError) as error:
        return None, str(error).splitlines()[0]


def save_keeping_previous(fisher_map: FisherMap, destination: Union[str, os.PathLike]) -> SavedMap:
    """Write the map to ``destination`` (a file, or a folder's ``fisher_map.json``), keeping any file there as ``.bak``.

    Raises:
        FisherMapWriteError: the backup or the map cannot be written; nothing was replaced.
    """
    file = resolve_map_path(destination)
    if not file.is_file():
        return SavedMap(path=fisher_map.save(file))
    backup = file.with_name(file.name + BACKUP_SUFFIX)
    content = file.read_bytes()
    try:
        write_bytes_atomic(backup, content)
    except OSError as error:
        raise FisherMapWriteError(
            f"{backup}: cannot keep the previous fisher map there ({error}); nothing was replaced", path=backup
        ) from error
    previous, problem = read_previous(file)
    written = fisher_map.save(file)
    return SavedMap(path=written, previous=previous, note=replaced_map_note(previous, fisher_map, str(backup), problem))
