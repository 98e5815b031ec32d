"""Hashing while doing I/O: blocks hashed in a thread of their own while the caller reads or
writes the next ones.

Why one module: a part's body as it arrives (``services.streaming``), a local assembly as it is
copied (``storage.local_assembly``) and an object read back to check it (``storage.s3``,
``services.completion``) all hash every byte they move. SHA-256 and file or socket I/O both
release the GIL, so two threads overlap them and the pass takes about as long as the slower of
the two, not their sum. Each used to carry its own thread and queues for this.

- ``HashThread``: the hashing half. Buffers handed over are hashed in order, and each is put
  into the caller's queue once hashed, so the caller reuses it: memory stays a few blocks.
- ``HashingRing``: a few buffers going round between a caller that fills them and the thread.
- ``hash_stream``: everything a reader gives, read into the ring and hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Protocol

Progress = Callable[[int], None]  # called with the bytes hashed so far

# Buffers in a ring: one being filled, one hashed, two to ride out a moment's stall of either.
RING_DEPTH = 4


class HashThread:
    """Hashes the blocks handed to it (``update``), in order, in a thread of its own, started at
    the first block; each buffer goes into ``hashed`` once its block is hashed."""

    def __init__(
        self,
        hashed: queue.SimpleQueue[memoryview],
        algorithms: Iterable[str] = ("sha256",),
        progress: Progress | None = None,
        name: str = "hash",
    ) -> None:
        self._hashes = {algorithm: hashlib.new(algorithm) for algorithm in dict.fromkeys(algorithms)}
        self._hashed = hashed
        self._progress = progress
        self._name = name
        self._todo: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.count = 0  # bytes hashed
        self.error: BaseException | None = None  # the hashing thread's failure, raised by finish()

    def update(self, buffer: memoryview, count: int) -> None:
        """Hash ``buffer[:count]`` in the background; ``buffer`` comes back through ``hashed``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._todo.put((buffer, count))

    def update_here(self, block: memoryview | bytes) -> None:
        """Hash ``block`` in the caller's thread (a body of one block needs no second thread)."""
        for hasher in self._hashes.values():
            hasher.update(block)
        self.count += len(block)

    def finish(self) -> None:
        """Wait until every block handed over is hashed; raise the hashing thread's failure."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None
        if self.error is not None:
            raise self.error

    def digest(self, algorithm: str = "sha256") -> bytes:
        self.finish()
        return self._hashes[algorithm].digest()

    def hexdigest(self, algorithm: str = "sha256") -> str:
        self.finish()
        return self._hashes[algorithm].hexdigest()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            buffer, count = item
            try:
                if self.error is None:
                    self.update_here(buffer[:count])
                    if self._progress:
                        self._progress(self.count)
            except BaseException as exc:  # raised again by finish(), in the caller's thread
                self.error = exc
            finally:
                self._hashed.put(buffer)


class HashingRing:
    """A few buffers going round: the caller takes a free one (``take``), fills it (and writes
    it, say), and hands it over (``hashed_later``); the hashing thread gives it back once hashed.
    """

    def __init__(
        self, block_size: int, progress: Progress | None = None, depth: int = RING_DEPTH, name: str = "hash"
    ) -> None:
        self.block_size = block_size
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(memoryview(bytearray(block_size)))
        self._hasher = HashThread(self._free, progress=progress, name=name)

    def take(self) -> memoryview:
        """A free buffer; the hashing thread's failure, as soon as there is one."""
        buffer = self._free.get()
        if self._hasher.error is not None:
            self._free.put(buffer)
            raise self._hasher.error
        return buffer

    def hashed_later(self, buffer: memoryview, count: int) -> None:
        self._hasher.update(buffer, count)

    def give_back(self, buffer: memoryview) -> None:
        """A buffer taken but not handed over (the source ended)."""
        self._free.put(buffer)

    def finish(self) -> tuple[int, str]:
        """Wait for the last block; the bytes hashed and their SHA-256 (or the hashing error)."""
        self._hasher.finish()
        return self._hasher.count, self._hasher.hexdigest()

    def stop(self) -> None:
        """After the caller's own failure: the thread ended, and a failure of its dropped, so
        the caller's is the one reported."""
        with contextlib.suppress(BaseException):
            self._hasher.finish()


class ReadsInto(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def hash_stream(
    source: ReadsInto, block_size: int, check: Callable[[], None] | None = None, name: str = "hash"
) -> tuple[int, str]:
    """Every byte ``source`` gives until it ends, hashed while the next block is read: the bytes
    read and their SHA-256. ``check`` is called before each read (it raises to stop)."""
    ring = HashingRing(block_size, name=name)
    try:
        while True:
            if check is not None:
                check()
            buffer = ring.take()
            count = source.readinto(buffer)
            if not count:
                ring.give_back(buffer)
                break
            ring.hashed_later(buffer, count)
    except BaseException:
        ring.stop()
        raise
    return ring.finish()
