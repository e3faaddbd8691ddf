"""Lightning adapter for dataset folders (see :mod:`lightning_fisher.data.tensor_folder`).

The analysis writes ``fisher_map.json`` into the training folder, and adaptive training finds it
there through this datamodule's :attr:`TensorDirectoryDataModule.dataset_dir`::

    # config.yaml for LightningCLI
    data:
      class_path: lightning_fisher.training.datamodule.TensorDirectoryDataModule
      init_args:
        dataset_dir: data/train
        batch_size: 32
        val_fraction: 0.1
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_fisher.errors import DatasetFolderError
from lightning_fisher.data.tensor_folder import TensorFolderDataset, list_sample_files

__all__ = ["TensorDirectoryDataModule"]


class TensorDirectoryDataModule(pl.LightningDataModule):
    """Train (and optionally validate and test) on dataset folders of ``.pt``/``.safetensors`` samples.

    Batches are dicts of stacked tensors, keyed like the sample files, e.g.
    ``{"input_ids": int64[B, 128], "attention_mask": int64[B, 128], "label": int64[B]}``.

    Args:
        dataset_dir: the training dataset folder. This is also where the Fisher analysis writes
            ``fisher_map.json`` and where adaptive training looks for it.
        batch_size: samples per batch, for every loader.
        val_dir: a separate validation dataset folder.
        test_dir: a test dataset folder; without it there is no test loader.
        val_fraction: without ``val_dir``, hold out this fraction of the training files
            (at least one file when > 0) for validation. The split is a random permutation of
            the files drawn from ``seed``, so it is the same on every run as long as the folder
            holds the same files. ``0`` means no validation.
        num_workers: ``DataLoader`` worker processes (``0`` loads in the main process).
        shuffle: shuffle the training samples. The order is drawn from a ``torch.Generator``
            seeded with ``seed``: the same seed gives the same order on every run, while
            successive epochs still differ from one another.
        seed: seed of the validation split and of the training order. Under DDP, Lightning
            replaces the sampler with a ``DistributedSampler`` whose order follows
            ``seed_everything`` instead.
        shuffle_seed: seed of the training order alone, when it should vary while the
            validation split stays put (e.g. one run per seed); default ``seed``.
        drop_last: drop the last, incomplete training batch.
        validate: how much to check when the datasets are built: ``"none"``, ``"keys"`` (key
            sets of every ``.safetensors`` header and of the first ``.pt`` file) or ``"full"``
            (load every file; keys, dtypes and dimensions must agree). Every sample's keys are
            checked as it is loaded, whatever this says.

    Raises:
        ValueError: an argument is out of range (the message names it).
        DatasetFolderError: ``dataset_dir``, ``val_dir`` or ``test_dir`` does not exist or is not a folder.
    """

    def __init__(
        self,
        dataset_dir: Union[str, Path],
        *,
        batch_size: int = 16,
        val_dir: Optional[Union[str, Path]] = None,
        test_dir: Optional[Union[str, Path]] = None,
        val_fraction: float = 0.0,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_seed: Optional[int] = None,
        drop_last: bool = False,
        validate: Literal["none", "keys", "full"] = "keys",
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("num_workers", num_workers, minimum=0)
        _check_int("seed", seed)
        if shuffle_seed is not None:
            _check_int("shuffle_seed", shuffle_seed)
        is_number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
        if not is_number or not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        if val_dir is not None and val_fraction > 0:
            raise ValueError(
                f"val_dir ({val_dir}) and val_fraction ({val_fraction}) both choose the validation data; give only one"
            )
        if validate not in ("none", "keys", "full"):
            raise ValueError(f"validate must be 'none', 'keys' or 'full', got {validate!r}")
        self.save_hyperparameters()

        self.dataset_dir = _existing_folder("dataset_dir", dataset_dir)
        self.val_dir = _existing_folder("val_dir", val_dir) if val_dir is not None else None
        self.test_dir = _existing_folder("test_dir", test_dir) if test_dir is not None else None
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_seed = shuffle_seed
        self.drop_last = drop_last
        self.validate = validate

        self.train_dataset: Optional[TensorFolderDataset] = None
        self.val_dataset: Optional[TensorFolderDataset] = None
        self.test_dataset: Optional[TensorFolderDataset] = None

    # -- datasets --------------------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the datasets the stage needs (once; later calls reuse them).

        ``"fit"`` and ``"validate"`` build the training and validation datasets, ``"test"`` the
        test dataset, ``None`` all of them.
        """
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            full = TensorFolderDataset(self.dataset_dir, validate=self.validate)
            if self.val_dir is not None:
                self.train_dataset = full
                self.val_dataset = TensorFolderDataset(self.val_dir, validate=self.validate)
            elif self.val_fraction > 0:
                train_indices, val_indices = self._split_indices(len(full))
                self.train_dataset = full.subset(train_indices)
                self.val_dataset = full.subset(val_indices)
            else:
                self.train_dataset = full
        if stage in (None, "test") and self.test_dir is not None and self.test_dataset is None:
            self.test_dataset = TensorFolderDataset(self.test_dir, validate=self.validate)

    def _validation_count(self, total: int) -> int:
        if self.val_dir is not None or self.val_fraction == 0:
            return 0
        count = max(1, math.floor(self.val_fraction * total + 0.5))
        if count >= total:
            raise DatasetFolderError(
                f"dataset folder {self.dataset_dir} has {total} sample file(s): too few to hold out "
                f"val_fraction={self.val_fraction} and still train; add samples, lower val_fraction or give val_dir",
                path=self.dataset_dir,
            )
        return count

    def _split_indices(self, total: int) -> tuple[list[int], list[int]]:
        count = self._validation_count(total)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed)).tolist()
        # Each side keeps folder order, so loaders and logs read naturally.
        return sorted(order[count:]), sorted(order[:count])

    @property
    def num_samples(self) -> int:
        """Number of training samples (after the validation split); lists the folder if not set up."""
        if self.train_dataset is not None:
            return len(self.train_dataset)
        total = len(list_sample_files(self.dataset_dir))
        return total - self._validation_count(total)

    def describe(self) -> str:
        """One line for logs, e.g. ``612 samples (.pt) in /data/train; keys: input_ids, attention_mask, label``.

        Describes the whole training folder, then the validation data if any.
        """
        full = TensorFolderDataset(self.dataset_dir, validate="none")
        text = full.describe()
        if self.val_dir is not None:
            text += f"; validation: {len(list_sample_files(self.val_dir))} samples in {self.val_dir}"
        elif self.val_fraction > 0:
            text += (
                f"; validation: {self._validation_count(len(full))} of them held out "
                f"(val_fraction={self.val_fraction}, seed={self.seed})"
            )
        return text

    # -- loaders ---------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Training batches, shuffled from ``shuffle_seed`` (default ``seed``) when ``shuffle`` is true."""
        dataset = self._require("train_dataset", "fit")
        # A fresh generator per call: the same seed gives the same order on every run.
        generator = torch.Generator().manual_seed(self.seed if self.shuffle_seed is None else self.shuffle_seed)
        return self._loader(dataset, shuffle=self.shuffle, drop_last=self.drop_last, generator=generator)

    def val_dataloader(self) -> Union[DataLoader, list]:
        """Validation batches in file order, or an empty list (no validation) without val data."""
        if self.val_dataset is None and self.train_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, shuffle=False, drop_last=False, generator=None)

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order.

        Raises:
            ValueError: the datamodule was built without ``test_dir``.
        """
        if self.test_dir is None:
            raise ValueError("no test data: pass test_dir to TensorDirectoryDataModule to run trainer.test")
        return self._loader(self._require("test_dataset", "test"), shuffle=False, drop_last=False, generator=None)

    def _require(self, attribute: str, stage: str) -> TensorFolderDataset:
        if getattr(self, attribute) is None:
            self.setup(stage)
        return getattr(self, attribute)

    def _loader(
        self, dataset: TensorFolderDataset, *, shuffle: bool, drop_last: bool, generator: Optional[torch.Generator]
    ) -> DataLoader:
        return DataLoader(
            _WithFileNames(dataset),
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
            collate_fn=_collate_samples,
        )


# -- batching ------------------------------------------------------------------------------
# Module-level (not methods) so that DataLoader workers can pickle them without the datamodule.


class _WithFileNames(Dataset):
    """Pairs each sample with its file, so a batching error can name the files involved."""

    def __init__(self, dataset: TensorFolderDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str, dict[str, torch.Tensor]]:
        return str(self.dataset.files[index]), self.dataset[index]


def _collate_samples(items: Sequence[tuple[str, dict[str, torch.Tensor]]]) -> dict[str, Any]:
    """Stack ``(file, sample)`` pairs into one batch dict; name the files when shapes differ."""
    files = [file for file, _ in items]
    samples = [sample for _, sample in items]
    try:
        return default_collate(samples)
    except RuntimeError as error:
        for key in samples[0]:
            first_shape = tuple(samples[0][key].shape)
            for file, sample in zip(files[1:], samples[1:]):
                shape = tuple(sample[key].shape)
                if shape != first_shape:
                    raise DatasetFolderError(
                        f"cannot batch key {key!r}: {files[0]} has shape {first_shape} but {file} has shape {shape}. "
                        "Samples in one batch must have equal shapes: pad or truncate to a fixed length in your "
                        "preprocessing (e.g. padding='max_length'), or use batch_size=1",
                        path=file,
                    ) from error
        raise


def _check_int(name: str, value: object, *, minimum: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")


def _existing_folder(name: str, folder: Union[str, Path]) -> Path:
    path = Path(folder)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise DatasetFolderError(
            f"{name} {path} {what}; it should be a dataset folder with one .pt or .safetensors file per sample "
            "(run your preprocessing first)",
            path=path,
        )
    return path
