"""Storage in a local directory: ``<root>/<key>``, written crash-safely.

Every object is written to ``<root>/.incoming/<random name>``, fsynced, then renamed into place and
its directory fsynced, so after a crash a key holds either nothing or all of its bytes.
Leftovers of a crash stay in ``.incoming`` (never listed as keys).

While a body streams in, the kernel is asked to start writing each block to disk as soon as it
is written (``sync_file_range``, see ``storage/writeback.py``), so the fsync that makes the file
durable finds little left to write. Durability rests on that fsync alone, as before.

Where the system allows, the temporary file's inode is made ahead of need by a thread of its own
(an unnamed ``O_TMPFILE`` file, see ``storage/spares.py``) and given its ``.incoming`` name when a
write starts: allocating an inode waits on the file system's journal, naming one does much less.

An assembly's copy and hash are in ``storage/local_assembly.py``, the system calls (those of libc
through ``ctypes`` among them) in ``storage/syscalls.py``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

from chunksvc.config import Limits
from chunksvc.errors import ConfigError, ObjectMissing, StorageError, StorageUnavailable
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
from chunksvc.storage.local_assembly import copy_parts
from chunksvc.storage.spares import SpareInodes

# The aliases are the names these had before they moved out: what imported them from here still
# can, and a test that replaces one here (``_fsync_dir``) replaces it for this module's calls.
from chunksvc.storage.syscalls import fs_errors as _fs_errors
from chunksvc.storage.syscalls import fsync_dir as _fsync_dir
from chunksvc.storage.syscalls import libc_link_descriptor
from chunksvc.storage.syscalls import write_all as _write_all
from chunksvc.storage.writeback import WriteBehind as _WriteBehind

INCOMING = ".incoming"

T = TypeVar("T")

#: None where unnamed files cannot be named later; a test may replace it.
_link_descriptor = libc_link_descriptor()


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._incoming = self._root / INCOMING
        # As text too: the part path joins them with a key per request (pathlib costs more).
        self._root_text = str(self._root)
        self._incoming_text = str(self._incoming)
        self._spares: SpareInodes | None = None
        if _link_descriptor is not None:
            self._spares = SpareInodes(self._incoming_text)
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
            # No write-behind: copy_parts has a Flusher write the object to disk as it grows.
            return copy_parts(fd, paths, key, block_size, progress)

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
        is ready (see ``SpareInodes``), else a file created there now."""
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
