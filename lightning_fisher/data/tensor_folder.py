"""Dataset folders: one preprocessed sample per file.

A *dataset folder* is how training data reaches both the Fisher analysis and the adaptive fit.
Each sample is one file directly inside the folder, either ``.pt`` (``torch.save`` of a dict)
or ``.safetensors``, holding a flat dict of tensors::

    my_data/
        sample_000000.pt        {"input_ids": int64[128], "attention_mask": int64[128], "label": int64[]}
        sample_000001.pt
        ...
        fisher_map.json         written by the analysis, ignored as a sample

Only files directly in the folder count (subfolders are not searched), so a folder can hold
its own ``train/`` and ``val/`` subfolders, each a dataset folder of its own. Hidden files
(name starting with ``.``) and files with any other suffix are ignored; that is where
:func:`write_sample_folder` keeps its temporary files, so a crash mid-write never leaves
something that looks like a sample.

Files are ordered by *natural* name order (``sample_2`` before ``sample_10``), so the order is
the same on every machine and file system, whether or not names are zero-padded.

This module is the plain-PyTorch core (torch and safetensors only). The Lightning adapter is
:class:`lightning_fisher.training.datamodule.TensorDirectoryDataModule`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save as _safetensors_bytes

from lightning_fisher.data.atomic_io import atomic_writer, write_bytes_atomic
from lightning_fisher.errors import DatasetFolderError
from lightning_fisher.data.natural_sort import natural_key
from lightning_fisher.wording import a_or_an

__all__ = [
    "SAMPLE_SUFFIXES",
    "TensorFolderDataset",
    "ValidationLevel",
    "dataset_fingerprint",
    "list_sample_files",
    "load_sample",
    "write_sample_folder",
]

SAMPLE_SUFFIXES = (".pt", ".safetensors")

ValidationLevel = Literal["none", "keys", "full"]
_VALIDATION_LEVELS = ("none", "keys", "full")

_EXPECTED_LAYOUT = (
    "expected one .pt or .safetensors file per sample, each a flat dict of tensors "
    "(run your preprocessing first, or lightning_fisher.data.tensor_folder.write_sample_folder)"
)

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------
# Listing


def _is_sample_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(SAMPLE_SUFFIXES)


def _sample_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SAMPLE_SUFFIXES:
        raise DatasetFolderError(
            f"{path} is not a sample file: the suffix must be one of {', '.join(SAMPLE_SUFFIXES)}",
            path=path,
        )
    return suffix


def _require_folder(dataset_dir: PathLike) -> Path:
    folder = Path(dataset_dir)
    if not folder.exists():
        raise DatasetFolderError(f"dataset folder {folder} does not exist; {_EXPECTED_LAYOUT}", path=folder)
    if not folder.is_dir():
        raise DatasetFolderError(
            f"dataset folder {folder} is not a folder; pass the folder that holds the sample files",
            path=folder,
        )
    return folder


def list_sample_files(dataset_dir: PathLike) -> list[Path]:
    """The sample files of a dataset folder, in natural name order.

    Only files directly inside ``dataset_dir`` are listed (not recursive). Names must end in
    ``.pt`` or ``.safetensors`` (any case); hidden files and every other file, such as
    ``fisher_map.json``, ``README`` or temporary files, are ignored.

    Args:
        dataset_dir: the dataset folder.

    Returns:
        The sample files, ordered so that ``sample_2`` comes before ``sample_10``.

    Raises:
        DatasetFolderError: the folder does not exist, is not a folder, or holds no sample file.
    """
    folder = _require_folder(dataset_dir)
    with os.scandir(folder) as entries:
        # A broken symlink with a sample name is kept, so that loading it fails loudly instead
        # of the sample silently disappearing from the dataset.
        names = [
            entry.name
            for entry in entries
            if _is_sample_name(entry.name) and (entry.is_file() or entry.is_symlink()) and not entry.is_dir()
        ]
    if not names:
        raise DatasetFolderError(f"dataset folder {folder} holds no sample files; {_EXPECTED_LAYOUT}", path=folder)
    return [folder / name for name in sorted(names, key=natural_key)]


# --------------------------------------------------------------------------------------------
# Loading one sample


def _as_sample(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Check that a loaded object is a flat, non-empty dict of tensors; turn numbers into 0-d tensors."""
    if not isinstance(obj, Mapping):
        raise DatasetFolderError(
            f"sample file {path} holds {a_or_an(type(obj).__name__)}, not a dict of tensors; {_EXPECTED_LAYOUT}",
            path=path,
        )
    if not obj:
        raise DatasetFolderError(f"sample file {path} holds an empty dict; {_EXPECTED_LAYOUT}", path=path)
    sample: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise DatasetFolderError(
                f"sample file {path} has a key {key!r} of type {type(key).__name__}; keys must be strings",
                path=path,
            )
        if isinstance(value, torch.Tensor):
            # A tensor saved with requires_grad would make every batch part of an autograd graph,
            # which DataLoader workers cannot send back to the main process.
            sample[key] = value.detach()
        elif isinstance(value, (bool, int, float)):
            # Labels are often saved as plain Python numbers; a 0-d tensor batches the same way.
            try:
                sample[key] = torch.tensor(value)
            except (RuntimeError, OverflowError) as error:
                raise DatasetFolderError(
                    f"sample file {path}: value of key {key!r} ({value!r}) does not fit a tensor: {error}",
                    path=path,
                ) from error
        else:
            raise DatasetFolderError(
                f"sample file {path}: value of key {key!r} is {a_or_an(type(value).__name__)}; sample files must be "
                "flat dicts whose values are tensors (or plain int/float numbers). Convert it to a tensor, or "
                "drop it, in your preprocessing",
                path=path,
            )
    return sample


