"""Local copies of parts sent straight into a staged object (chunksvc.storage.spill): written
whole or not at all, room kept on their file system, and swept once stale, directories too."""

from __future__ import annotations

import io
import os
import time

import pytest

from chunksvc.errors import IncompleteBody
from chunksvc.storage.spill import Spill


def test_a_copy_is_there_whole_or_not_at_all(tmp_path):
    spill = Spill(tmp_path / "spill")
    spill.write("parts/s/piece-00001", io.BytesIO(b"x" * 10_000), 10_000, 4096)
    copy = spill.open("parts/s/piece-00001")
    assert copy is not None
    with copy:
        assert copy.read() == b"x" * 10_000
    with pytest.raises(IncompleteBody):
        spill.write("parts/s/piece-00002", io.BytesIO(b"short"), 10_000, 4096)
    assert spill.open("parts/s/piece-00002") is None
    assert sorted(p.name for p in (tmp_path / "spill" / "parts" / "s").iterdir()) == ["piece-00001"]


def test_room_is_what_the_file_system_has_beyond_the_margin(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert Spill(tmp_path / "not" / "made" / "yet", keep_free=0).has_room(1024)  # its parent answers
    assert not Spill(tmp_path / "spill", keep_free=free + (1 << 30)).has_room(1024)
    assert not Spill(tmp_path / "spill", keep_free=0).has_room(free + (1 << 30))


def test_a_sweep_removes_stale_copies_and_the_directories_they_leave_empty(tmp_path):
    spill = Spill(tmp_path / "spill")
    for key in ("parts/old/piece-00001", "parts/new/piece-00001"):
        spill.write(key, io.BytesIO(b"y" * 100), 100, 4096)
    stale = time.time() - 3600
    for path in (tmp_path / "spill" / "parts" / "old" / "piece-00001", tmp_path / "spill" / "parts" / "old"):
        os.utime(path, (stale, stale))
    assert spill.sweep(older_than=60) == 1
    assert not (tmp_path / "spill" / "parts" / "old").exists()
    assert spill.open("parts/new/piece-00001") is not None  # young: kept, with its directory
