"""Storage in a local directory: ``<root>/<key>``, written crash-safely.

Every object is written to ``<root>/.incoming/<random name>``, fsynced, then renamed into place and
its directory fsynced, so after a crash a key holds either nothing or all of its bytes.
Leftovers of a crash stay in ``.incoming`` (never listed as keys).

While a body streams in, the kernel is asked to start writing each block to disk as soon as it
is written (``sync_file_range``, see ``_WriteBehind``), so the fsync that makes the file durable
finds little left to write. Durability rests on that fsync alone, as before.

Where the system allows, the temporary file's inode is made ahead of need by a thread of its own
(an unnamed ``O_TMPFILE`` file, see ``_SpareInodes``) and given its ``.incoming`` name when a
write starts: allocating an inode waits on the file system's journal, naming one does much less.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import hashlib
import io
import os
import queue
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

from chunksvc.config import Limits
from chunksvc.errors import ConfigError, ObjectMissing, StorageError, StorageFull, StorageUnavailable
from chunksvc.storage.base import (
    InPlace,
    ListedKey,
    PartSource,
    Progress,
    Readable,
    Storage,
    StoredObject,
    check_key,
    check_prefix,
    read_exact_blocks,
    valid_key,
)

INCOMING = ".incoming"
# Assembly moves blocks of at least this size: fewer system calls per byte, memory still flat.
_MIN_ASSEMBLY_BLOCK = 1024 * 1024
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})
# Write-behind asks for at least this many written bytes at a time.
_WRITE_BEHIND_MIN = 1024 * 1024
# sync_file_range's answers that mean "not for this file or system" (no such call, a file system
# or file type it does not apply to): nothing was started, nothing is lost by going on without it.
_WRITE_BEHIND_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE})
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, wait for none
# Spare inodes: how many are kept ready, and how old one may be when it is used (its times are
# those of its making, and a sweep of .incoming judges a file by them: far below any sane grace).
_SPARES = 4
_SPARE_MAX_AGE = 10.0
_SPARE_LINK_FAILURES = 3  # consecutive failures to name a spare before spares are given up...
_SPARE_PAUSE = 60.0  # ...for this many seconds (the cause may pass: a full disk, say)
_AT_FDCWD = -100  # <fcntl.h>
_AT_SYMLINK_FOLLOW = 0x400

T = TypeVar("T")


class _fs_errors:
    """Turn file-system failures into ``StorageError`` (messages name keys, not server paths),
    or ``StorageFull`` when the disk or a quota has no room left. A class, not a generator: it is
    entered several times per stored part."""

    __slots__ = ("_action",)

    def __init__(self, action: str) -> None:
        self._action = action

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        if isinstance(exc, OSError):
            if exc.errno in _NO_ROOM:
                raise StorageFull(f"{self._action}: no space left on the storage") from exc
            raise StorageError(f"{self._action}: {exc.strerror or exc}") from exc


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _libc_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``start(fd, offset, nbytes)``: Linux's ``sync_file_range(..., SYNC_FILE_RANGE_WRITE)``
    through libc (``os`` has no such call), raising ``OSError`` on failure; None elsewhere."""
    if sys.platform != "linux":
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # no libc to load, or one without the call
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        if function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return start


#: None where the call does not exist; a test may replace it.
_start_writeback = _libc_sync_file_range()


def _libc_link_descriptor() -> Callable[[int, str], None] | None:
    """``link(fd, path)``: give the file open as ``fd`` (an unnamed ``O_TMPFILE`` one) the name
    ``path``, through ``linkat`` on ``/proc/self/fd/<fd>`` (``os.link`` does not follow that
    link); None where there is no such call, no ``O_TMPFILE`` or no ``/proc``."""
    if sys.platform != "linux" or not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
    function.restype = ctypes.c_int

    def link(fd: int, path: str) -> None:
        source = f"/proc/self/fd/{fd}".encode()
        if function(_AT_FDCWD, source, _AT_FDCWD, os.fsencode(path), _AT_SYMLINK_FOLLOW) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)

    return link


#: None where unnamed files cannot be named later; a test may replace it.
_link_descriptor = _libc_link_descriptor()