def _weights_only_reason(error: pickle.UnpicklingError) -> str:
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    what = f"a Python object of type {match.group(1)}" if match else "Python objects other than tensors"
    return (
        f"it holds {what}, which torch.load(weights_only=True) refuses to unpickle; save plain tensors instead "
        "(e.g. torch.save({'x': tensor, 'label': torch.tensor(3)}, path))"
    )


def load_sample(path: PathLike) -> dict[str, torch.Tensor]:
    """Load one sample file into a dict of CPU tensors.

    ``.pt`` files are read with ``torch.load(path, map_location="cpu", weights_only=True)``, so a
    file can never run code on load; ``.safetensors`` files with
    :func:`safetensors.torch.load_file`. Plain Python ``int``/``float``/``bool`` values (a label
    saved as ``3``) become 0-d tensors; any other value type is refused.

    Args:
        path: a ``.pt`` or ``.safetensors`` file.

    Returns:
        The sample, keyed like the file.

    Raises:
        DatasetFolderError: the file is missing, truncated or corrupt, holds pickled Python
            objects, or is not a non-empty flat dict of tensors. The message names the file.
    """
    path = Path(path)
    suffix = _sample_suffix(path)
    if not path.is_file():
        raise DatasetFolderError(f"sample file {path} does not exist (or is not a regular file)", path=path)
    if suffix == ".safetensors":
        try:
            obj: object = _load_safetensors(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise DatasetFolderError(
                f"cannot read sample file {path}: {error} (is the file truncated or not safetensors?)", path=path
            ) from error
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            refused = "weights only" in str(error).lower() or "Unsupported global" in str(error)
            reason = _weights_only_reason(error) if refused else f"corrupt pickle data ({error})"
            raise DatasetFolderError(f"cannot read sample file {path}: {reason}", path=path) from error
        except EOFError as error:
            message = f"cannot read sample file {path}: the file is empty or truncated"
            raise DatasetFolderError(message, path=path) from error
        except Exception as error:  # torch reports corrupt archives as RuntimeError, ValueError, ...
            raise DatasetFolderError(
                f"cannot read sample file {path}: {type(error).__name__}: {_first_line(error)} "
                "(is the file truncated or corrupt? re-run the preprocessing that wrote it)",
                path=path,
            ) from error
    return _as_sample(obj, path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


def _header_keys(path: Path) -> tuple[str, ...]:
    """Key names of a safetensors file, read from its header without loading tensor data."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = tuple(handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise DatasetFolderError(
            f"cannot read sample file {path}: {error} (is the file truncated or not safetensors?)", path=path
        ) from error
    if not keys:
        raise DatasetFolderError(f"sample file {path} holds no tensors; {_EXPECTED_LAYOUT}", path=path)
    return keys


# --------------------------------------------------------------------------------------------
# Dataset


class TensorFolderDataset(torch.utils.data.Dataset):
    """A map-style dataset over a dataset folder; item ``i`` is the dict loaded from file ``i``.

    Every sample must have the same keys as the first file (the *reference keys*). How much is
    checked up front is set by ``validate``; whatever the level, :meth:`__getitem__` checks the
    keys of each sample it loads, so a bad file is always reported by name, never batched.

    Args:
        dataset_dir: the dataset folder.
        files: the sample files to use, in this order, instead of listing the folder (e.g. one
            side of a train/validation split). Relative paths are taken relative to
            ``dataset_dir``. ``None`` lists the folder with :func:`list_sample_files`.
        validate: what to check when the dataset is built.

            * ``"none"``: nothing beyond listing; the reference keys are read on first use.
            * ``"keys"`` (default): the key set of every ``.safetensors`` file, read from its
              header (cheap, no tensor data), and the first ``.pt`` file, loaded in full.
              Other ``.pt`` files are not opened until they are used.
            * ``"full"``: load every file; keys must agree, and so must each key's dtype and
              number of dimensions. Sizes may differ (variable-length data is a batching
              question, answered by the collate function).

    Raises:
        DatasetFolderError: the folder is missing or empty, or a checked file is unreadable or
            inconsistent with the first.
        ValueError: ``validate`` is not one of ``"none"``, ``"keys"``, ``"full"``.
    """

    def __init__(
        self,
        dataset_dir: PathLike,
        *,
        files: Optional[Sequence[PathLike]] = None,
        validate: ValidationLevel = "keys",
    ) -> None:
        if validate not in _VALIDATION_LEVELS:
            raise ValueError(f"validate must be one of {', '.join(map(repr, _VALIDATION_LEVELS))}, got {validate!r}")
        self._dataset_dir = Path(dataset_dir)
        if files is None:
            self._files = tuple(list_sample_files(self._dataset_dir))
        else:
            self._files = tuple(self._resolve(file) for file in files)
            if not self._files:
                raise DatasetFolderError(
                    f"no sample files given for dataset folder {self._dataset_dir}; {_EXPECTED_LAYOUT}",
                    path=self._dataset_dir,
                )
        self._reference: Optional[tuple[Path, tuple[str, ...]]] = None
        if validate == "keys":
            self._validate_keys()
        elif validate == "full":
            self._validate_full()

    def _resolve(self, file: PathLike) -> Path:
        path = Path(file)
        if not path.is_absolute():
            path = self._dataset_dir / path
        _sample_suffix(path)
        return path

    # -- public attributes -------------------------------------------------------------------

    @property
    def dataset_dir(self) -> Path:
        """The dataset folder."""
        return self._dataset_dir

    @property
    def files(self) -> tuple[Path, ...]:
        """The sample files, in item order."""
        return self._files

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys every sample has, in the order of the first file."""
        return self._reference_keys()[1]

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self._files[index]
        sample = load_sample(path)
        self._check_keys(path, tuple(sample))
        return sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._dataset_dir)!r}, {len(self)} samples)"

    def subset(self, indices: Iterable[int]) -> TensorFolderDataset:
        """A dataset over some of these files (e.g. a validation split), sharing the reference keys.

        Nothing is re-validated: the new dataset checks each sample against this dataset's
        reference keys as it loads it.

        Args:
            indices: positions in :attr:`files`, in the order the subset should have (at least one).

        Raises:
            DatasetFolderError: ``indices`` is empty.
        """
        subset = TensorFolderDataset(self._dataset_dir, files=[self._files[i] for i in indices], validate="none")
        subset._reference = self._reference_keys()
        return subset

    def describe(self) -> str:
        """One line for logs, e.g. ``612 samples (.pt) in /data/train; keys: input_ids, label``."""
        suffixes = sorted({path.suffix.lower() for path in self._files})
        noun = "sample" if len(self) == 1 else "samples"
        return f"{len(self)} {noun} ({', '.join(suffixes)}) in {self._dataset_dir}; keys: {', '.join(self.keys)}"

    # -- checks ----------------------------------------------------------------------------

    def _reference_keys(self) -> tuple[Path, tuple[str, ...]]:
        if self._reference is None:
            first = self._files[0]
            if _sample_suffix(first) == ".safetensors":
                keys = _header_keys(first)
            else:
                keys = tuple(load_sample(first))
            self._reference = (first, keys)
        return self._reference

    def _check_keys(self, path: Path, keys: Sequence[str]) -> None:
        reference_path, reference_keys = self._reference_keys()
        present, expected = set(keys), set(reference_keys)
        missing = [key for key in reference_keys if key not in present]
        unexpected = [key for key in keys if key not in expected]
        if missing or unexpected:
            details = []
            if missing:
                details.append(f"missing keys: {', '.join(missing)}")
            if unexpected:
                details.append(f"unexpected keys: {', '.join(unexpected)}")
            raise DatasetFolderError(
                f"sample file {path} does not have the keys of {reference_path.name} "
                f"({', '.join(reference_keys)}); {'; '.join(details)}. Every sample in a dataset folder "
                "must have the same keys: fix or remove this file and re-run the preprocessing",
                path=path,
            )

    def _validate_keys(self) -> None:
        reference_path, _ = self._reference_keys()
        first_pt_checked = _sample_suffix(reference_path) == ".pt"
        for path in self._files:
            if _sample_suffix(path) == ".safetensors":
                self._check_keys(path, _header_keys(path))
            elif not first_pt_checked:
                # .pt keys live inside the pickle: loading every file here would read the whole
                # dataset. One is loaded so a mixed folder cannot hide a wrong .pt layout.
                self._check_keys(path, tuple(load_sample(path)))
                first_pt_checked = True

    def _validate_full(self) -> None:
        reference_path = self._files[0]
        reference = {key: (value.dtype, value.dim()) for key, value in load_sample(reference_path).items()}
        self._reference = (reference_path, tuple(reference))
        for path in self._files[1:]:
            sample = load_sample(path)
            self._check_keys(path, tuple(sample))
            for key, value in sample.items():
                dtype, ndim = reference[key]
                if value.dtype != dtype or value.dim() != ndim:
                    raise DatasetFolderError(
                        f"sample file {path}: key {key!r} is {value.dtype} with {value.dim()} dims, but in "
                        f"{reference_path.name} it is {dtype} with {ndim} dims. Every sample must store each key "
                        "with the same dtype and number of dimensions; fix the preprocessing that wrote it",
                        path=path,
                    )


