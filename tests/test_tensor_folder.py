"""Dataset folders on real files: listing, loading, validation, atomic writing, fingerprints."""

from __future__ import annotations

import ast
import collections
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lightning_fisher.data.tensor_folder as tensor_folder
from lightning_fisher.errors import DatasetFolderError, LightningFisherError
from lightning_fisher.data.tensor_folder import (
    SAMPLE_SUFFIXES,
    TensorFolderDataset,
    dataset_fingerprint,
    list_sample_files,
    load_sample,
    write_sample_folder,
)


def text_sample(i: int, length: int = 8) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.arange(length, dtype=torch.int64) + i,
        "attention_mask": torch.ones(length, dtype=torch.int64),
        "label": torch.tensor(i % 3),
    }


def assert_same_sample(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


class CustomObject:
    """Pickled into a .pt file to check that weights_only loading refuses it."""

    def __init__(self) -> None:
        self.value = 1


# -- listing -------------------------------------------------------------------------------


def test_list_sample_files_natural_order_and_ignored_files(tmp_path: Path) -> None:
    for name in ["s10.pt", "s2.pt", "s1.safetensors", "a.PT"]:
        (tmp_path / name).write_bytes(b"x")
    for ignored in ["fisher_map.json", ".hidden.pt", ".s3.pt.1234.tmp", "s4.pt.tmp", "notes.txt", "s5.pt~"]:
        (tmp_path / ignored).write_bytes(b"x")
    (tmp_path / "sub.pt").mkdir()  # a folder with a sample-like name
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "s0.pt").write_bytes(b"x")  # not recursive

    names = [path.name for path in list_sample_files(tmp_path)]

    assert names == ["a.PT", "s1.safetensors", "s2.pt", "s10.pt"]
    assert all(path.parent == tmp_path for path in list_sample_files(tmp_path))
    assert SAMPLE_SUFFIXES == (".pt", ".safetensors")


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.mkdir(), p)[1], "holds no sample files"),
        (lambda p: (p.write_text("{}"), p)[1], "is not a folder"),
    ],
    ids=["missing", "empty", "file"],
)
def test_list_sample_files_errors_name_the_folder(tmp_path: Path, make, expected: str) -> None:
    folder = make(tmp_path / "my_data")
    with pytest.raises(DatasetFolderError) as info:
        list_sample_files(folder)
    assert "my_data" in str(info.value)
    assert expected in str(info.value)
    assert info.value.path == folder
    assert isinstance(info.value, LightningFisherError)


def test_folder_with_only_a_map_is_empty(tmp_path: Path) -> None:
    (tmp_path / "fisher_map.json").write_text("{}")
    with pytest.raises(DatasetFolderError, match=r"no sample files.*\.pt or \.safetensors"):
        list_sample_files(tmp_path)


# -- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["pt", "safetensors"])
def test_round_trip_values_equal(tmp_path: Path, format: str) -> None:
    samples = [text_sample(i) for i in range(3)] + [{"x": torch.randn(1, 8, 8), "label": torch.tensor(1.5)}]
    samples[3]["input_ids"] = torch.zeros(8, dtype=torch.int64)
    samples[3]["attention_mask"] = torch.zeros(8, dtype=torch.int64)
    del samples[3]["x"]

    paths = write_sample_folder(tmp_path, samples, format=format)

    assert [p.name for p in paths] == [f"sample_{i:06d}.{format}" for i in range(4)]
    assert list_sample_files(tmp_path) == paths
    for path, sample in zip(paths, samples):
        assert_same_sample(load_sample(path), sample)


def test_mixed_folder_loads_both_formats(tmp_path: Path) -> None:
    write_sample_folder(tmp_path, [text_sample(0), text_sample(1)], format="pt", prefix="a")
    write_sample_folder(tmp_path, [text_sample(2)], format="safetensors", prefix="b")

    dataset = TensorFolderDataset(tmp_path)

    assert [p.name for p in dataset.files] == ["a_000000.pt", "a_000001.pt", "b_000000.safetensors"]
    assert len(dataset) == 3
    for i in range(3):
        assert_same_sample(dataset[i], text_sample(i))
    assert "3 samples (.pt, .safetensors)" in dataset.describe()


