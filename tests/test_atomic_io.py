"""Atomic writes: the content lands whole, the old file survives a failed write, no temporary is left."""

import os
from pathlib import Path

import pytest

import lightning_fisher.data.atomic_io as atomic_io
from lightning_fisher.data.atomic_io import (
    atomic_writer,
    folders_to_create,
    unwritable_reason,
    write_bytes_atomic,
    write_text_atomic,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_writes_text_readable_by_others(tmp_path: Path, umask_022) -> None:
    target = write_text_atomic(tmp_path / "sub" / "a.json", "{}\n", make_parents=True)
    assert target.read_text(encoding="utf-8") == "{}\n"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_text_is_utf8_with_newlines_unchanged(tmp_path: Path) -> None:
    target = write_text_atomic(tmp_path / "a.txt", "ü\nend")
    assert target.read_bytes() == "ü\nend".encode("utf-8")


def test_permissions_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        private = write_bytes_atomic(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
    assert private.stat().st_mode & 0o777 == 0o600


def test_bytes_content_replaces_the_old_file(tmp_path: Path, umask_022) -> None:
    target = tmp_path / "image.png"
    target.write_bytes(b"old")
    data = bytes(range(256)) * 10
    written = write_bytes_atomic(str(target), data)
    assert written == target and isinstance(written, Path)
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]


def test_streaming_writer_content_and_parents(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "model.pt"
    with atomic_writer(target, make_parents=True) as handle:
        handle.write(b"part one, ")
        handle.write(b"part two")
    assert target.read_bytes() == b"part one, part two"
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"]


def test_missing_folder_is_an_error_without_make_parents(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "missing" / "a.json", "x")
    with pytest.raises(FileNotFoundError):
        write_bytes_atomic(tmp_path / "missing" / "a.bin", b"x")
    assert not (tmp_path / "missing").exists()


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "map.json"
    target.write_text("old", encoding="utf-8")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, "new")
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(target, b"new")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["map.json"]


def test_error_inside_the_block_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="serialisation failed"):
        with atomic_writer(target) as handle:
            handle.write(b"half a checkpoint")
            raise RuntimeError("serialisation failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_disk_full_while_syncing_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_file_then_folder_are_synced(tmp_path: Path, monkeypatch) -> None:
    synced = []
    real_fsync = os.fsync

    def recording(descriptor):
        synced.append(os.path.isdir(f"/proc/self/fd/{descriptor}") if os.path.exists("/proc/self/fd") else None)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording)
    write_text_atomic(tmp_path / "a.txt", "a")
    write_bytes_atomic(tmp_path / "b.bin", b"b")
    if os.name == "nt":
        assert len(synced) == 2
    else:
        assert len(synced) == 4
        if synced[0] is not None:
            assert synced == [False, True, False, True]  # the file before the rename, the folder after


def test_folder_sync_unsupported_by_the_file_system_is_not_an_error(tmp_path: Path, monkeypatch) -> None:
    real_fsync = os.fsync

    def no_folder_sync(descriptor):
        if os.path.isdir(f"/proc/self/fd/{descriptor}"):
            raise OSError(22, "Invalid argument")
        real_fsync(descriptor)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to tell a folder descriptor from a file one")
    monkeypatch.setattr(atomic_io.os, "fsync", no_folder_sync)
    assert write_bytes_atomic(tmp_path / "a.bin", b"a").read_bytes() == b"a"


