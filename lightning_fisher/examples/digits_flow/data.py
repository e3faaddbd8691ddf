"""The digits data: scikit-learn's 8x8 digits in two halves, written as dataset folders.

Data: ``sklearn.datasets.load_digits()`` (1,797 real 8x8 handwritten digits from the UCI
"Optical Recognition of Handwritten Digits" data set, Alpaydin and Kaynak 1998), pixel values
0..16 scaled to ``[-1, 1]``. The ``low`` half (digits 0-4) is for pretraining, the ``high``
half (digits 5-9) for adaptation; each half has a fixed 80/20 train/test split.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import torch

from lightning_fisher.data.atomic_io import write_text_atomic
from lightning_fisher.errors import DatasetFolderError

__all__ = ["DigitsHalf", "digits_split", "write_digits_dataset"]

HALF_DIGITS = {"low": (0, 1, 2, 3, 4), "high": (5, 6, 7, 8, 9)}
TEST_FRACTION = 0.2
SPLIT_SEED = 0
MANIFEST_NAME = "digits.json"
SAMPLE_PREFIX = "digit"


@dataclass(frozen=True)
class DigitsHalf:
    """One half of the digits, split into train and test.

    Attributes:
        train_images: float32 ``[N, 1, 8, 8]`` in ``[-1, 1]``.
        train_labels: int64 ``[N]``, the digit.
        test_images: float32 ``[M, 1, 8, 8]``.
        test_labels: int64 ``[M]``.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def split(self, split: Literal["train", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of one split."""
        if split == "train":
            return self.train_images, self.train_labels
        if split == "test":
            return self.test_images, self.test_labels
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def digits_split(half: Literal["low", "high"]) -> DigitsHalf:
    """The digits of one half, with a fixed 80/20 train/test split.

    ``"low"`` holds digits 0-4 (pretraining), ``"high"`` digits 5-9 (adaptation). Within a
    half the split is a fixed permutation (seed 0), the same on every machine.

    Args:
        half: ``"low"`` or ``"high"``.
    """
    if half not in HALF_DIGITS:
        raise ValueError(f"half must be 'low' or 'high', got {half!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("digits_split needs scikit-learn: pip install 'lightning-fisher[examples]'") from error
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 8.0 - 1.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    keep = torch.isin(labels, torch.tensor(HALF_DIGITS[half]))
    images, labels = images[keep].unsqueeze(1), labels[keep]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(TEST_FRACTION * len(labels))
    test, train = order[:n_test], order[n_test:]
    return DigitsHalf(images[train], labels[train], images[test], labels[test])


def write_digits_dataset(
    out_dir: Union[str, Path], half: Literal["low", "high"], split: Literal["train", "test"]
) -> Path:
    """Write one split of one half as a dataset folder: ``{"x": float32[1, 8, 8], "label": int64}`` per file.

    Files are written with :func:`lightning_fisher.data.tensor_folder.write_sample_folder`, then a
    ``digits.json`` manifest; a folder that already holds the same complete split is left as is.

    Args:
        out_dir: folder to write (created if missing).
        half: ``"low"`` (digits 0-4) or ``"high"`` (digits 5-9).
        split: ``"train"`` or ``"test"``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        DatasetFolderError: ``out_dir`` holds sample files this function did not write.
    """
    from lightning_fisher.data.tensor_folder import write_sample_folder

    out = Path(out_dir)
    images, labels = digits_split(half).split(split)
    settings = {"half": half, "split": split, "num_samples": len(labels), "version": 1}
    ours, foreign = [], []
    if out.is_dir():
        for path in sorted(out.iterdir()):
            if not path.name.startswith(".") and path.suffix.lower() in (".pt", ".safetensors"):
                (ours if re.fullmatch(rf"{SAMPLE_PREFIX}_\d+\.pt", path.name) else foreign).append(path)
    manifest_path = out / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if foreign or (ours and manifest is None):
        raise DatasetFolderError(
            f"{out} already holds sample files that write_digits_dataset did not write "
            f"(e.g. {(foreign or ours)[0].name}); choose an empty folder or remove them.",
            path=out,
        )
    if manifest == settings and len(ours) == len(labels):
        return out
    manifest_path.unlink(missing_ok=True)
    for path in ours:
        path.unlink()
    write_sample_folder(
        out,
        ({"x": images[i], "label": labels[i]} for i in range(len(labels))),
        format="pt",
        prefix=SAMPLE_PREFIX,
        overwrite=True,
    )
    write_text_atomic(manifest_path, json.dumps(settings, indent=2) + "\n")
    return out