def test_python_numbers_become_zero_dim_tensors(tmp_path: Path) -> None:
    torch.save({"x": torch.ones(2), "label": 3, "weight": 0.5}, tmp_path / "s.pt")
    sample = load_sample(tmp_path / "s.pt")
    assert sample["label"].shape == () and sample["label"].dtype == torch.int64 and sample["label"].item() == 3
    assert sample["weight"].dtype == torch.float32 and sample["weight"].item() == 0.5


def test_views_and_grad_tensors_load_as_plain_cpu_tensors(tmp_path: Path) -> None:
    view = torch.arange(6.0).view(2, 3).t()  # non-contiguous
    torch.save({"x": view, "w": torch.ones(2, requires_grad=True)}, tmp_path / "s.pt")
    sample = load_sample(tmp_path / "s.pt")
    assert sample["x"].device.type == "cpu"
    assert torch.equal(sample["x"], view)
    assert not sample["w"].requires_grad


def test_core_does_not_import_lightning() -> None:
    tree = ast.parse(Path(tensor_folder.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert modules and not {m for m in modules if m.split(".")[0] in ("lightning", "pytorch_lightning")}


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("truncated.pt", lambda p: (torch.save(text_sample(0), p), _truncated(p)), r"truncated|corrupt"),
        ("empty.pt", lambda p: p.write_bytes(b""), r"empty or truncated"),
        ("garbage.pt", lambda p: p.write_bytes(b"not a torch file at all"), r"cannot read"),
        ("pickled.pt", lambda p: torch.save({"x": CustomObject()}, p), r"CustomObject.*weights_only=True"),
        ("truncated.safetensors", lambda p: (save_file(text_sample(0), str(p)), _truncated(p)), r"safetensors"),
        ("garbage.safetensors", lambda p: p.write_bytes(b"\x00" * 3), r"safetensors"),
        ("tensor.pt", lambda p: torch.save(torch.ones(3), p), r"holds a Tensor, not a dict"),
        ("emptydict.pt", lambda p: torch.save({}, p), r"empty dict"),
        ("intkeys.pt", lambda p: torch.save({0: torch.ones(1)}, p), r"key 0 .*must be strings"),
        ("nested.pt", lambda p: torch.save({"x": {"y": torch.ones(1)}}, p), r"'x' is a dict.*flat"),
        ("string.pt", lambda p: torch.save({"x": torch.ones(1), "text": "hello"}, p), r"'text' is a str"),
    ],
)
def test_unusable_sample_files_are_named(tmp_path: Path, name: str, make, reason: str) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(DatasetFolderError) as info:
        load_sample(path)
    assert name in str(info.value)
    assert re.search(reason, str(info.value), re.DOTALL), str(info.value)
    assert info.value.path == path


def test_load_sample_missing_or_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(DatasetFolderError, match="gone.pt does not exist"):
        load_sample(tmp_path / "gone.pt")
    (tmp_path / "data.npy").write_bytes(b"x")
    with pytest.raises(DatasetFolderError, match=r"data.npy is not a sample file"):
        load_sample(tmp_path / "data.npy")


# -- dataset validation ---------------------------------------------------------------------


def _inconsistent_folder(folder: Path, format: str) -> Path:
    write_sample_folder(folder, [text_sample(0), text_sample(1)], format=format)
    odd = {"input_ids": torch.zeros(8, dtype=torch.int64), "labels": torch.tensor(0)}
    return write_sample_folder(folder, [odd], format=format, start=2)[0]


def test_keys_validation_reads_every_safetensors_header(tmp_path: Path) -> None:
    odd = _inconsistent_folder(tmp_path, "safetensors")
    with pytest.raises(DatasetFolderError) as info:
        TensorFolderDataset(tmp_path)
    message = str(info.value)
    assert odd.name in message
    assert "missing keys: attention_mask, label" in message
    assert "unexpected keys: labels" in message
    assert info.value.path == odd


