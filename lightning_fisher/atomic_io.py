"""Atomic text writes: a reader sees the old file or the new one, never a half-written one.

Every file this library writes for users to keep (fisher maps, configs, manifests, reports)
goes through :func:`write_text_atomic`: the text goes to a hidden temporary file in the
target's folder, is flushed to disk, and is renamed over the target in one step. On any
failure, including Ctrl-C, the temporary file is removed and an existing target is untouched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

__all__ = ["write_text_atomic"]


def write_text_atomic(path: Union[str, Path], text: str, *, make_parents: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return ``path``.

    Args:
        path: the file to write or replace.
        text: its new content.
        make_parents: create missing parent folders first (else a missing folder is an error).

    Raises:
        OSError: the folder is missing or not writable, or the disk is full; ``path`` is
            then as it was before the call.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates the file readable by its owner only
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