class _SpareInodes:
    """Empty unnamed files (``O_TMPFILE``) in a directory, made ahead of need by a thread.

    ``take`` hands one out (its descriptor, open for writing) or None when none is ready;
    ``replenish`` has the thread make more once half of them are taken. An unnamed file is
    invisible: nothing lists or sweeps it, and a crash leaves nothing (the file system frees it
    as it mounts). Only a process's own spares are used: after a fork the child drops the ones
    it inherited (two processes writing through one inode would mix their bytes; see
    ``_forget_spares_after_fork``), and spares older than ``_SPARE_MAX_AGE`` are dropped too.
    Where the directory refuses ``O_TMPFILE`` the thread gives up and ``take`` answers None;
    where naming spares keeps failing, spares are left alone for ``_SPARE_PAUSE`` seconds.
    """

    def __init__(self, directory: str, keep: int = _SPARES) -> None:
        self._directory = directory
        self._keep = keep
        self._ready: collections.deque[tuple[int, float]] = collections.deque()
        self._stale: list[int] = []
        self._lock = threading.Lock()
        # Held by the thread while it has descriptors in hand outside the lists (closing stale
        # ones, making a new one), and by a fork meanwhile (``_hold_spares_for_fork``): a child
        # then inherits every spare descriptor in the lists, where ``after_fork`` closes it.
        self._in_hand = threading.Lock()
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._link_failures = 0
        self._paused_until = 0.0  # monotonic; none are made or handed out before then

    def take(self) -> int | None:
        found = None
        with self._lock:
            if self._closed or time.monotonic() < self._paused_until:
                return None
            while self._ready:
                fd, made = self._ready.popleft()
                if time.monotonic() - made <= _SPARE_MAX_AGE:
                    found = fd
                    break
                self._stale.append(fd)  # closed by the thread: freeing an inode waits too
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="spare-inodes", daemon=True)
                self._thread.start()
        return found

    def replenish(self) -> None:
        """Have the thread make more once half are taken. Called when a write is durable, so
        that making them overlaps what follows the write (the database, the answer), not the
        write's fsyncs: a new inode joins the journal transaction those fsyncs commit."""
        with self._lock:
            low = self._thread is not None and len(self._ready) <= self._keep // 2
        if low:
            self._wanted.set()

    def linked(self, ok: bool) -> None:
        """Whether naming the spare just taken worked; after a few failures in a row spares are
        left alone for a while (those made are dropped: the next may fail the same way)."""
        with self._lock:
            self._link_failures = 0 if ok else self._link_failures + 1
            if self._link_failures >= _SPARE_LINK_FAILURES:
                self._link_failures = 0
                self._paused_until = time.monotonic() + _SPARE_PAUSE
                while self._ready:
                    self._stale.append(self._ready.popleft()[0])
                self._wanted.set()  # the thread closes them

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        self._closed = True
        self._wanted.set()
        while self._ready:
            self._stale.append(self._ready.popleft()[0])
        while self._stale:
            os.close(self._stale.pop())

    def after_fork(self) -> None:
        """In a forked child, before it has other threads: the parent's spares stay the parent's
        (closing the child's copies of them is harmless), its lock and thread are not ours."""
        self._lock = threading.Lock()
        self._in_hand = threading.Lock()
        self._wanted = threading.Event()
        self._thread = None
        while self._ready:
            self._stale.append(self._ready.popleft()[0])
        while self._stale:
            os.close(self._stale.pop())

    def _run(self) -> None:
        wanted = self._wanted
        while True:
            wanted.wait()
            wanted.clear()
            while True:
                with self._in_hand:
                    with self._lock:
                        if self._closed or wanted is not self._wanted:
                            return
                        stale, self._stale = self._stale, []
                        enough = len(self._ready) >= self._keep or time.monotonic() < self._paused_until
                    for fd in stale:
                        os.close(fd)
                    if enough:
                        break
                    try:
                        fd = os.open(self._directory, os.O_WRONLY | os.O_TMPFILE, 0o666)
                    except OSError as exc:
                        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                            self.close()  # not on this file system: writers make their own files
                            return
                        break  # no room, or no directory: writers make their own files meanwhile
                    with self._lock:
                        if self._closed:
                            os.close(fd)
                            return
                        self._ready.append((fd, time.monotonic()))


