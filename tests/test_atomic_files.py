"""atomic_files, the one way files are published: a reader of the name sees the old file or the new one; a write
that fails leaves the old file and no temporary; on an fsspec file system it is one upload."""

from __future__ import annotations

import fsspec
import pytest

from ipadapter_jax.atomic_files import atomic_path, write_atomic


def test_the_name_appears_only_when_the_write_is_done(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        assert not target.exists() and tmp.parent == target.parent  # beside it: one rename, same file system
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "file.json"
    write_atomic(target, "old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise OSError(28, "disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]


def test_on_an_fsspec_file_system_it_is_one_upload():
    fs = fsspec.filesystem("memory")
    write_atomic("/atomic_files_test/a.txt", "text", fs)
    assert fs.cat_file("/atomic_files_test/a.txt") == b"text"
    assert fs.ls("/atomic_files_test", detail=False) == ["/atomic_files_test/a.txt"]
