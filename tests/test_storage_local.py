"""The disk adapter: assembly (a part longer than recorded, the hashing thread's failures) and
the write-behind of a streaming write (sync_file_range), its fallback and its failures."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import sys

import pytest

from chunksvc.errors import StorageError, StorageFull
from chunksvc.storage import PartSource, local
from chunksvc.storage.local import LocalStorage
from tests.helpers import payload

MiB = 1024 * 1024


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


# --- write-behind -------------------------------------------------------------------------------


@pytest.fixture
def file_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every regular file fsynced from now on (directories are left out)."""
    sizes: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            sizes.append(info.st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return sizes


def recording_writeback(monkeypatch: pytest.MonkeyPatch, error: OSError | None = None) -> list[tuple[int, int]]:
    """Replace the write-behind call with one that records ``(offset, nbytes)`` (and then raises
    ``error``, when given)."""
    calls: list[tuple[int, int]] = []

    def start(fd: int, offset: int, nbytes: int) -> None:
        calls.append((offset, nbytes))
        if error is not None:
            raise error

    monkeypatch.setattr(local, "_start_writeback", start)
    return calls


def test_write_behind_covers_every_block_but_the_last(tmp_path, monkeypatch, file_fsyncs):
    calls = recording_writeback(monkeypatch)
    storage = LocalStorage(tmp_path / "storage")
    data = payload(5 * MiB + 10)
    storage.write("parts/s/p1", io.BytesIO(data), len(data), MiB)
    # The last (partial) block is left to the fsync that follows at once.
    assert calls == [(n * MiB, MiB) for n in range(5)]
    assert file_fsyncs == [len(data)]
    with storage.open("parts/s/p1") as stored:
        assert stored.read() == data


def test_write_behind_waits_for_a_megabyte_of_small_blocks(tmp_path, monkeypatch):
    calls = recording_writeback(monkeypatch)
    data = payload(3 * MiB)
    LocalStorage(tmp_path / "storage").write("parts/s/p1", io.BytesIO(data), len(data), 256 * 1024)
    assert calls == [(0, MiB), (MiB, MiB)]


def test_a_small_part_asks_for_no_write_behind(tmp_path, monkeypatch, file_fsyncs):
    calls = recording_writeback(monkeypatch)
    LocalStorage(tmp_path / "storage").write("parts/s/p1", io.BytesIO(b"x" * 4096), 4096, MiB)
    assert calls == [] and file_fsyncs == [4096]


@pytest.mark.parametrize("missing", ["absent", "ENOSYS", "EINVAL", "EOPNOTSUPP"])
def test_without_write_behind_the_file_is_still_stored_and_fsynced(tmp_path, monkeypatch, file_fsyncs, missing):
    """No sync_file_range (not Linux, no libc call) or one refused for this file or file system:
    the write goes on without it, once told, and durability is the final fsync's as ever."""
    if missing == "absent":
        monkeypatch.setattr(local, "_start_writeback", None)
        calls: list[tuple[int, int]] = []
    else:
        code = getattr(errno, missing)
        calls = recording_writeback(monkeypatch, OSError(code, os.strerror(code)))
    storage = LocalStorage(tmp_path / "storage")
    data = payload(4 * MiB)
    storage.write("parts/s/p1", io.BytesIO(data), len(data), MiB)
    assert calls == ([] if missing == "absent" else [(0, MiB)])  # asked once, then not again
    assert file_fsyncs == [len(data)]
    with storage.open("parts/s/p1") as stored:
        assert stored.read() == data


@pytest.mark.parametrize(("code", "raised"), [(errno.EIO, StorageError), (errno.ENOSPC, StorageFull)])
def test_a_write_behind_failure_is_the_final_fsyncs_failure(tmp_path, monkeypatch, file_fsyncs, code, raised):
    """A writeback the kernel could not start (an I/O error, no room) fails the write as its
    fsync would, after that fsync ran and even though it succeeded: nothing is stored."""
    calls = recording_writeback(monkeypatch, OSError(code, os.strerror(code)))
    storage = LocalStorage(tmp_path / "storage")
    data = payload(4 * MiB)
    with pytest.raises(raised, match="write parts/s/p1") as failure:
        storage.write("parts/s/p1", io.BytesIO(data), len(data), MiB)
    assert isinstance(failure.value.__cause__, OSError) and failure.value.__cause__.errno == code
    assert calls == [(0, MiB)]  # not asked again after failing
    assert file_fsyncs == [len(data)]  # every byte was still written and fsynced first
    assert not storage.exists("parts/s/p1")
    assert os.listdir(tmp_path / "storage" / ".incoming") == []


@pytest.mark.skipif(sys.platform != "linux", reason="sync_file_range is Linux's")
def test_the_real_sync_file_range_is_found_and_accepts_a_file(tmp_path):
    start = local._libc_sync_file_range()
    assert start is not None
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(b"x" * MiB)
        f.flush()
        start(f.fileno(), 0, MiB)
        with pytest.raises(OSError) as refused:
            start(f.fileno(), -1, MiB)  # a negative offset: EINVAL, which write-behind drops
        assert refused.value.errno == errno.EINVAL


def test_a_write_into_a_new_directory_creates_it(tmp_path):
    storage = LocalStorage(tmp_path / "storage")
    storage.write("parts/s/p1", io.BytesIO(b"a"), 1, MiB)
    storage.write("parts/s/p2", io.BytesIO(b"b"), 1, MiB)  # the directory exists now
    storage.delete_prefix("parts/s/")
    storage.write("parts/s/p3", io.BytesIO(b"c"), 1, MiB)  # and again after it was removed
    assert [k.key for k in storage.list_keys("parts/")] == ["parts/s/p3"]