class _WriteBehind:
    """Starts the kernel writing a file's bytes to disk while the rest is still being written,
    so the final fsync finds little left and the disk works while the body streams.

    ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` queues the written range for writeback and returns:
    unlike a periodic ``fdatasync`` (``_Flusher``) it waits for no device and flushes no metadata
    and no disk cache, so it promises nothing; durability rests on the final fsync, which still
    runs. The last bytes are left to that fsync (it follows at once). Where the call is missing
    or refused for this file (``_WRITE_BEHIND_UNSUPPORTED``) the file is written without it. Any
    other failure (EIO, ENOSPC...) stops the write-behind and is kept for ``check``, which the
    writer calls right after the final fsync: it is reported as that fsync's failure, even when
    the fsync itself succeeded, so no write error is ever lost.
    """

    def __init__(self, fd: int, length: int, base: int = 0) -> None:
        self._fd = fd
        self._base = base  # where in the file the writes begin (a part written in place)
        self._length = length  # bytes the file will hold: the last ones are the fsync's
        self._written = 0
        self._started = 0  # bytes before this offset were handed to writeback
        self._on = _start_writeback is not None
        self._error: OSError | None = None

    def written(self, count: int) -> None:
        self._written += count
        pending = self._written - self._started
        if not self._on or pending < _WRITE_BEHIND_MIN or self._written >= self._length:
            return
        assert _start_writeback is not None
        try:
            _start_writeback(self._fd, self._base + self._started, pending)
        except OSError as exc:
            self._on = False
            if exc.errno not in _WRITE_BEHIND_UNSUPPORTED:
                self._error = exc
            return
        self._started = self._written

    def check(self) -> None:
        """Raise the write-behind's failure, if it had one (after the final fsync)."""
        if self._error is not None:
            raise self._error


class _Flusher:
    """Starts writing a growing file to disk while it is still being written: a thread flushes
    (fdatasync) each time another ``every`` bytes were written, so the last fsync finds little
    left. Its failures are the final fsync's to report (it fails the same way)."""

    def __init__(self, fd: int, every: int = 128 * 1024 * 1024) -> None:
        self._fd = fd
        self._every = every
        self._pending = 0
        self._wanted = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="assemble-flush", daemon=True)
        self._thread.start()

    def written(self, count: int) -> None:
        self._pending += count
        if self._pending >= self._every:
            self._pending = 0
            self._wanted.set()

    def finish(self) -> None:
        self._done = True
        self._wanted.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._done:
                return
            with contextlib.suppress(OSError):
                os.fdatasync(self._fd)


class _HashingRing:
    """Hashes blocks in a thread of its own while the caller reads and writes the next ones.

    The caller takes a free buffer (``take``), fills and writes it, and hands it over
    (``hashed_later``); the hashing thread gives it back once hashed. A few buffers go round, so
    memory stays flat and reading, writing and hashing overlap.
    """

    def __init__(self, block_size: int, progress: Progress | None, depth: int = 4) -> None:
        self._digest = hashlib.sha256()
        self._progress = progress
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(memoryview(bytearray(block_size)))
        self._filled: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        self._hashed = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="assemble-hash", daemon=True)
        self._thread.start()

    def take(self) -> memoryview:
        """A free buffer; the hashing thread's failure, as soon as there is one."""
        buffer = self._free.get()
        if self._error is not None:
            self._free.put(buffer)
            raise self._error
        return buffer

    def hashed_later(self, buffer: memoryview, count: int) -> None:
        self._filled.put((buffer, count))

    def give_back(self, buffer: memoryview) -> None:
        """A buffer taken but not handed over (the part ended)."""
        self._free.put(buffer)

    def finish(self) -> tuple[int, str]:
        """Wait for the last block; the bytes hashed and their SHA-256 (or the hashing error)."""
        self._filled.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hashed, self._digest.hexdigest()

    def _run(self) -> None:
        while (item := self._filled.get()) is not None:
            buffer, count = item
            try:
                if self._error is None:
                    self._digest.update(buffer[:count])
                    self._hashed += count
                    if self._progress:
                        self._progress(self._hashed)
            except BaseException as exc:  # raised again by finish(), in the assembling thread
                self._error = exc
            finally:
                self._free.put(buffer)


