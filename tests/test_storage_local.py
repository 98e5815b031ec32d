"""The disk adapter's assembly: a part longer than recorded, and the hashing thread's failures."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from chunksvc.errors import StorageError
from chunksvc.storage import PartSource
from chunksvc.storage.local import LocalStorage
from tests.helpers import payload


def test_a_longer_part_is_noticed(tmp_path):
    storage = LocalStorage(tmp_path / "storage")
    storage.write("parts/s/p1", io.BytesIO(b"x" * 10), 10, 4096)
    with pytest.raises(StorageError, match="has 10 bytes, expected 9"):
        storage.assemble([PartSource("parts/s/p1", 9)], "objects/s", 4096)
    assert not storage.exists("objects/s") and os.listdir(tmp_path / "storage" / ".incoming") == []


def test_a_failing_progress_report_fails_the_assembly_not_its_digest(tmp_path):
    """Progress is reported from the hashing thread: its failure must surface as that failure,
    never as a short digest (which would fail the session as a checksum mismatch)."""
    storage = LocalStorage(tmp_path / "storage")
    data = payload(5 * 1024 * 1024)
    storage.write("parts/s/p1", io.BytesIO(data), len(data), 1024 * 1024)

    def progress(done: int) -> None:
        raise RuntimeError("progress could not be recorded")

    with pytest.raises(RuntimeError, match="progress could not be recorded"):
        storage.assemble([PartSource("parts/s/p1", len(data))], "objects/s", 1024 * 1024, progress)
    assert not storage.exists("objects/s")
    stored = storage.assemble([PartSource("parts/s/p1", len(data))], "objects/s", 1024 * 1024)
    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
