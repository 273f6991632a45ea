"""Atomic writes: a failed write leaves what was there, and leaves no temporary file behind."""

from __future__ import annotations

import os
import stat

import pytest

from peft_cpl.tuner.atomic import atomic_path, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = write_text(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        temp.write_text("half-written")
        raise RuntimeError("failure while writing")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_new_files_get_the_usual_permissions_and_replaced_ones_keep_theirs(tmp_path):
    mask = os.umask(0o022)
    try:
        fresh = write_text(tmp_path / "sub" / "fresh.txt", "x")  # parent folders are created
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0600
        os.chmod(fresh, 0o640)
        write_text(fresh, "y")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    finally:
        os.umask(mask)
