"""The disk adapter: assembly (a part longer than recorded, the hashing thread's failures) and
the write-behind of a streaming write (sync_file_range), its fallback and its failures."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from chunksvc.errors import StorageError, StorageFull
from chunksvc.storage import PartSource, local, syscalls, writeback
from chunksvc.storage import spares as spares_module
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

    monkeypatch.setattr(writeback, "_start_writeback", start)
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
        monkeypatch.setattr(writeback, "_start_writeback", None)
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
    start = syscalls.libc_sync_file_range()
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


# --- directory fsyncs ------------------------------------------------------------------------


def failing_directory_fsync(monkeypatch: pytest.MonkeyPatch, directory: str) -> None:
    """Every fsync of ``directory`` from now on fails with EIO."""
    real = syscalls.fsync_dir

    def fsync_dir(path: str | Path) -> None:
        if os.path.samefile(path, directory):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real(path)

    monkeypatch.setattr(local, "_fsync_dir", fsync_dir)


def test_a_part_whose_directory_cannot_be_fsynced_is_not_stored(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path / "storage")
    storage.write("parts/s/p1", io.BytesIO(b"a"), 1, MiB)
    failing_directory_fsync(monkeypatch, str(tmp_path / "storage" / "parts" / "s"))
    with pytest.raises(StorageError, match="write parts/s/p2"):
        storage.write("parts/s/p2", io.BytesIO(b"b"), 1, MiB)
    assert not storage.exists("parts/s/p2") and os.listdir(tmp_path / "storage" / ".incoming") == []


def test_an_assembly_whose_directory_cannot_be_fsynced_leaves_the_object_another_assembly_stored(tmp_path, monkeypatch):
    """Two assemblies of one session may overlap (a lease taken over), writing the same bytes
    under the same key. The stale one's failure after its rename must not remove the object that
    the other one stored and recorded."""
    storage = LocalStorage(tmp_path / "storage")
    data = payload(3 * MiB)
    storage.write("parts/s/p1", io.BytesIO(data), len(data), MiB)
    sources = [PartSource("parts/s/p1", len(data))]
    winner = storage.assemble(sources, "objects/s", MiB)  # recorded as the session's object
    failing_directory_fsync(monkeypatch, str(tmp_path / "storage" / "objects"))

    with pytest.raises(StorageError, match="write objects/s"):
        storage.assemble(sources, "objects/s", MiB)

    with storage.open("objects/s") as stored:
        assert hashlib.sha256(stored.read()).hexdigest() == winner.sha256
    assert os.listdir(tmp_path / "storage" / ".incoming") == []


def recording_directory_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    fsynced: list[str] = []
    real = syscalls.fsync_dir

    def fsync_dir(path: str | Path) -> None:
        fsynced.append(os.fspath(path))
        real(path)

    monkeypatch.setattr(local, "_fsync_dir", fsync_dir)
    return fsynced


def test_a_directory_another_writer_made_first_has_its_parent_fsynced_too(tmp_path, monkeypatch):
    """That writer fsyncs the parent after its mkdir; this one may store its file and return
    before that, and a crash then would lose the directory, and the file with it."""
    storage = LocalStorage(tmp_path / "storage")
    storage.write("parts/a/p0", io.BytesIO(b"x"), 1, MiB)  # parts/ exists
    fsynced = recording_directory_fsyncs(monkeypatch)
    real_mkdir = local.Path.mkdir

    def mkdir_lost_to_another_writer(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)  # the other writer's mkdir, just before ours
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(self))

    monkeypatch.setattr(local.Path, "mkdir", mkdir_lost_to_another_writer)
    storage.write("parts/b/p1", io.BytesIO(b"y"), 1, MiB)
    assert fsynced == [str(tmp_path / "storage" / "parts"), str(tmp_path / "storage" / "parts" / "b")]


def test_a_directory_made_by_another_writer_after_the_rename_missed_it_has_its_parent_fsynced(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path / "storage")
    storage.write("parts/a/p0", io.BytesIO(b"x"), 1, MiB)
    fsynced = recording_directory_fsyncs(monkeypatch)
    real_replace = os.replace

    def replace_racing_a_mkdir(source, dest):
        if not os.path.isdir(os.path.dirname(dest)):
            os.mkdir(os.path.dirname(dest))  # another writer's, between our rename and our look
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), dest)
        real_replace(source, dest)

    monkeypatch.setattr(os, "replace", replace_racing_a_mkdir)
    storage.write("parts/b/p1", io.BytesIO(b"y"), 1, MiB)
    assert fsynced == [str(tmp_path / "storage" / "parts"), str(tmp_path / "storage" / "parts" / "b")]


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
    for number in range(1, spares_module._SPARE_LINK_FAILURES + 2):
        if number <= spares_module._SPARE_LINK_FAILURES:
            spares_ready(storage)
        storage.write(f"parts/s/p{number}", io.BytesIO(b"y" * number), number, MiB)
        with storage.open(f"parts/s/p{number}") as stored:
            assert stored.read() == b"y" * number
    # Given up after the third failure in a row: the last write did not try a spare.
    assert len(names) == spares_module._SPARE_LINK_FAILURES
    assert storage._spares is not None and storage._spares.take() is None
    assert os.listdir(tmp_path / "storage" / ".incoming") == []


@needs_spares
def test_spares_given_up_after_failures_to_name_them_are_tried_again_later(tmp_path, monkeypatch):
    """Failures that pass (a full disk, say) do not turn spares off for the process's lifetime."""
    names: list[str] = []
    failing = [True]
    real = local._link_descriptor
    assert real is not None

    def link(fd: int, path: str) -> None:
        names.append(os.path.basename(path))
        if failing[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(fd, path)

    monkeypatch.setattr(local, "_link_descriptor", link)
    monkeypatch.setattr(spares_module, "_SPARE_PAUSE", 0.5)
    storage = LocalStorage(tmp_path / "storage")
    storage.write("parts/s/p0", io.BytesIO(b"x"), 1, MiB)
    for number in range(1, spares_module._SPARE_LINK_FAILURES + 1):
        spares_ready(storage)
        storage.write(f"parts/s/p{number}", io.BytesIO(b"x"), 1, MiB)
    storage.write("parts/s/paused", io.BytesIO(b"x"), 1, MiB)
    assert len(names) == spares_module._SPARE_LINK_FAILURES  # given up for now: none tried
    failing[0] = False
    time.sleep(0.6)
    storage.write("parts/s/after", io.BytesIO(b"x"), 1, MiB)  # asks for spares again
    spares_ready(storage)
    tried = len(names)
    storage.write("parts/s/spare", io.BytesIO(b"spare"), 5, MiB)
    assert len(names) == tried + 1  # a spare, named
    with storage.open("parts/s/spare") as stored:
        assert stored.read() == b"spare"
    storage.close()
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
    monkeypatch.setattr(spares_module, "_SPARE_MAX_AGE", -1.0)
    storage.write("parts/s/p1", io.BytesIO(b"x"), 1, MiB)
    assert names == []


def in_a_fork(child: Callable[[], bytes]) -> bytes:
    """What ``child()`` returns when run in a forked child, which then leaves without running the
    parent's cleanup (nothing, if it raised)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_end, child())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as report:
        return report.read()


@needs_spares
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_use_its_parents_spares(tmp_path):
    storage = LocalStorage(tmp_path / "storage")
    storage.write("parts/s/p0", io.BytesIO(b"x"), 1, MiB)
    spares_ready(storage)

    def child() -> bytes:
        spares = storage._spares
        inherited = len(spares._ready) if spares is not None else -1
        storage.write("parts/s/child", io.BytesIO(b"child"), 5, MiB)
        return str(inherited).encode()

    assert in_a_fork(child) == b"0"
    storage.write("parts/s/parent", io.BytesIO(b"parent"), 6, MiB)  # the parent's spares are its own
    with storage.open("parts/s/child") as child, storage.open("parts/s/parent") as parent:
        assert (child.read(), parent.read()) == (b"child", b"parent")


def open_spare_files(incoming: str) -> int:
    """How many unnamed files made in ``incoming`` this process has open (Linux's /proc)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{incoming}/#"):
                count += 1
    return count


@needs_spares
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_the_thread_closes_old_spares_inherits_none(tmp_path, monkeypatch):
    """The thread closes old spares out of the lists; a fork then waits for it, so the child
    finds (and closes) every spare it inherited in the lists."""
    storage = LocalStorage(tmp_path / "storage")
    incoming = str(tmp_path / "storage" / ".incoming")
    storage.write("parts/s/p0", io.BytesIO(b"x"), 1, MiB)
    spares_ready(storage, spares_module._SPARES)
    spares = storage._spares
    assert spares is not None
    old = {fd for fd, _ in spares._ready}
    closing, may_close = threading.Event(), threading.Event()
    real_close = os.close

    def slow_close(fd: int) -> None:
        if fd in old and threading.current_thread().name == "spare-inodes":
            closing.set()
            may_close.wait(10)
        real_close(fd)

    monkeypatch.setattr(os, "close", slow_close)
    monkeypatch.setattr(spares_module, "_SPARE_MAX_AGE", -1.0)
    storage.write("parts/s/p1", io.BytesIO(b"x"), 1, MiB)  # all too old: the thread closes them
    assert closing.wait(10)
    threading.Timer(0.5, may_close.set).start()
    assert in_a_fork(lambda: str(open_spare_files(incoming)).encode()) == b"0"
    may_close.set()
    storage.close()
