"""The system calls the disk adapter makes (``storage/local.py``, ``storage/inplace.py``), and what
their failures mean to its callers.

Two of them are Linux's and missing from ``os``: ``sync_file_range`` and ``linkat`` on
``/proc/self/fd``, called through ``ctypes`` in the C library, which is loaded once for both.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from chunksvc.errors import StorageError, StorageFull

_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, wait for none
_AT_FDCWD = -100  # <fcntl.h>
_AT_SYMLINK_FOLLOW = 0x400


class fs_errors:
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


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library of this process, its calls setting ``errno`` for ``ctypes.get_errno``;
    None where there is none to load."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def libc_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``start(fd, offset, nbytes)``: Linux's ``sync_file_range(..., SYNC_FILE_RANGE_WRITE)``
    through libc (``os`` has no such call), raising ``OSError`` on failure; None elsewhere."""
    if sys.platform != "linux" or (libc := _libc()) is None:
        return None
    try:
        function = libc.sync_file_range
    except AttributeError:  # a libc without the call
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        if function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return start


def libc_link_descriptor() -> Callable[[int, str], None] | None:
    """``link(fd, path)``: give the file open as ``fd`` (an unnamed ``O_TMPFILE`` one) the name
    ``path``, through ``linkat`` on ``/proc/self/fd/<fd>`` (``os.link`` does not follow that
    link); None where there is no such call, no ``O_TMPFILE`` or no ``/proc``."""
    if sys.platform != "linux" or not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    if (libc := _libc()) is None:
        return None
    try:
        function = libc.linkat
    except AttributeError:
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
    function.restype = ctypes.c_int

    def link(fd: int, path: str) -> None:
        source = f"/proc/self/fd/{fd}".encode()
        if function(_AT_FDCWD, source, _AT_FDCWD, os.fsencode(path), _AT_SYMLINK_FOLLOW) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)

    return link
