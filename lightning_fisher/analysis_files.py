"""What an analysis reads and writes around the model: where the map goes, the data's fingerprint, the seed.

Shared by every way of running the analysis (:func:`~lightning_fisher.analyze` with or without
a Trainer, ``lightning-fisher analyze``), so each behaves the same:

* the map goes to ``output``, else the dataset folder (:func:`map_destination`), checked
  writable before the analysis (:func:`check_writable`);
* a map already there is kept as ``<name>.bak`` (:func:`save_keeping_previous`);
* a dataset folder is fingerprinted into the map (:func:`dataset_record`);
* the run is seeded without changing the caller's random streams (:func:`seeded_run`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from lightning_fisher.atomic_io import write_bytes_atomic
from lightning_fisher.errors import DatasetFolderError, FisherMapError, FisherMapWriteError
from lightning_fisher.fisher_map import DatasetRecord, FisherMap
from lightning_fisher.map_codec import resolve_map_path
from lightning_fisher.map_summary import replaced_map_note
from lightning_fisher.peft_factory.locate import fisher_map_path
from lightning_fisher.tensor_folder import dataset_fingerprint, list_sample_files

__all__ = [
    "BACKUP_SUFFIX", "check_writable", "dataset_record", "map_destination", "save_keeping_previous", "seeded_run",
]

#: A map that a new analysis replaces is kept next to it under its name plus this suffix.
BACKUP_SUFFIX = ".bak"

# Lightning's seed_everything records the seed here; put back after the run like the generators.
_SEED_ENVIRONMENT = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def map_destination(
    data: Any, dataset_dir: Union[str, os.PathLike, None], output: Union[str, os.PathLike, None]
) -> Optional[Path]:
    """Where the map goes: ``output``, else ``dataset_dir``, else the datamodule's ``dataset_dir``.

    The same rule every reader of the map follows (:func:`~lightning_fisher.peft_factory.fisher_map_path`).
    """
    return fisher_map_path(output, dataset_dir, data)


def save_keeping_previous(fisher_map: FisherMap, destination: Path) -> tuple[Path, Optional[str]]:
    """Write the map; a file already there is first copied, atomically, to ``<name>.bak``.

    One backup, the latest previous map: re-running an analysis is routine, but the map it
    replaces may be the one a finished training run used, so it is never silently lost.

    Returns:
        The file written, and the note for the user about the map it replaced (``None`` when
        there was none); the caller says it, on rank zero.
    """
    file = resolve_map_path(destination)
    if not file.is_file():
        return fisher_map.save(file), None
    backup = file.with_name(file.name + BACKUP_SUFFIX)
    content = file.read_bytes()
    try:
        write_bytes_atomic(backup, content)
    except OSError as error:
        raise FisherMapWriteError(
            f"{backup}: cannot keep the previous fisher map there ({error}); nothing was replaced", path=backup
        ) from error
    try:
        previous, problem = FisherMap.from_dict(json.loads(content), path=file), ""
    except (FisherMapError, ValueError) as error:  # an unreadable file is kept all the same
        previous, problem = None, str(error).splitlines()[0]
    written = fisher_map.save(file)
    return written, replaced_map_note(previous, fisher_map, str(backup), problem)


def check_writable(destination: Path) -> None:
    """Fail before a long analysis, not after it, when the map cannot be written."""
    folder = destination.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise FisherMapWriteError(
            f"{destination}: cannot write the fisher map there ({existing} is not a writable folder); "
            "pass another output location",
            path=destination,
        )


def dataset_record(folder: Union[str, os.PathLike, None]) -> Optional[DatasetRecord]:
    """Fingerprint of a folder of sample files; ``None`` when the data did not come from one."""
    if folder is None:
        return None
    folder = Path(folder)
    try:
        files = list_sample_files(folder)
    except DatasetFolderError:
        return None
    return DatasetRecord(path=str(folder.resolve()), fingerprint=dataset_fingerprint(folder), num_files=len(files))


def seed_generators(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators, as ``lightning.seed_everything`` does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device's too


@contextlib.contextmanager
def seeded_run(seed: Optional[int], seed_everything: Any = None) -> Iterator[None]:
    """Seed the analysis without changing the caller's random streams.

    The analysis draws samples, noise and timesteps from the global generators, seeded for
    reproducibility; a training run started after it in the same script must not depend on
    whether it ran. Python, NumPy and torch (CPU and CUDA) states and Lightning's seed
    environment variables are put back afterwards.

    Args:
        seed: the seed; ``None`` leaves the random state alone (it is still put back).
        seed_everything: how to seed, ``seed_everything(seed)``; default :func:`seed_generators`
            (the Lightning runner passes Lightning's own, which also seeds its workers).
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    environment = {key: os.environ.get(key) for key in _SEED_ENVIRONMENT}
    try:
        if seed is not None:
            (seed_everything or seed_generators)(seed)
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
