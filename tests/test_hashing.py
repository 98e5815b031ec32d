"""Hashing while doing I/O (chunksvc.hashing): the one pipeline the part's body, a local assembly
and a read-back share. Each user has its own tests (test_streaming, test_storage_local,
test_storage_contract); these pin the pieces themselves: order, short reads, failures, threads."""

from __future__ import annotations

import hashlib
import queue
import threading

import pytest

from chunksvc.hashing import HashingRing, HashThread, hash_stream
from tests.helpers import payload


class Trickle:
    """A reader that gives at most ``chunk`` bytes per ``readinto``, as a socket or a response does."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._data = memoryview(data)
        self._chunk = chunk
        self.reads = 0

    def readinto(self, buffer: memoryview, /) -> int:
        self.reads += 1
        count = min(len(buffer), self._chunk, len(self._data))
        buffer[:count] = self._data[:count]
        self._data = self._data[count:]
        return count


def hash_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("test-hash")]


@pytest.mark.parametrize("chunk", [1, 999, 4096, 100_000])
def test_hash_stream_hashes_every_byte_in_order_whatever_the_reads_give(chunk):
    data = payload(50_000, seed=chunk)
    size, sha256 = hash_stream(Trickle(data, chunk), 4096, name="test-hash")
    assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert hash_threads() == []


def test_hash_stream_of_nothing_is_the_empty_digest():
    assert hash_stream(Trickle(b"", 10), 4096) == (0, hashlib.sha256().hexdigest())


def test_a_check_that_raises_stops_the_stream_and_its_thread():
    data = payload(64 * 4096)
    source = Trickle(data, 4096)

    def check() -> None:
        if source.reads == 5:
            raise TimeoutError("lease lost")

    with pytest.raises(TimeoutError, match="lease lost"):
        hash_stream(source, 4096, check, name="test-hash")
    assert source.reads == 5  # no read after the check refused
    assert hash_threads() == []


def test_a_ring_holds_only_its_buffers_and_reuses_them():
    ring = HashingRing(4096, depth=2, name="test-hash")
    seen = set()
    data = payload(20 * 4096)
    for start in range(0, len(data), 4096):
        buffer = ring.take()
        seen.add(id(buffer.obj))
        buffer[:4096] = data[start : start + 4096]
        ring.hashed_later(buffer, 4096)
    assert ring.finish() == (len(data), hashlib.sha256(data).hexdigest())
    assert len(seen) == 2


def test_a_hashing_failure_reaches_the_caller_at_its_next_take_and_at_finish():
    failed = threading.Event()

    def progress(count: int) -> None:
        failed.set()
        raise RuntimeError(f"progress refused at {count}")

    ring = HashingRing(16, progress, depth=2, name="test-hash")
    buffer = ring.take()
    ring.hashed_later(buffer, 16)
    failed.wait(5)
    with pytest.raises(RuntimeError, match="progress refused at 16"):
        for _ in range(3):  # the failed block's buffer comes back first; the next take raises
            ring.take()
    with pytest.raises(RuntimeError, match="progress refused"):
        ring.finish()


def test_stop_after_the_callers_failure_ends_the_thread_and_raises_nothing():
    def progress(count: int) -> None:
        raise RuntimeError("the thread's own failure")

    ring = HashingRing(16, progress, depth=2, name="test-hash")
    ring.hashed_later(ring.take(), 16)
    ring.stop()
    assert hash_threads() == []


def test_a_hash_thread_computes_each_algorithm_over_blocks_hashed_here_and_in_the_background():
    hashed: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
    hasher = HashThread(hashed, ("sha256", "md5", "sha256"), name="test-hash")
    first, second = memoryview(bytearray(b"a" * 100)), memoryview(bytearray(b"b" * 50))
    hasher.update_here(b"start")
    hasher.update(first, 100)
    hasher.update(second, 10)  # only the first 10 bytes count
    assert hashed.get(timeout=5) is first and hashed.get(timeout=5) is second  # back in order
    expected = b"start" + b"a" * 100 + b"b" * 10
    assert hasher.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert hasher.digest("md5") == hashlib.md5(expected).digest()
    assert hasher.count == len(expected)