# --------------------------------------------------------------------------------------------
# Writing


def _prepare_for_save(sample: object, index: int) -> dict[str, torch.Tensor]:
    if not isinstance(sample, Mapping) or not sample:
        raise DatasetFolderError(
            f"sample {index} to write is {a_or_an(type(sample).__name__)}{' (empty)' if isinstance(sample, Mapping) else ''}; "
            "write_sample_folder expects each sample to be a non-empty dict of tensors"
        )
    prepared: dict[str, torch.Tensor] = {}
    for key, value in sample.items():
        if not isinstance(key, str):
            raise DatasetFolderError(f"sample {index} to write has a non-string key {key!r}; keys must be strings")
        if isinstance(value, (bool, int, float)) and not isinstance(value, torch.Tensor):
            value = torch.tensor(value)
        if not isinstance(value, torch.Tensor):
            raise DatasetFolderError(
                f"sample {index} to write: value of key {key!r} is {a_or_an(type(value).__name__)}; values must be tensors"
            )
        # A copy with its own compact storage: saving a view of a big batch would otherwise write
        # the whole batch into every file (torch.save) or fail on shared memory (safetensors).
        prepared[key] = value.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)
    return prepared


def write_sample_folder(
    out_dir: PathLike,
    samples: Iterable[Mapping[str, torch.Tensor]],
    *,
    format: Literal["pt", "safetensors"] = "pt",
    prefix: str = "sample",
    start: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Write samples as a dataset folder, one file each: ``sample_000000.pt``, ``sample_000001.pt``, ...

    Each file is written atomically (:mod:`lightning_fisher.data.atomic_io`): to a hidden temporary
    file in ``out_dir`` first, synced to disk, then renamed into place, so an interrupted run
    leaves either the complete file or nothing (and never a temporary file that
    :func:`list_sample_files` would pick up). Tensors are copied to
    compact contiguous CPU storage first, so a sample that is a view of a large batch does not
    drag the whole batch into its file.

    Args:
        out_dir: the folder to write; created (with parents) if missing.
        samples: dicts of tensors (plain ``int``/``float`` values become 0-d tensors); any
            iterable, consumed once, so a generator over a large corpus never sits in memory.
        format: ``"pt"`` (``torch.save``) or ``"safetensors"``.
        prefix: file name prefix. Numbers are zero-padded to six digits, so names also sort
            correctly as plain strings up to a million samples (and in natural order beyond).
        start: number of the first file, to append to a folder written earlier.
        overwrite: replace existing files of the same name. Without it, meeting an existing
            file stops the run; files written before that point stay.

    Returns:
        The paths written, in order.

    Raises:
        DatasetFolderError: a sample is not a dict of tensors, a file exists and
            ``overwrite`` is false, or writing failed (no partial file is left).
        ValueError: ``format``, ``prefix`` or ``start`` is invalid.
    """
    if format not in ("pt", "safetensors"):
        raise ValueError(f"format must be 'pt' or 'safetensors', got {format!r}")
    if not prefix or prefix.startswith(".") or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a plain, non-hidden file name prefix, got {prefix!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an integer >= 0, got {start!r}")
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetFolderError(f"cannot create dataset folder {folder}: {error}", path=folder) from error
    suffix = f".{format}"
    written: list[Path] = []
    for offset, sample in enumerate(samples):
        number = start + offset
        target = folder / f"{prefix}_{number:06d}{suffix}"
        if not overwrite and (target.exists() or target.is_symlink()):
            raise DatasetFolderError(
                f"sample file {target} already exists; pass overwrite=True to replace it, or start={number + 1} "
                "or another prefix to write next to it",
                path=target,
            )
        _write_atomically(target, _prepare_for_save(sample, number), format)
        written.append(target)
    return written


def _write_atomically(target: Path, sample: dict[str, torch.Tensor], format: str) -> None:
    # The atomic writer's temporary files are hidden with a non-sample suffix: never listed as
    # a sample, even if the process dies before its cleanup runs.
    try:
        if format == "safetensors":
            write_bytes_atomic(target, _safetensors_bytes(sample))
        else:
            with atomic_writer(target) as handle:
                torch.save(sample, handle)
    except (OSError, RuntimeError) as error:
        raise DatasetFolderError(f"cannot write sample file {target}: {error}", path=target) from error


# --------------------------------------------------------------------------------------------
# Identity


def dataset_fingerprint(dataset_dir: PathLike, *, content: bool = False) -> str:
    """An identity string for a dataset folder, e.g. to tell whether a map was made on this data.

    By default the hash covers the sorted names and byte sizes of the sample files only: it is
    a cheap check (one ``stat`` per file) that notices added, removed, renamed or resized
    files, *not* a content hash; a file rewritten in place with the same size keeps the
    fingerprint. ``content=True`` also hashes every byte of every file (reads the whole
    dataset). The two modes give different strings for the same folder; compare like with like.

    Args:
        dataset_dir: the dataset folder.
        content: hash file contents too.

    Returns:
        ``"sha256:<64 hex digits>"``.

    Raises:
        DatasetFolderError: the folder is missing or holds no sample files, or a file cannot be read.
    """
    mode = b"content\n" if content else b"names+sizes\n"
    digest = hashlib.sha256(b"lightning_fisher dataset_fingerprint v1 " + mode)
    for path in list_sample_files(dataset_dir):
        try:
            size = path.stat().st_size
            digest.update(os.fsencode(path.name) + b"\0" + str(size).encode() + b"\n")
            if content:
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
        except OSError as error:
            message = f"cannot read sample file {path} for the fingerprint: {error}"
            raise DatasetFolderError(message, path=path) from error
    return f"sha256:{digest.hexdigest()}"
