"""How the disk adapter assembles an object from its parts (``LocalStorage.assemble``): one pass
that reads each part, writes it to the object's file and hashes it, the three overlapping."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

from chunksvc.errors import ObjectMissing, StorageError
from chunksvc.hashing import HashingRing
from chunksvc.storage.base import PartSource, Progress
from chunksvc.storage.syscalls import fs_errors, write_all
from chunksvc.storage.writeback import Flusher

# Assembly moves blocks of at least this size: fewer system calls per byte, memory still flat.
_MIN_ASSEMBLY_BLOCK = 1024 * 1024


def copy_parts(
    fd: int, parts: Sequence[tuple[PartSource, Path]], key: str, block_size: int, progress: Progress | None
) -> tuple[int, str]:
    """Write ``parts`` (each with the path of its file), in order, to the file open as ``fd``
    and fsync it; the bytes written and their SHA-256.

    One pass: each block is read from its part and written to the object by this thread while
    the ring's thread hashes the block before it, so reading, writing and hashing overlap. The
    digest is of exactly the bytes written. Once all is written, the object is flushed to disk
    while the hash catches up (the caller's own fsync then finds nothing left to flush).
    """
    ring = HashingRing(max(block_size, _MIN_ASSEMBLY_BLOCK), progress, name="assemble-hash")
    flusher = Flusher(fd)
    try:
        for src, path in parts:
            copied = 0
            with fs_errors(f"assemble {key} from {src.key}"), _open_part(src, key, path) as part:
                while True:
                    buffer = ring.take()
                    # One byte past the recorded size at most: enough to see a longer part.
                    count = part.readinto(buffer[: min(len(buffer), src.size + 1 - copied)])
                    if not count:
                        ring.give_back(buffer)
                        break
                    write_all(fd, buffer[:count])
                    ring.hashed_later(buffer, count)
                    copied += count
                    flusher.written(count)
            if copied != src.size:
                raise StorageError(f"assemble {key}: part {src.key} has {copied} bytes, expected {src.size}")
        with fs_errors(f"write {key}"):
            flusher.finish()
            os.fsync(fd)
    except BaseException:
        with contextlib.suppress(BaseException):  # the first failure is the one to report
            flusher.finish()
        ring.stop()
        raise
    return ring.finish()


def _open_part(src: PartSource, key: str, path: Path) -> io.BufferedReader:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ObjectMissing(src.key, f"assemble {key}: part {src.key} is missing") from None
