"""The disk adapter: assembly (a part longer than recorded, the hashing thread's failures) and
the write-behind of a streaming write (sync_file_range), its fallback and its failures."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import sys
import time

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


# --- spare inodes ---------------------------------------------------------------------------


def spares_ready(storage: LocalStorage, count: int = 1) -> None:
    """Until the storage's thread has made ``count`` spare inodes (no timing is asserted)."""
    spares = storage._spares
    assert spares is not None
    deadline = time.monotonic() + 30
    while len(spares._ready) < count:
        assert time.monotonic() < deadline, "no spare inode was made"
        time.sleep(0.01)


def recording_links(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[str]:
    """Names given to spare inodes (each link fails with EPERM when ``fail``)."""
    names: list[str] = []
    real = local._link_descriptor
    assert real is not None

    def link(fd: int, path: str) -> None:
        names.append(os.path.basename(path))
        if fail:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), path)
        real(fd, path)

    monkeypatch.setattr(local, "_link_descriptor", link)
    return names


needs_spares = pytest.mark.skipif(local._link_descriptor is None, reason="no O_TMPFILE and linkat here")


@needs_spares
def test_writes_after_the_first_take_a_spare_inode_and_leave_nothing_behind(tmp_path, monkeypatch):
    names = recording_links(monkeypatch)
    storage = LocalStorage(tmp_path / "storage")
    storage.write("parts/s/p1", io.BytesIO(b"first"), 5, MiB)  # no spare yet: made in place
    assert names == []
    spares_ready(storage)
    data = payload(3 * MiB)
    storage.write("parts/s/p2", io.BytesIO(data), len(data), MiB)
    assert len(names) == 1  # named in .incoming, then renamed to the key as any temporary file
    with storage.open("parts/s/p2") as stored:
        assert stored.read() == data
    storage.close()
    assert storage._spares is not None and not storage._spares._ready
    assert os.listdir(tmp_path / "storage" / ".incoming") == []
    assert sorted(k.key for k in storage.list_keys("")) == ["parts/s/p1", "parts/s/p2"]


@needs_spares
def test_a_spare_that_cannot_be_named_gives_way_to_a_file_made_in_place(tmp_path, monkeypatch):
    names = recording_links(monkeypatch, fail=True)
    storage = LocalStorage(tmp_path / "storage")
    storage.write("parts/s/p0", io.BytesIO(b"x"), 1, MiB)
    for number in range(1, local._SPARE_LINK_FAILURES + 2):
        if number <= local._SPARE_LINK_FAILURES:
            spares_ready(storage)
        storage.write(f"parts/s/p{number}", io.BytesIO(b"y" * number), number, MiB)
        with storage.open(f"parts/s/p{number}") as stored:
            assert stored.read() == b"y" * number
    # Given up after the third failure in a row: the last write did not try a spare.
    assert len(names) == local._SPARE_LINK_FAILURES
    assert storage._spares is not None and storage._spares.take() is None
    assert os.listdir(tmp_path / "storage" / ".incoming") == []


@needs_spares
def test_a_file_system_without_o_tmpfile_gets_files_made_in_place(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path: str, flags: int, *args: int, **kwargs: int) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    names = recording_links(monkeypatch)
    storage = LocalStorage(tmp_path / "storage")
    spares = storage._spares
    assert spares is not None
    for number in range(3):
        storage.write(f"parts/s/p{number}", io.BytesIO(b"z"), 1, MiB)
    deadline = time.monotonic() + 30
    while not spares._closed:  # the thread saw the refusal and gave up
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert names == [] and spares.take() is None
    assert len(list(storage.list_keys("parts/"))) == 3


@needs_spares
def test_old_spares_are_not_used(tmp_path, monkeypatch):
    """A spare's times are those of its making, and sweeps of .incoming judge files by them."""
    names = recording_links(monkeypatch)
    storage = LocalStorage(tmp_path / "storage")
    storage.write("parts/s/p0", io.BytesIO(b"x"), 1, MiB)
    spares_ready(storage)
    monkeypatch.setattr(local, "_SPARE_MAX_AGE", -1.0)
    storage.write("parts/s/p1", io.BytesIO(b"x"), 1, MiB)
    assert names == []


@needs_spares
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_use_its_parents_spares(tmp_path):
    storage = LocalStorage(tmp_path / "storage")
    storage.write("parts/s/p0", io.BytesIO(b"x"), 1, MiB)
    spares_ready(storage)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        try:
            spares = storage._spares
            inherited = len(spares._ready) if spares is not None else -1
            storage.write("parts/s/child", io.BytesIO(b"child"), 5, MiB)
            os.write(write_end, str(inherited).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as report:
        assert report.read() == b"0"
    storage.write("parts/s/parent", io.BytesIO(b"parent"), 6, MiB)  # the parent's spares are its own
    with storage.open("parts/s/child") as child, storage.open("parts/s/parent") as parent:
        assert (child.read(), parent.read()) == (b"child", b"parent")