def test_keys_validation_does_not_load_every_pt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    odd = _inconsistent_folder(tmp_path, "pt")
    loaded: list[str] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, **kw: (loaded.append(Path(path).name), real_load(path, **kw))[1])

    dataset = TensorFolderDataset(tmp_path)  # only the first .pt is opened at init

    assert loaded == ["sample_000000.pt"]
    assert dataset.keys == ("input_ids", "attention_mask", "label")
    assert_same_sample(dataset[1], text_sample(1))
    with pytest.raises(DatasetFolderError, match=rf"{odd.name}.*missing keys: attention_mask, label"):
        dataset[2]


def test_full_validation_loads_every_pt(tmp_path: Path) -> None:
    odd = _inconsistent_folder(tmp_path, "pt")
    with pytest.raises(DatasetFolderError, match=odd.name):
        TensorFolderDataset(tmp_path, validate="full")


def test_full_validation_checks_dtype_and_dims(tmp_path: Path) -> None:
    write_sample_folder(tmp_path, [text_sample(0), text_sample(1)])
    bad = text_sample(2)
    bad["attention_mask"] = bad["attention_mask"].float()
    bad_path = write_sample_folder(tmp_path, [bad], start=2)[0]

    assert len(TensorFolderDataset(tmp_path, validate="keys")) == 3  # keys agree; dtype not checked
    with pytest.raises(DatasetFolderError, match=rf"{bad_path.name}: key 'attention_mask' is torch.float32"):
        TensorFolderDataset(tmp_path, validate="full")

    bad_path.unlink()
    write_sample_folder(tmp_path, [{**text_sample(2), "label": torch.tensor([2])}], start=2)
    with pytest.raises(DatasetFolderError, match=r"'label' is torch.int64 with 1 dims.*0 dims"):
        TensorFolderDataset(tmp_path, validate="full")


def test_validate_none_only_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_sample_folder(tmp_path, [text_sample(i) for i in range(3)])
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("loaded at init"))
    dataset = TensorFolderDataset(tmp_path, validate="none")
    assert len(dataset) == 3
    assert dataset.dataset_dir == tmp_path


def test_dataset_rejects_unknown_validate_level(tmp_path: Path) -> None:
    write_sample_folder(tmp_path, [text_sample(0)])
    with pytest.raises(ValueError, match="validate must be one of"):
        TensorFolderDataset(tmp_path, validate="all")  # type: ignore[arg-type]


def test_explicit_files_and_subset(tmp_path: Path) -> None:
    write_sample_folder(tmp_path, [text_sample(i) for i in range(5)])
    dataset = TensorFolderDataset(tmp_path, files=["sample_000003.pt", tmp_path / "sample_000001.pt"])
    assert [p.name for p in dataset.files] == ["sample_000003.pt", "sample_000001.pt"]
    assert_same_sample(dataset[0], text_sample(3))

    full = TensorFolderDataset(tmp_path)
    subset = full.subset([4, 0])
    assert subset.files == (full.files[4], full.files[0])
    assert subset.keys == full.keys
    assert_same_sample(subset[0], text_sample(4))
    with pytest.raises(DatasetFolderError, match="no sample files given"):
        full.subset([])


def test_dataset_works_with_a_plain_dataloader(tmp_path: Path) -> None:
    write_sample_folder(tmp_path, [text_sample(i) for i in range(5)], format="safetensors")
    batches = list(torch.utils.data.DataLoader(TensorFolderDataset(tmp_path), batch_size=2))
    assert [b["input_ids"].shape for b in batches] == [(2, 8), (2, 8), (1, 8)]
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.tensor([0, 1, 2, 0, 1]))


# -- writing -------------------------------------------------------------------------------


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    write_sample_folder(tmp_path, [text_sample(0)])
    with pytest.raises(DatasetFolderError, match=r"sample_000000.pt already exists.*overwrite=True"):
        write_sample_folder(tmp_path, [text_sample(1)])
    assert_same_sample(load_sample(tmp_path / "sample_000000.pt"), text_sample(0))

    write_sample_folder(tmp_path, [text_sample(1)], overwrite=True)
    assert_same_sample(load_sample(tmp_path / "sample_000000.pt"), text_sample(1))


