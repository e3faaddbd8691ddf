"""The digits data: two disjoint halves with fixed splits, written as dataset folders."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_fisher.examples.digits_flow import digits_split, write_digits_dataset
from lightning_fisher.data.tensor_folder import TensorFolderDataset, list_sample_files

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def low():
    return digits_split("low")


def test_halves_are_disjoint_deterministic_and_scaled(low):
    high = digits_split("high")
    assert set(low.train_labels.tolist()) | set(low.test_labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(high.train_labels.tolist()) | set(high.test_labels.tolist()) == {5, 6, 7, 8, 9}
    total = sum(len(h.train_labels) + len(h.test_labels) for h in (low, high))
    assert total == 1797
    assert len(low.test_labels) == round(0.2 * (len(low.train_labels) + len(low.test_labels)))
    assert low.train_images.shape[1:] == (1, 8, 8) and low.train_images.dtype == torch.float32
    assert float(low.train_images.min()) == -1.0 and float(low.train_images.max()) == 1.0
    again = digits_split("low")
    assert torch.equal(again.test_images, low.test_images)
    with pytest.raises(ValueError, match="half"):
        digits_split("middle")


def test_written_dataset_folder(tmp_path, low):
    out = write_digits_dataset(tmp_path / "low_test", "low", "test")
    files = list_sample_files(out)
    assert len(files) == len(low.test_labels)
    sample = TensorFolderDataset(out)[3]
    assert set(sample) == {"x", "label"}
    assert sample["x"].dtype == torch.float32 and sample["x"].shape == (1, 8, 8)
    assert sample["label"].dtype == torch.int64 and sample["label"].dim() == 0
    assert torch.equal(sample["x"], low.test_images[3]) and int(sample["label"]) == int(low.test_labels[3])
    stamps = [os.stat(f).st_mtime_ns for f in files]
    write_digits_dataset(out, "low", "test")
    assert [os.stat(f).st_mtime_ns for f in files] == stamps
