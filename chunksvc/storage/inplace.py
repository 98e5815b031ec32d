"""Parts written in place in a local file that becomes the object (``InPlace`` for ``LocalStorage``).

Why: assembling by copying made a user wait, after the last part, for every byte to be read,
written and flushed once more (1 GiB: about 1.5 s of a 4 s upload). Written in place, each byte
is written once, and the object is made by a link.

How a range is held: an open-file-description lock (``F_OFD_SETLK``) on the byte range. Unlike
``lockf``'s process locks, two threads of one process exclude each other, and the kernel drops the
lock when its writer's file is closed, so a writer killed with ``kill -9`` leaves no stale hold:
the next writer of that range simply takes it. A claim never waits: a writer that finds its range
held stores its bytes elsewhere (the caller's fallback), so a stalled writer delays no one.

Durability: each write is ``fdatasync``ed, and the file's directory fsynced, before the claim
returns, so bytes acknowledged from here are as durable as a part written to its own file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import time
from collections.abc import Iterator, Sequence

from chunksvc.errors import ObjectMissing, StorageError
from chunksvc.storage.base import Block, InPlace, Placement, RangeClaim, Readable, check_key, read_exact_blocks
from chunksvc.storage.local import LocalStorage
from chunksvc.storage.syscalls import fs_errors, fsync_dir
from chunksvc.storage.writeback import WriteBehind

# struct flock on Linux/x86_64 and aarch64: l_type, l_whence, l_start, l_len, l_pid (0 for OFD).
_FLOCK = "hhqqi4x"
_WHOLE_FILE_POLL = 0.01  # seconds between tries for the whole-file lock at finish
_COPY_CHUNK = 64 * 1024 * 1024  # copy_file_range asks for this much at a time
_READ_BLOCK_MIN = 1024 * 1024


def _try_lock(fd: int, offset: int, length: int) -> bool:
    """Take a write lock on ``[offset, offset + length)`` (length 0: to the end), or False."""
    request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, offset, length, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class _Claim(RangeClaim):
    def __init__(self, storage: LocalStorage, key: str, fd: int, offset: int, path: str) -> None:
        self._storage = storage
        self._key = key
        self._fd = fd
        self._offset = offset
        self._path = path

    def write(self, reader: Readable, length: int, block_size: int) -> None:
        action = f"write {self._key} at {self._offset}"
        behind = WriteBehind(self._fd, length, base=self._offset)
        position = self._offset
        for block in read_exact_blocks(reader, length, block_size):
            with fs_errors(action):
                view = memoryview(block)
                while view:
                    written = os.pwrite(self._fd, view, position)
                    position += written
                    view = view[written:]
            behind.written(len(block))
        with fs_errors(action):
            os.fdatasync(self._fd)
            behind.check()
            # The file's name, made by whichever writer came first, must outlive a crash too.
            fsync_dir(os.path.dirname(self._path))


class LocalInPlace(InPlace):
    def __init__(self, storage: LocalStorage) -> None:
        self._storage = storage

    @contextlib.contextmanager
    def claim(self, key: str, offset: int, length: int, size: int) -> Iterator[RangeClaim | None]:
        if offset < 0 or length < 1 or offset + length > size:
            raise ValueError(f"range {offset}+{length} is outside a file of {size} bytes")
        path = str(self._storage._path(key))
        with fs_errors(f"open {key}"):
            fd = self._open_or_make(path, size)
        try:
            with fs_errors(f"lock {key}"):
                held = _try_lock(fd, offset, length)
            yield _Claim(self._storage, key, fd, offset, path) if held else None
        finally:
            os.close(fd)  # drops the lock

    def read(self, key: str, offset: int, length: int, block_size: int) -> Iterator[Block]:
        path = self._storage._path(key)
        try:
            source = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        except OSError as exc:
            raise StorageError(f"open {key}: {exc.strerror or exc}") from exc
        buffer = memoryview(bytearray(max(block_size, _READ_BLOCK_MIN)))
        with source:
            source.seek(offset)
            remaining = length
            while remaining:
                with fs_errors(f"read {key}"):
                    count = source.readinto(buffer[: min(len(buffer), remaining)])
                if not count:
                    raise StorageError(f"read {key}: {remaining} bytes short at {offset + length - remaining}")
                remaining -= count
                yield buffer[:count]

    def finish(self, key: str, object_key: str, size: int, elsewhere: Sequence[Placement], wait: float) -> None:
        path = str(self._storage._path(key))
        check_key(object_key)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        try:
            with fs_errors(f"finish {key}"):
                deadline = time.monotonic() + wait
                # Every range writer is done once the whole file can be locked; a writer that
                # comes later finds its range held and stores its bytes elsewhere.
                while not _try_lock(fd, 0, 0):
                    if time.monotonic() > deadline:
                        raise StorageError(f"finish {key}: a part is still being written after {wait:.0f} s")
                    time.sleep(_WHOLE_FILE_POLL)
                stored = os.fstat(fd).st_size
                if stored != size:
                    raise StorageError(f"finish {key}: the file has {stored} bytes, expected {size}")
            for placement in elsewhere:
                self._place(placement, fd, key)
            with fs_errors(f"finish {key}"):
                os.fdatasync(fd)
                self._storage._link_durably(path, object_key)
        finally:
            os.close(fd)

    # --- internals --------------------------------------------------------------------------

    def _open_or_make(self, path: str, size: int) -> int:
        try:
            return os.open(path, os.O_RDWR)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:
            self._storage._make_dirs_for(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # sparse: blocks are allocated as ranges are written
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _place(self, placement: Placement, dest: int, key: str) -> None:
        try:
            src = os.open(self._storage._path(placement.key), os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectMissing(placement.key, f"finish {key}: part {placement.key} is missing") from None
        try:
            with fs_errors(f"place {placement.key} in {key}"):
                self._copy(src, dest, placement.offset, placement.size, placement.key)
        finally:
            os.close(src)

    @staticmethod
    def _copy(src: int, dest: int, offset: int, length: int, source: str) -> None:
        copied = 0
        try:
            while copied < length:
                count = os.copy_file_range(src, dest, min(_COPY_CHUNK, length - copied), copied, offset + copied)
                if count == 0:
                    raise StorageError(f"place {source}: it has {copied} bytes, expected {length}")
                copied += count
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # No in-kernel copy here: the same bytes through a buffer.
            buffer = bytearray(_READ_BLOCK_MIN)
            while copied < length:
                count = os.preadv(src, [memoryview(buffer)[: min(len(buffer), length - copied)]], copied)
                if count == 0:
                    raise StorageError(f"place {source}: it has {copied} bytes, expected {length}") from None
                os.pwrite(dest, memoryview(buffer)[:count], offset + copied)
                copied += count
        if os.fstat(src).st_size != length:
            raise StorageError(f"place {source}: it has {os.fstat(src).st_size} bytes, expected {length}")
