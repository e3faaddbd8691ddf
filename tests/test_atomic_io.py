"""``write_text_atomic``: the old file survives a failed write, and no temporary file is left."""

import os
from pathlib import Path

import pytest

from lightning_fisher.atomic_io import write_text_atomic


def test_writes_text_readable_by_others(tmp_path: Path) -> None:
    target = write_text_atomic(tmp_path / "sub" / "a.json", "{}\n", make_parents=True)
    assert target.read_text(encoding="utf-8") == "{}\n"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_missing_folder_is_an_error_without_make_parents(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "missing" / "a.json", "x")
    assert not (tmp_path / "missing").exists()


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "map.json"
    target.write_text("old", encoding="utf-8")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, "new")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["map.json"]