def test_folders_to_create_and_unwritable_reason(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert folders_to_create("a/b/m.json") == [Path("a"), Path("a/b")]  # as spelled, outermost first
    assert folders_to_create("m.json") == [] and unwritable_reason("a/b/m.json") is None
    (tmp_path / "a_file").write_text("")
    assert unwritable_reason("a_file/x/m.json") == f"{tmp_path / 'a_file'} is not a folder"
    (tmp_path / "a_dir").mkdir()
    assert unwritable_reason("a_dir") == "a_dir is a folder"


def test_windows_skips_the_folder_sync(tmp_path: Path, monkeypatch) -> None:
    # found by mutation testing: no test ran the Windows branch, so its os.name test could be anything
    from lightning_fisher.data import atomic_io

    def no_folder_handles(*args, **kwargs):
        raise AssertionError("a folder was opened")

    monkeypatch.setattr(atomic_io.os, "name", "nt")
    monkeypatch.setattr(atomic_io.os, "open", no_folder_handles)
    assert atomic_io._fsync_folder(tmp_path) is None


def test_folders_to_create_lists_only_the_missing_ones_outermost_first(tmp_path, monkeypatch):
    from lightning_fisher.data.atomic_io import folders_to_create

    assert folders_to_create(tmp_path / "map.json") == []  # the folder exists: nothing to create, no ancestors
    assert folders_to_create(tmp_path / "a" / "b" / "map.json") == [tmp_path / "a", tmp_path / "a" / "b"]
    monkeypatch.chdir(tmp_path)
    assert folders_to_create("map.json") == []
    assert folders_to_create("c/map.json") == [Path("c")]  # spelled as given


def test_a_folder_without_write_and_search_permission_is_refused(tmp_path, monkeypatch):
    from lightning_fisher.data.atomic_io import unwritable_reason

    # as root every folder is writable, so the permission check is faked: write and search both needed
    monkeypatch.setattr(os, "access", lambda path, mode: mode & (os.W_OK | os.X_OK) != (os.W_OK | os.X_OK))
    assert unwritable_reason(tmp_path / "map.json") == f"{tmp_path} is not a writable folder"
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    assert unwritable_reason(tmp_path / "map.json") is None


# --- found when the mutation tool learned to mutate decorated functions (atomic_writer) ---------


def test_the_streaming_writer_needs_make_parents_for_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with atomic_writer(tmp_path / "missing" / "model.pt") as handle:
            handle.write(b"x")
    assert not (tmp_path / "missing").exists()


def test_make_parents_with_the_folder_already_there(tmp_path: Path) -> None:
    (tmp_path / "there").mkdir()
    with atomic_writer(tmp_path / "there" / "model.pt", make_parents=True) as handle:
        handle.write(b"x")
    assert (tmp_path / "there" / "model.pt").read_bytes() == b"x"


def test_the_temporary_is_a_hidden_sibling_with_a_random_12_digit_name(tmp_path: Path) -> None:
    with atomic_writer(tmp_path / "model.pt") as handle:
        (temporary,) = tmp_path.iterdir()
        handle.write(b"x")
    stem, random, suffix = temporary.name.rsplit(".", 2)
    assert (stem, suffix, len(random)) == (".model.pt", "tmp", 12) and int(random, 16) >= 0


def test_an_existing_temporary_is_never_overwritten(tmp_path: Path, monkeypatch) -> None:
    class FixedUUID:
        hex = "0123456789ab" + "c" * 20

    monkeypatch.setattr(atomic_io.uuid, "uuid4", lambda: FixedUUID())
    clash = tmp_path / ".model.pt.0123456789ab.tmp"
    clash.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):  # O_EXCL: the name is taken, nothing is written into it
        with atomic_writer(tmp_path / "model.pt") as handle:
            handle.write(b"x")
    assert clash.read_bytes() == b"someone else's" and not (tmp_path / "model.pt").exists()


def test_the_binary_flag_is_asked_where_the_platform_has_one(tmp_path: Path, monkeypatch) -> None:
    flags = []
    real_open = os.open
    monkeypatch.setattr(atomic_io.os, "O_BINARY", 0o100000, raising=False)  # Windows' flag; O_LARGEFILE here
    monkeypatch.setattr(atomic_io.os, "open", lambda path, flag, mode=0o777: flags.append(flag) or real_open(path, flag, mode))
    write_bytes_atomic(tmp_path / "model.pt", b"x")
    assert flags and flags[0] == os.O_WRONLY | os.O_CREAT | os.O_EXCL | 0o100000


def test_a_temporary_already_gone_does_not_hide_the_blocks_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="the block's own error"):
        with atomic_writer(tmp_path / "model.pt"):
            for temporary in tmp_path.iterdir():
                temporary.unlink()
            raise RuntimeError("the block's own error")
    assert list(tmp_path.iterdir()) == []
