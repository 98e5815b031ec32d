"""Receiving a part's body: exactly ``length`` bytes, hashed, in blocks, with flat memory.

A body longer than one block goes through a pipeline of three threads over a small ring of
reusable buffers: a helper receives block ``n + 1`` while another (``chunksvc.hashing``) hashes
block ``n`` and the caller (the storage adapter) writes it. Socket reads, SHA-256 and file or
socket writes all release the GIL, so the three overlap instead of taking turns. Memory is
``depth`` blocks, whatever the part's size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from typing import Protocol

from chunksvc.errors import IncompleteBody
from chunksvc.hashing import HashThread

# Blocks in flight per part: one being received, one hashed, one written, one spare to ride out
# a moment's stall of any stage.
READ_AHEAD_DEPTH = 4


class PartBody(Protocol):
    """A request body as the HTTP layer hands it over."""

    def readinto(self, buffer: memoryview, /) -> int:
        """Fill the start of ``buffer``; return how many bytes (0: the body ended)."""


class BufferPool:
    """Block buffers kept for reuse: fresh ones are zero-filled and faulted in for every part."""

    def __init__(self, block_size: int, keep: int) -> None:
        self.block_size = block_size
        self._keep = keep
        self._idle: list[memoryview] = []
        self._lock = threading.Lock()

    def take(self, count: int) -> list[memoryview]:
        with self._lock:
            taken = [self._idle.pop() for _ in range(min(count, len(self._idle)))]
        return taken + [memoryview(bytearray(self.block_size)) for _ in range(count - len(taken))]

    def give_back(self, buffers: list[memoryview]) -> None:
        with self._lock:
            self._idle.extend(buffers[: max(0, self._keep - len(self._idle))])


class HashingBodyReader:
    """``read(n)`` over exactly ``length`` bytes of ``body``, computing their SHA-256 on the way.

    A block returned by ``read`` is valid until the next call (its buffer is then reused). A body
    that ends early, or whose reading fails, raises ``IncompleteBody`` from ``read``. Use it as a
    context manager: leaving it stops the helper threads, which read no further into an
    unfinished body (a WSGI server drains or drops the unread rest).
    """

    def __init__(
        self,
        body: PartBody,
        length: int,
        buffers: BufferPool,
        depth: int = READ_AHEAD_DEPTH,
        also_hash: Iterable[str] = (),
    ) -> None:
        self._body = body
        self._length = length
        self._pool = buffers
        # A body of one block is received, hashed and handed out by the caller's thread alone.
        self._threaded = length > buffers.block_size
        self._buffers = buffers.take(depth if self._threaded else 1)
        self._free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        for buffer in self._buffers:
            self._free.put(buffer)
        self._filled: queue.SimpleQueue[tuple[memoryview, int] | BaseException] = queue.SimpleQueue()
        self._hashed: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        # SHA-256 always (it names the part); other hashlib algorithms only when asked for
        # (a Content-Digest to verify), so the common path hashes once.
        self._hasher = HashThread(self._hashed, ("sha256", *also_hash), name="part-hash")
        self._received = 0  # written by the receiving thread only
        self._cut: IncompleteBody | None = None  # why the body ended early, once it has
        self._handed_out = 0
        self._current: memoryview | None = None  # the filled buffer being handed out
        self._current_length = 0
        self._offset = 0
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> HashingBodyReader:
        if self._threaded:
            self._threads = [threading.Thread(target=self._receive_all, name="part-receive", daemon=True)]
            for thread in self._threads:
                thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if not self.complete:
            self._free.put(None)  # wakes a receiver waiting for a buffer: it stops receiving
        self._join()
        self._pool.give_back(self._buffers)
        self._buffers = []

    @property
    def complete(self) -> bool:
        return self._handed_out == self._length

    @property
    def handed_out(self) -> int:
        """The bytes ``read`` has returned so far (what the caller has had of the body)."""
        return self._handed_out

    def digest(self, algorithm: str = "sha256") -> bytes:
        self._join()  # the hashing thread may still be on the last block
        return self._hasher.digest(algorithm)

    def hexdigest(self, algorithm: str = "sha256") -> str:
        self._join()
        return self._hasher.hexdigest(algorithm)

    def read(self, size: int = -1, /) -> memoryview:
        if self._current is not None and self._offset == self._current_length:
            self._release(self._current)
            self._current = None
        if self._handed_out == self._length:
            return memoryview(b"")
        if self._current is None:
            item = self._filled.get() if self._threaded else self._receive_block(self._free.get())
            if isinstance(item, BaseException):
                raise item
            self._current, self._current_length = item
            self._offset = 0
            if not self._threaded:
                self._hasher.update_here(self._current[: self._current_length])
        available = self._current_length - self._offset
        take = available if size < 0 else min(size, available)
        block = self._current[self._offset : self._offset + take]
        self._offset += take
        self._handed_out += take
        return block

    def _release(self, buffer: memoryview) -> None:
        """The caller is done with ``buffer``; it is reused once the hashing thread is too."""
        if self._threaded:
            hashed = self._hashed.get()  # blocks come back in the order they went out
            assert hashed is buffer
        self._free.put(buffer)

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._hasher.finish()  # after the receiver: it hands over no more blocks

    def _receive_all(self) -> None:
        """The receiving thread: fill free buffers in order until the body is in, or stop."""
        while self._received < self._length:
            item = self._receive_block(self._free.get())
            self._filled.put(item)
            if isinstance(item, BaseException):
                return
            self._hasher.update(*item)

    def _receive_block(self, buffer: memoryview | None) -> tuple[memoryview, int] | BaseException:
        """``buffer`` filled with the next bytes of the body (as many as fit), or the failure."""
        if buffer is None:  # close(): stop receiving
            return IncompleteBody("the request body was abandoned")
        if self._cut is not None:
            return self._cut
        want = min(len(buffer), self._length - self._received)
        filled = 0
        try:
            while filled < want:
                count = self._body.readinto(buffer[filled:want])
                if not count:
                    missing = self._length - self._received - filled
                    self._cut = IncompleteBody(f"the request body ended {missing} bytes early")
                    break
                filled += count
        except IncompleteBody as exc:  # the body's own verdict (a stalled client, say)
            self._cut = exc
        except (OSError, ValueError) as exc:
            self._cut = IncompleteBody("the request body could not be read to its end")
            self._cut.__cause__ = exc
        if self._cut is not None and not filled:
            return self._cut
        # What arrived before a cut is handed out first (a caller may keep it: tus does); the
        # next receive is the cut.
        self._received += filled
        return buffer, filled
