"""Spare inodes for the disk adapter's temporary files: empty unnamed files (``O_TMPFILE``) made
ahead of need by a thread, so that a write names one (``linkat``, cheap) instead of allocating
one (which waits on the file system's journal). The fork hooks at the end keep a forked child
from using, or leaking, its parent's spares.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
import time
import weakref

# Spare inodes: how many are kept ready, and how old one may be when it is used (its times are
# those of its making, and a sweep of .incoming judges a file by them: far below any sane grace).
_SPARES = 4
_SPARE_MAX_AGE = 10.0
_SPARE_LINK_FAILURES = 3  # consecutive failures to name a spare before spares are given up...
_SPARE_PAUSE = 60.0  # ...for this many seconds (the cause may pass: a full disk, say)


class SpareInodes:
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
        _ALL_SPARES.add(self)  # for the fork hooks below

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


_ALL_SPARES: weakref.WeakSet[SpareInodes] = weakref.WeakSet()
_HELD_FOR_FORK: list[SpareInodes] = []


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