@pytest.mark.parametrize("format", ["pt", "safetensors"])
def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, format: str) -> None:
    def write_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    def bytes_then_fail(tensors, metadata=None):
        raise KeyboardInterrupt  # interrupted mid-serialisation

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    monkeypatch.setattr(tensor_folder, "_safetensors_bytes", bytes_then_fail)
    out = tmp_path / "out"
    expected = DatasetFolderError if format == "pt" else KeyboardInterrupt

    with pytest.raises(expected) as info:
        write_sample_folder(out, [text_sample(0)], format=format)

    assert os.listdir(out) == []  # neither a sample file nor a temporary file is left
    if format == "pt":
        assert "sample_000000.pt" in str(info.value) and "disk full" in str(info.value)


def test_write_stops_midway_keeping_complete_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save
    calls = []

    def fail_on_third(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"partial")
            raise RuntimeError("interrupted")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fail_on_third)
    with pytest.raises(DatasetFolderError, match="sample_000002.pt"):
        write_sample_folder(tmp_path, (text_sample(i) for i in range(5)))
    assert sorted(os.listdir(tmp_path)) == ["sample_000000.pt", "sample_000001.pt"]
    assert_same_sample(load_sample(tmp_path / "sample_000001.pt"), text_sample(1))


@pytest.mark.parametrize("format", ["pt", "safetensors"])
def test_write_does_not_carry_the_batch_storage(tmp_path: Path, format: str) -> None:
    batch = torch.randn(64, 1000)
    samples = ({"x": row, "xt": batch[:2, i::100]} for i, row in enumerate(batch[:2]))  # views of the batch
    paths = write_sample_folder(tmp_path, samples, format=format)
    for i, path in enumerate(paths):
        assert path.stat().st_size < 10_000  # a row is 4 KB; the batch is 256 KB
        sample = load_sample(path)
        assert torch.equal(sample["x"], batch[i])
        assert torch.equal(sample["xt"], batch[:2, i::100])


def test_write_names_prefix_start_and_numbers(tmp_path: Path) -> None:
    paths = write_sample_folder(tmp_path / "new" / "deep", [{"label": 1}, {"label": 2.0}], prefix="val", start=41)
    assert [p.name for p in paths] == ["val_000041.pt", "val_000042.pt"]
    assert load_sample(paths[0])["label"].item() == 1
    with pytest.raises(ValueError, match="format"):
        write_sample_folder(tmp_path, [{"label": 1}], format="npz")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix"):
        write_sample_folder(tmp_path, [{"label": 1}], prefix="../x")
    with pytest.raises(ValueError, match="start"):
        write_sample_folder(tmp_path, [{"label": 1}], start=-1)
    with pytest.raises(DatasetFolderError, match=r"sample 0 .*'text' is a str"):
        write_sample_folder(tmp_path / "other", [{"text": "hello"}])
    with pytest.raises(DatasetFolderError, match=r"sample 0 .*'mask' is an OrderedDict;"):
        write_sample_folder(tmp_path / "other", [{"mask": collections.OrderedDict(a=torch.ones(1))}])


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_sample_folder(tmp_path, [text_sample(0)])[0]
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# -- fingerprint -------------------------------------------------------------------------


def test_fingerprint_names_and_sizes(tmp_path: Path) -> None:
    write_sample_folder(tmp_path, [text_sample(i) for i in range(3)])
    first = dataset_fingerprint(tmp_path)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first)

    (tmp_path / "fisher_map.json").write_text("{}")
    assert dataset_fingerprint(tmp_path) == first  # non-sample files do not count

    content = dataset_fingerprint(tmp_path, content=True)
    assert content != first
    # Same name and size, different bytes: only the content fingerprint notices.
    path = tmp_path / "sample_000001.pt"
    data = bytearray(path.read_bytes())
    data[-30] ^= 0xFF
    path.write_bytes(bytes(data))
    assert dataset_fingerprint(tmp_path) == first
    assert dataset_fingerprint(tmp_path, content=True) != content

    write_sample_folder(tmp_path, [text_sample(3)], start=3)
    assert dataset_fingerprint(tmp_path) != first

    with pytest.raises(DatasetFolderError, match="missing_dir"):
        dataset_fingerprint(tmp_path / "missing_dir")
