"""A local copy of part bodies sent straight into a staged object (``StagedObject.write``), kept
until the hash frontier has passed them.

Why: a part written as a piece of a multipart upload cannot be read back until the upload is
completed, yet the whole-file SHA-256 needs every byte in order, and parts arrive in any order.
So the body is written here first (hashed on the way), sent from here, and read from here again
when the frontier reaches it. It is a cache, not storage: nothing here is fsynced, and a copy that
is gone (another host took the part, the machine restarted) only costs a read-back of the object
at completion (``services.completion``). The piece in the store is what is durable.

Files are named by the piece's storage key under the spill directory, so that a session's copies
are one directory (``remove_prefix``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from chunksvc.storage.base import Readable, check_key, check_prefix, read_exact_blocks

# Bytes a local copy leaves free on its file system (CHUNKSVC_STORAGE_MIN_FREE): past it, parts go
# the usual way (their own key in the store), so a full spill disk slows uploads, never fails them.
KEEP_FREE = 256 * 1024 * 1024


class Spill:
    def __init__(self, directory: Path, keep_free: int = KEEP_FREE) -> None:
        self._directory = directory
        self._keep_free = keep_free

    def has_room(self, length: int) -> bool:
        """Whether a copy of ``length`` bytes leaves the spill's file system its free margin.
        Copies stay until the frontier passes them, so one session whose first part comes last
        can hold its whole object here; and a file system that cannot say has no room."""
        where = self._directory
        while not where.exists() and where != where.parent:
            where = where.parent  # made at the first copy
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            return False
        return free - length >= self._keep_free

    def __repr__(self) -> str:
        return f"Spill({str(self._directory)!r})"

    def write(self, key: str, reader: Readable, length: int, block_size: int) -> None:
        """Exactly ``length`` bytes of ``reader`` under ``key``; nothing left on any error."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            with open(partial, "wb", buffering=0) as file:
                for block in read_exact_blocks(reader, length, block_size):
                    file.write(block)
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise

    def open(self, key: str) -> BinaryIO | None:
        """The copy under ``key``, or None if there is none here."""
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            return None

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def remove_prefix(self, prefix: str) -> None:
        """Every copy under ``prefix`` (a session's parts prefix, ending with ``/``)."""
        shutil.rmtree(self._directory / check_prefix(prefix), ignore_errors=True)

    def sweep(self, older_than: float) -> int:
        """Copies last written more than ``older_than`` seconds ago (of sessions that ended on
        another host, say); how many were removed."""
        removed = 0
        cutoff = time.time() - older_than
        # Directories no entry came into or left since the cutoff, as they were before this sweep:
        # once emptied they go too (rmdir refuses one that is not), deepest first.
        idle = []
        if self._directory.is_dir():
            for directory in self._directory.rglob("*"):
                with contextlib.suppress(OSError):
                    if directory.is_dir() and directory.stat().st_mtime < cutoff:
                        idle.append(directory)
        for path in self._files():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        for directory in sorted(idle, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        return removed

    def _files(self) -> Iterator[Path]:
        if self._directory.is_dir():
            yield from (path for path in self._directory.rglob("*") if path.is_file())

    def _path(self, key: str) -> Path:
        return self._directory / check_key(key)