_ALL_SPARES: weakref.WeakSet[_SpareInodes] = weakref.WeakSet()
_HELD_FOR_FORK: list[_SpareInodes] = []


def _hold_spares_for_fork() -> None:
    """Before a fork: wait until no spare thread has descriptors in hand outside its lists (a
    child would inherit them where nothing closes them). A thread holds them for one close or
    one new inode at a time."""
    for spares in list(_ALL_SPARES):
        spares._in_hand.acquire()
        _HELD_FOR_FORK.append(spares)


def _release_spares_after_fork() -> None:
    while _HELD_FOR_FORK:
        _HELD_FOR_FORK.pop()._in_hand.release()


def _forget_spares_after_fork() -> None:
    _HELD_FOR_FORK.clear()  # the child's copies of those locks are replaced by after_fork
    for spares in list(_ALL_SPARES):
        spares.after_fork()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(
        before=_hold_spares_for_fork,
        after_in_parent=_release_spares_after_fork,
        after_in_child=_forget_spares_after_fork,
    )


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._incoming = self._root / INCOMING
        # As text too: the part path joins them with a key per request (pathlib costs more).
        self._root_text = str(self._root)
        self._incoming_text = str(self._incoming)
        self._spares: _SpareInodes | None = None
        if _link_descriptor is not None:
            self._spares = _SpareInodes(self._incoming_text)
            _ALL_SPARES.add(self._spares)
            weakref.finalize(self, self._spares.close)
        try:
            self._incoming.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"storage root {self._root}: cannot create it or its {INCOMING} directory ({exc.strerror or exc})"
            ) from exc

    def __repr__(self) -> str:
        return f"LocalStorage({str(self._root)!r})"

    @property
    def in_place(self) -> InPlace:
        from chunksvc.storage.inplace import LocalInPlace  # it builds on this module

        return LocalInPlace(self)

    def validate_limits(self, limits: Limits) -> None:
        """A directory has no part-count or object-size limit of its own."""

    def write(self, key: str, reader: Readable, length: int, block_size: int) -> None:
        def fill(fd: int, behind: _WriteBehind) -> None:
            # Only the file writes are translated: the reader's own exceptions propagate as-is.
            for block in read_exact_blocks(reader, length, block_size):
                with _fs_errors(f"write {key}"):
                    _write_all(fd, memoryview(block))
                behind.written(len(block))

        self._store(check_key(key), length, fill, own_key=True)

    def assemble(
        self,
        sources: Sequence[PartSource],
        key: str,
        block_size: int,
        progress: Progress | None = None,
        known_sha256: str | None = None,
    ) -> StoredObject:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        del known_sha256  # the copy is hashed as it is written: it costs no extra pass here
        paths = [(src, self._path(src.key)) for src in sources]

        def fill(fd: int, behind: _WriteBehind) -> tuple[int, str]:
            # One pass: each block is read from its part and written to the object by this
            # thread while the ring's thread hashes the block before it, so reading, writing and
            # hashing overlap. The digest is of exactly the bytes written. Once all is written,
            # the object is flushed to disk while the hash catches up (_store's own fsync then
            # finds nothing left to flush).
            ring = _HashingRing(max(block_size, _MIN_ASSEMBLY_BLOCK), progress)
            flusher = _Flusher(fd)
            try:
                for src, path in paths:
                    copied = 0
                    with _fs_errors(f"assemble {key} from {src.key}"), self._open_source(src, key, path) as part:
                        while True:
                            buffer = ring.take()
                            # One byte past the recorded size at most: enough to see a longer part.
                            count = part.readinto(buffer[: min(len(buffer), src.size + 1 - copied)])
                            if not count:
                                ring.give_back(buffer)
                                break
                            _write_all(fd, buffer[:count])
                            ring.hashed_later(buffer, count)
                            copied += count
                            flusher.written(count)
                    if copied != src.size:
                        raise StorageError(f"assemble {key}: part {src.key} has {copied} bytes, expected {src.size}")
                with _fs_errors(f"write {key}"):
                    flusher.finish()
                    os.fsync(fd)
            except BaseException:
                with contextlib.suppress(BaseException):  # the first failure is the one to report
                    flusher.finish()
                    ring.finish()
                raise
            return ring.finish()

        size, sha256 = self._store(check_key(key), sum(src.size for src in sources), fill, own_key=False)
        return StoredObject(key, size, sha256)

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectMissing(key) from None
        except OSError as exc:
            raise StorageError(f"open {key}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        with _fs_errors(f"stat {key}"):
            return self._path(key).is_file()

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self._path(key)
            # Not an object (missing, or a directory): nothing to delete, as on S3.
            with (
                _fs_errors(f"delete {key}"),
                contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError),
            ):
                path.unlink()

    def delete_prefix(self, prefix: str) -> int:
        if not prefix.endswith("/") or not check_prefix(prefix):
            raise ValueError(f"delete_prefix needs a non-empty prefix ending with '/', got {prefix!r}")
        top = self._root / prefix
        count = 0
        with _fs_errors(f"delete {prefix}"):
            for dirpath, _dirnames, filenames in os.walk(top, topdown=False):
                for name in filenames:
                    with contextlib.suppress(FileNotFoundError):  # a concurrent delete won
                        os.unlink(os.path.join(dirpath, name))
                        count += 1
                try:
                    os.rmdir(dirpath)
                except OSError as exc:
                    # A concurrent write may have just put a file there; leave it.
                    if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT):
                        raise
        return count

    def list_keys(self, prefix: str) -> Iterator[ListedKey]:
        check_prefix(prefix)
        # Walk only the directory the prefix names (or the one its last segment is in).
        top = self._root / prefix if prefix.endswith("/") or not prefix else (self._root / prefix).parent
        for dirpath, dirnames, filenames in os.walk(top):
            if Path(dirpath) == self._root and INCOMING in dirnames:
                dirnames.remove(INCOMING)
            for name in filenames:
                path = Path(dirpath, name)
                key = path.relative_to(self._root).as_posix()
                if not key.startswith(prefix) or not valid_key(key):
                    continue  # outside the prefix, or a stray file this adapter never wrote
                try:
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    continue  # deleted while we walked
                yield ListedKey(key, datetime.fromtimestamp(mtime, tz=UTC))

    def sweep_incomplete(
        self,
        prefixes: Sequence[str],
        older_than: datetime,
        dry_run: bool = False,
        found: Callable[[str], None] | None = None,
        keep: Collection[str] = (),  # nothing is staged here (no ``StagedObject``)
    ) -> int:
        """Remove temporary files in ``.incoming`` last written before ``older_than``.

        They are named by no key, and the directory is this adapter's own: all of them are
        swept, whatever ``prefixes`` the caller owns.

        A live write touches its file with every block, so only a stalled or dead one is old.
        If a live one is removed anyway, its rename fails and the write reports an error.
        """
        cutoff = older_than.timestamp()
        count = 0
        with _fs_errors(f"sweep {INCOMING}"), os.scandir(self._incoming) as entries:
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                        continue
                    if not dry_run:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # its writer renamed it into place, or another sweep removed it
                count += 1
                if found is not None:
                    found(f"{INCOMING}/{entry.name}")
        return count

    def free_bytes(self) -> int | None:
        """Bytes an unprivileged writer can still store under the root."""
        with _fs_errors("free space"):
            stats = os.statvfs(self._root)
        return stats.f_bavail * stats.f_frsize

    def check(self, timeout: float) -> None:
        """Create and remove a probe file (``timeout`` is not enforced: local calls do not hang)."""
        probe = self._incoming / f"check-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageUnavailable(f"storage root is missing or not writable ({exc.strerror or exc})") from exc

    # --- internals --------------------------------------------------------------------------

    @staticmethod
    def _open_source(src: PartSource, key: str, path: Path) -> io.BufferedReader:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ObjectMissing(src.key, f"assemble {key}: part {src.key} is missing") from None

    def _path(self, key: str) -> Path:
        return self._root / check_key(key)

    def _store(self, key: str, length: int, fill: Callable[[int, _WriteBehind], T], *, own_key: bool) -> T:
        """Run ``fill`` on a fresh temporary file (its descriptor, and a write-behind for the
        ``length`` bytes it will write), then make it durable and move it to ``key``.

        The order is what makes a stored key durable: the file's bytes (fsync) before its name
        (rename, then fsync of the directory), and both before this returns, so before the caller
        records the key anywhere.

        ``own_key``: no other writer stores under ``key`` (a part: a fresh key per request), so a
        failure after the rename may remove what is there. Not so for an assembled object (see
        the directory fsync below).
        """
        dest = os.path.join(self._root_text, key)
        tmp = os.path.join(self._incoming_text, os.urandom(16).hex())
        action = f"write {key}"
        try:
            with _fs_errors(action):
                fd = self._open_temporary(tmp)
            try:
                behind = _WriteBehind(fd, length)
                result = fill(fd, behind)
                with _fs_errors(action):
                    os.fsync(fd)
                    behind.check()
            except BaseException:
                with contextlib.suppress(OSError):  # do not hide the original failure
                    os.close(fd)
                raise
            with _fs_errors(action):
                os.close(fd)
                directory = self._rename(tmp, dest)
                try:
                    _fsync_dir(directory)
                except OSError:
                    # Not durable, so not stored. A key of our own is removed: nothing is left
                    # under it on failure. An assembled object's key is shared: two assemblies of
                    # one session can overlap (a completion lease taken over) and write the same
                    # bytes under the same key. The other may have stored it and recorded the
                    # session COMPLETED before this rename replaced its file with ours; removing
                    # ours would remove the session's object. So it stays: its bytes are whole and
                    # fsynced, and the error tells our caller to record nothing (an attempt that
                    # does record an outcome stores the object again first).
                    if own_key:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(dest)
                    raise
        except BaseException:
            with contextlib.suppress(OSError):  # do not hide the original failure
                os.unlink(tmp)
            raise
        finally:
            if self._spares is not None:
                self._spares.replenish()
        return result

    def _open_temporary(self, path: str) -> int:
        """A new, empty file at ``path`` open for writing: a spare inode named ``path`` when one
        is ready (see ``_SpareInodes``), else a file created there now."""
        spares = self._spares
        fd = spares.take() if spares is not None else None
        if fd is not None:
            assert spares is not None and _link_descriptor is not None
            try:
                _link_descriptor(fd, path)
            except OSError:
                os.close(fd)  # unnamed: nothing to clean up; the file made below takes its place
                spares.linked(False)
            else:
                spares.linked(True)
                return fd
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)

    def close(self) -> None:
        if self._spares is not None:
            self._spares.close()

    def _rename(self, tmp: str, dest: str) -> str:
        """Move ``tmp`` to ``dest``; return ``dest``'s directory. Missing directories are created
        when the first try says they are missing (so the common case costs no lookup)."""
        directory = os.path.dirname(dest)
        try:
            os.replace(tmp, dest)
        except FileNotFoundError:
            self._make_dirs(Path(directory))
            os.replace(tmp, dest)  # a missing tmp (swept) fails again, as it should
        return directory

    def _make_dirs_for(self, path: str) -> None:
        """The directories a file at ``path`` (under the root) needs, made durably."""
        self._make_dirs(Path(path).parent)

    def _link_durably(self, path: str, key: str) -> None:
        """Give the file at ``path`` the name ``key`` too (replacing what is there), durably."""
        dest = os.path.join(self._root_text, check_key(key))
        tmp = os.path.join(self._incoming_text, os.urandom(16).hex())
        os.link(path, tmp)
        try:
            _fsync_dir(self._rename(tmp, dest))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _make_dirs(self, directory: Path) -> None:
        """Create missing directories below the root, fsyncing each parent so they survive a crash.

        One that another writer made meanwhile (our mkdir found it, or it is there now although
        our rename found it missing) has its parent fsynced too: that writer fsyncs it only after
        its mkdir, and this one may store its file and return first; a crash then would lose the
        directory, and the file with it. Rare (two first writes into a new directory at once).
        """
        missing = []
        wanted = directory
        while directory != self._root and not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        if not missing and wanted != self._root:
            _fsync_dir(wanted.parent)  # made since our rename failed: by someone else
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made by someone else: fsynced anyway
                new.mkdir()
            _fsync_dir(new.parent)
