"""undo_on_failure removes what the failed block added, never what was there before."""

from __future__ import annotations

import errno

import pytest

from moekit.utils.cleanup import undo_on_failure


def test_removes_a_created_folder_and_its_parents(tmp_path):
    with pytest.raises(RuntimeError), undo_on_failure(tmp_path / "a" / "b" / "run") as run:
        run.mkdir(parents=True)
        (run / "train.jsonl").write_text("{}")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_keeps_what_existed_and_what_keep_accepts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "mine.txt").write_text("user data")
    with pytest.raises(ValueError), undo_on_failure(run, keep=lambda p: p.name == "checkpoint"):
        (run / "checkpoint").mkdir()
        (run / ".checkpoint-x1").mkdir()  # a temporary: always removed
        (run / "half.parquet").write_text("x")
        raise ValueError("late failure")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "mine.txt"]


def test_success_keeps_everything_and_oserror_gets_the_folder(tmp_path):
    with undo_on_failure(tmp_path / "run") as run:
        run.mkdir()
    assert run.is_dir()
    with pytest.raises(OSError) as info, undo_on_failure(tmp_path / "other"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(tmp_path / "other")


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    """mkstemp's temporary file is owner-only; the written file must not be (tokenizer, logs, cache)."""
    import os

    from moekit.utils.io import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644
