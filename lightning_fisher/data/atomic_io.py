"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Every file this library writes for users to keep (fisher maps, configs, manifests, reports,
heatmaps, sample files, checkpoints) goes through :func:`atomic_writer`, directly or through
:func:`write_text_atomic` / :func:`write_bytes_atomic`:

1. the content goes to a hidden temporary file in the target's folder (``.NAME.<random>.tmp``:
   hidden, and not a sample suffix, so a dataset folder never lists it as a sample);
2. the file is flushed and ``fsync``-ed, so its content is on disk before it gets the name;
3. it is renamed over the target in one step (``os.replace``);
4. the folder is ``fsync``-ed, so the rename itself survives a power loss (POSIX; Windows has
   no folder handle to sync, and its rename needs none).

On any failure, including Ctrl-C, the temporary file is removed and an existing target is
untouched. Written files get the permissions of a plain ``open()``: ``0o666`` less the umask.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

__all__ = ["atomic_writer", "folders_to_create", "unwritable_reason", "write_bytes_atomic", "write_text_atomic"]

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_writer(path: PathLike, *, make_parents: bool = False) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` when the block ends without error.

    For writers that stream into a file object (``torch.save``, ``Figure.savefig``)::

        with atomic_writer("model.pt") as handle:
            torch.save(state, handle)

    Args:
        path: the file to write or replace.
        make_parents: create missing parent folders first (else a missing folder is an error).

    Raises:
        OSError: the folder is missing or not writable, or the disk is full; ``path`` is then
            as it was before the block. An error raised inside the block propagates the same way.
    """
    target = Path(path)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 lets the umask set the permissions, as open() would (mkstemp would
    # make the file private to its writer).
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def write_bytes_atomic(path: PathLike, data: bytes, *, make_parents: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically and return ``path`` as a :class:`~pathlib.Path`.

    Args:
        path: the file to write or replace.
        data: its new content.
        make_parents: create missing parent folders first (else a missing folder is an error).

    Raises:
        OSError: the folder is missing or not writable, or the disk is full; ``path`` is
            then as it was before the call.
    """
    with atomic_writer(path, make_parents=make_parents) as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str, *, make_parents: bool = False) -> Path:
    """:func:`write_bytes_atomic` of ``text`` encoded as UTF-8 (newlines written as given)."""
    return write_bytes_atomic(path, text.encode("utf-8"), make_parents=make_parents)


def folders_to_create(path: PathLike) -> list[Path]:
    """The missing parent folders of ``path``, outermost first: what ``make_parents=True`` would create.

    Spelled as ``path`` is (relative stays relative), for messages.
    """
    missing = []
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def unwritable_reason(path: PathLike) -> Optional[str]:
    """Why ``path`` cannot be written (with its missing folders created), or ``None`` when it can.

    Checked before the work whose result goes there, so a long run or a printed report does not
    end in an error: the nearest existing folder must be a writable folder, and ``path`` itself
    must not be a folder.
    """
    target = Path(path)
    if target.is_dir():
        return f"{target} is a folder"
    existing = target.absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not a writable folder"
    return None


def _fsync_folder(folder: Path) -> None:
    if os.name == "nt":
        return  # folders cannot be opened as files there, and MoveFileEx needs no folder sync
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        # Some file systems (network, FUSE) cannot sync a folder; the file is in place anyway.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(descriptor)
