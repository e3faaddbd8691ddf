"""What an analysis reads and writes around the model: where the map goes, the data's fingerprint, the seed.

Shared by every way of running the analysis (:func:`~lightning_fisher.analyze` with or without
a Trainer, ``lightning-fisher analyze``), so each behaves the same:

* the map goes to ``output``, else the dataset folder (:func:`map_destination`), checked
  writable before the analysis (:func:`check_writable`);
* a map already there is kept as ``<name>.bak`` by
  :func:`~lightning_fisher.fisher_map.backup.save_keeping_previous` (the same code ``reallocate`` uses);
* a dataset folder is fingerprinted into the map (:func:`dataset_record`);
* the run is seeded without changing the caller's random streams (:func:`seeded_run`).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from lightning_fisher.data.atomic_io import unwritable_reason
from lightning_fisher.errors import DatasetFolderError, FisherMapWriteError
from lightning_fisher.fisher_map.map import DatasetRecord
from lightning_fisher.fisher_map.codec import resolve_map_path
from lightning_fisher.peft_factory.locate import fisher_map_path
from lightning_fisher.data.tensor_folder import dataset_fingerprint, list_sample_files

__all__ = [
    "check_writable", "dataset_record", "map_destination", "seeded_run",
]

# Lightning's seed_everything records the seed here; put back after the run like the generators.
_SEED_ENVIRONMENT = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def map_destination(
    data: Any, dataset_dir: Union[str, os.PathLike, None], output: Union[str, os.PathLike, None]
) -> Optional[Path]:
    """Where the map goes: ``output``, else ``dataset_dir``, else the datamodule's ``dataset_dir``.

    The same rule every reader of the map follows (:func:`~lightning_fisher.peft_factory.fisher_map_path`).
    """
    return fisher_map_path(output, dataset_dir, data)


def check_writable(destination: Path) -> None:
    """Fail before a long analysis, not after it, when the map cannot be written."""
    reason = unwritable_reason(resolve_map_path(destination))
    if reason is not None:
        raise FisherMapWriteError(
            f"{destination}: cannot write the fisher map there ({reason}); pass another output location",
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
