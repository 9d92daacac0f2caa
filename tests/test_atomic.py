"""Atomic writes: all-or-nothing, and the same permissions as a plain write."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from redi.common.atomic import atomic_open, atomic_write_bytes, atomic_write_with


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_files_get_umask_permissions(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "a", b"x")
    atomic_write_with(tmp_path / "b", lambda tmp: tmp.write_bytes(b"x"))
    want = os.stat(plain).st_mode & 0o777
    assert os.stat(tmp_path / "a").st_mode & 0o777 == want
    assert os.stat(tmp_path / "b").st_mode & 0o777 == want
