"""Fixed train / validation / test folders for both tasks, and an in-memory datamodule over them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

from lightning_fisher.data.atomic_io import write_text_atomic

from quality_bench.protocol import SPLIT_SEED, TaskSpec


def link_subset(files: Iterable[Path], folder: Path) -> Path:
    """Fill ``folder`` with hard links (copies where linking fails) to ``files``; idempotent."""
    files = list(files)
    manifest = folder / "subset.json"
    wanted = sorted(str(f.resolve()) for f in files)
    if manifest.is_file() and json.loads(manifest.read_text())["files"] == wanted:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    for source in files:
        target = folder / source.name
        try:
            os.link(source, target)
        except OSError:
            target.write_bytes(source.read_bytes())
    write_text_atomic(manifest, json.dumps({"files": wanted}, indent=1))
    return folder


def split_folder(source: Path, train: Path, val: Path, val_count: int) -> tuple[Path, Path]:
    """Split a sample folder into fixed train / validation folders (permutation seeded by ``SPLIT_SEED``).

    Not ``TensorDirectoryDataModule(val_fraction=...)``: its one ``seed`` draws both the split
    and the training order, so the validation set would change with the run seed.
    """
    from lightning_fisher.data.tensor_folder import list_sample_files

    files = list_sample_files(source)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    val_files = [files[i] for i in sorted(order[:val_count])]
    train_files = [files[i] for i in sorted(order[val_count:])]
    return link_subset(train_files, train), link_subset(val_files, val)


def folder_labels(folder: Path) -> list[int]:
    from lightning_fisher.data.tensor_folder import TensorFolderDataset

    dataset = TensorFolderDataset(folder)
    return [int(dataset[i]["label"]) for i in range(len(dataset))]


def prepare_reviews(workdir: Path) -> dict[str, Path]:
    """Tokenized folders: 480 train / 120 validation (from the 600 train reviews), all 600, and the 379 test reviews."""
    from lightning_fisher.examples.drug_reviews import write_condition_dataset

    full = write_condition_dataset(workdir / "train600", split="train", max_length=128)
    test = write_condition_dataset(workdir / "test", split="test", max_length=128)
    train, val = split_folder(full, workdir / "train480", workdir / "val120", val_count=120)
    return {"train": train, "val": val, "test": test, "train_and_val": full}


def prepare_digits(workdir: Path) -> dict[str, Path]:
    """Digits 5-9 folders (train split 80/20 into train / validation, test) and the 0-4 checkpoint."""
    from lightning_fisher.examples.digits_flow import prepare_digits_example
    from lightning_fisher.data.tensor_folder import list_sample_files

    full, test, checkpoint = prepare_digits_example(workdir)
    count = max(1, math.floor(0.2 * len(list_sample_files(full)) + 0.5))
    train, val = split_folder(full, workdir / "train_fit", workdir / "val", val_count=count)
    return {"train": train, "val": val, "test": test, "checkpoint": checkpoint}



class Preloaded(torch.utils.data.Dataset):
    """A sample folder held in memory: what the datamodule's loaders need (``files``, items) without disk reads."""

    def __init__(self, dataset) -> None:
        self.files = dataset.files
        self.samples = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]


def datamodule(task: TaskSpec, folders: dict[str, Path], seed: int, *, with_eval: bool = True):
    """The library's datamodule over the fixed folders, with the samples read once.

    Reading every ``.pt`` file again each epoch cost about half of a digits run (574 files,
    1.2 s per epoch); the folders are small, so they are kept in memory. Order, batching and
    seeding are the datamodule's own (``seed`` orders the training samples).
    """
    from lightning_fisher.training.datamodule import TensorDirectoryDataModule

    class InMemory(TensorDirectoryDataModule):
        def setup(self, stage: Optional[str] = None) -> None:
            super().setup(stage)
            for attribute in ("train_dataset", "val_dataset", "test_dataset"):
                dataset = getattr(self, attribute)
                if dataset is not None and not isinstance(dataset, Preloaded):
                    setattr(self, attribute, Preloaded(dataset))

    evaluation = dict(val_dir=folders["val"], test_dir=folders["test"]) if with_eval else {}
    return InMemory(folders["train"], batch_size=task.batch_size, seed=seed, **evaluation)
