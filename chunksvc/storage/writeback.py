"""Getting a file's bytes to disk while it is still being written, so that the fsync which makes
it durable finds little left to write: ``WriteBehind`` for a streaming write (a part, a range
written in place), ``Flusher`` for an assembly. Durability rests on that fsync alone."""

from __future__ import annotations

import contextlib
import errno
import os
import threading

from chunksvc.storage.syscalls import libc_sync_file_range

# Write-behind asks for at least this many written bytes at a time.
_WRITE_BEHIND_MIN = 1024 * 1024
# sync_file_range's answers that mean "not for this file or system" (no such call, a file system
# or file type it does not apply to): nothing was started, nothing is lost by going on without it.
_WRITE_BEHIND_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE})

#: None where the call does not exist; a test may replace it.
_start_writeback = libc_sync_file_range()


class WriteBehind:
    """Starts the kernel writing a file's bytes to disk while the rest is still being written,
    so the final fsync finds little left and the disk works while the body streams.

    ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` queues the written range for writeback and returns:
    unlike a periodic ``fdatasync`` (``Flusher``) it waits for no device and flushes no metadata
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


class Flusher:
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
