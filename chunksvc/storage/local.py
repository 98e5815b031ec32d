"""Storage in a local directory: ``<root>/<key>``, written crash-safely.

Every object is written to ``<root>/.incoming/<uuid>``, fsynced, then renamed into place and
its directory fsynced, so after a crash a key holds either nothing or all of its bytes.
Leftovers of a crash stay in ``.incoming`` (never listed as keys).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

from chunksvc.config import Limits
from chunksvc.errors import ConfigError, ObjectMissing, StorageError, StorageFull, StorageUnavailable
from chunksvc.storage.base import (
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
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})

T = TypeVar("T")


@contextlib.contextmanager
def _fs_errors(action: str) -> Iterator[None]:
    """Turn file-system failures into ``StorageError`` (messages name keys, not server paths),
    or ``StorageFull`` when the disk or a quota has no room left."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            raise StorageFull(f"{action}: no space left on the storage") from exc
        raise StorageError(f"{action}: {exc.strerror or exc}") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_into(source_fd: int, dest_fd: int, length: int) -> int:
    """Append ``source_fd``'s bytes (from its start) to ``dest_fd`` at its position; how many it
    had (fewer than ``length`` if it is short; one more than ``length`` if it is longer)."""
    copied = 0
    try:
        while copied <= length:
            count = os.copy_file_range(source_fd, dest_fd, length + 1 - copied)
            if not count:
                return copied
            copied += count
        return copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or copied:
            raise
    # No in-kernel copy between these files (another file system, an old kernel): a plain one.
    with os.fdopen(os.dup(source_fd), "rb", buffering=0) as source:
        while copied <= length and (block := source.read(min(_COPY_BLOCK, length + 1 - copied))):
            os.write(dest_fd, block)
            copied += len(block)
    return copied


_COPY_BLOCK = 1024 * 1024


class _TrailingHasher(threading.Thread):
    """Hashes a file's bytes as they are appended, reading them back a block at a time."""

    def __init__(self, fd: int, block_size: int, progress: Progress | None) -> None:
        super().__init__(name="assemble-hash", daemon=True)
        self._fd = fd
        self._block_size = max(block_size, _COPY_BLOCK)
        self._progress = progress
        self._digest = hashlib.sha256()
        self._available = 0  # bytes copied so far
        self._hashed = 0
        self._done = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()

    def copied(self, count: int) -> None:
        with self._changed:
            self._available += count
            self._changed.notify()

    def finish(self) -> None:
        with self._changed:
            self._done = True
            self._changed.notify()
        self.join()

    def result(self) -> tuple[int, str]:
        if self._error is not None:
            raise self._error
        return self._hashed, self._digest.hexdigest()

    def run(self) -> None:
        buffer = memoryview(bytearray(self._block_size))
        try:
            while True:
                with self._changed:
                    while self._hashed == self._available and not self._done:
                        self._changed.wait()
                    available, done = self._available, self._done
                while self._hashed < available:
                    want = min(self._block_size, available - self._hashed)
                    count = os.preadv(self._fd, [buffer[:want]], self._hashed)
                    if not count:
                        raise OSError(errno.EIO, "the object is shorter than what was copied into it")
                    self._digest.update(buffer[:count])
                    self._hashed += count
                    if self._progress:
                        self._progress(self._hashed)
                if done and self._hashed == available:
                    return
        except BaseException as exc:  # raised again by result(), in the assembling thread
            self._error = exc


class LocalStorage(Storage):
    kind = "file"

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._incoming = self._root / INCOMING
        try:
            self._incoming.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"storage root {self._root}: cannot create it or its {INCOMING} directory ({exc.strerror or exc})"
            ) from exc

    def __repr__(self) -> str:
        return f"LocalStorage({str(self._root)!r})"

    def validate_limits(self, limits: Limits) -> None:
        """A directory has no part-count or object-size limit of its own."""

    def write(self, key: str, reader: Readable, length: int, block_size: int) -> None:
        def fill(f: BinaryIO) -> None:
            # Only the file writes are translated: the reader's own exceptions propagate as-is.
            for block in read_exact_blocks(reader, length, block_size):
                with _fs_errors(f"write {key}"):
                    f.write(block)

        self._store(check_key(key), fill)

    def assemble(
        self, sources: Sequence[PartSource], key: str, block_size: int, progress: Progress | None = None
    ) -> StoredObject:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        paths = [(src, self._path(src.key)) for src in sources]

        def fill(f: BinaryIO) -> tuple[int, str]:
            # The copy stays in the kernel (copy_file_range) while another thread hashes what has
            # been copied, reading the object back: the digest is of the bytes as stored. Once
            # copied, the object is flushed to disk while the hash catches up: copying, hashing
            # and the one fsync overlap instead of taking turns.
            hasher = _TrailingHasher(f.fileno(), block_size, progress)
            hasher.start()
            try:
                for src, path in paths:
                    with _fs_errors(f"assemble {key} from {src.key}"), self._open_source(src, key, path) as part:
                        copied = _copy_into(part.fileno(), f.fileno(), src.size)
                    if copied != src.size:
                        raise StorageError(f"assemble {key}: part {src.key} has {copied} bytes, expected {src.size}")
                    hasher.copied(copied)
                with _fs_errors(f"write {key}"):
                    os.fsync(f.fileno())  # _store's own fsync then finds nothing left to flush
            finally:
                hasher.finish()
            with _fs_errors(f"assemble {key}"):
                return hasher.result()

        size, sha256 = self._store(check_key(key), fill)
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

    def sweep_incomplete(self, older_than: datetime, dry_run: bool = False) -> int:
        """Remove temporary files in ``.incoming`` last written before ``older_than``.

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
        return count

    def free_bytes(self) -> int | None:
        """Bytes an unprivileged writer can still store under the root."""
        with _fs_errors("free space"):
            stats = os.statvfs(self._root)
        return stats.f_bavail * stats.f_frsize

    def describe(self, stored: StoredObject) -> dict:
        return {"key": stored.key, "size": stored.size, "sha256": stored.sha256}

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
    def _open_source(src: PartSource, key: str, path: Path) -> BinaryIO:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ObjectMissing(src.key, f"assemble {key}: part {src.key} is missing") from None

    def _path(self, key: str) -> Path:
        return self._root / check_key(key)

    def _store(self, key: str, fill: Callable[[BinaryIO], T]) -> T:
        """Run ``fill`` on a fresh temporary file, then make it durable and move it to ``key``."""
        dest = self._root / key
        tmp = self._incoming / uuid.uuid4().hex
        try:
            with _fs_errors(f"write {key}"):
                # Read and write: an assembly reads the object back to hash it as stored.
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            with open(fd, "wb") as f:
                result = fill(f)
                with _fs_errors(f"write {key}"):
                    f.flush()
                    os.fsync(f.fileno())
            with _fs_errors(f"write {key}"):
                self._make_dirs(dest.parent)
                os.replace(tmp, dest)
                try:
                    _fsync_dir(dest.parent)
                except OSError:
                    # Not durable, so not stored: keep "nothing under key on failure" true.
                    dest.unlink(missing_ok=True)
                    raise
        except BaseException:
            with contextlib.suppress(OSError):  # do not hide the original failure
                tmp.unlink(missing_ok=True)
            raise
        return result

    def _make_dirs(self, directory: Path) -> None:
        """Create missing directories below the root, fsyncing each parent so they survive a crash."""
        missing = []
        while directory != self._root and not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for new in reversed(missing):
            try:
                new.mkdir()
            except FileExistsError:
                continue  # a concurrent writer made it
            _fsync_dir(new.parent)
