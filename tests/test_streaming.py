"""Receiving a part's body (services.streaming, resources.body): exact length, digest, early ends,
bounded buffers. The gunicorn socket path is exercised end to end in test_memory and test_server."""

from __future__ import annotations

import hashlib
import io

import pytest

from chunksvc.errors import IncompleteBody
from chunksvc.resources.body import StreamBody
from chunksvc.services.streaming import READ_AHEAD_DEPTH, BufferPool, HashingBodyReader
from tests.helpers import payload

BLOCK = 4096


class Body:
    """A ``PartBody`` over bytes, delivering at most ``chunk`` bytes per call, then maybe failing."""

    def __init__(self, data: bytes, chunk: int = 1000, fail_with: BaseException | None = None) -> None:
        self._data = memoryview(data)
        self._chunk = chunk
        self._fail_with = fail_with
        self.delivered = 0

    def readinto(self, buffer: memoryview, /) -> int:
        if not self._data and self._fail_with is not None:
            raise self._fail_with
        count = min(len(buffer), self._chunk, len(self._data))
        buffer[:count] = self._data[:count]
        self._data = self._data[count:]
        self.delivered += count
        return count


def read_all(reader: HashingBodyReader, size: int) -> bytes:
    out = bytearray()
    while block := reader.read(size):
        assert len(block) <= size
        out += block
    return bytes(out)


@pytest.mark.parametrize("length", [1, BLOCK, BLOCK + 1, 10 * BLOCK + 7], ids=["1B", "one-block", "two", "many"])
@pytest.mark.parametrize("read_size", [BLOCK, 1000, -1], ids=["block", "smaller", "any"])
def test_reads_exactly_length_bytes_and_hashes_them(length: int, read_size: int) -> None:
    data = payload(length + 50)  # the body has more than the part: it must not be read
    pool = BufferPool(BLOCK, keep=8)
    with HashingBodyReader(Body(data), length, pool) as reader:
        received = read_all(reader, read_size) if read_size > 0 else b"".join(bytes(b) for b in iter(reader.read, b""))
        assert reader.complete
        assert reader.hexdigest() == hashlib.sha256(data[:length]).hexdigest()
        assert reader.digest() == hashlib.sha256(data[:length]).digest()
    assert received == data[:length]


def test_body_ending_early_is_incomplete_body() -> None:
    body = Body(payload(10 * BLOCK))
    pool = BufferPool(BLOCK, keep=8)
    with HashingBodyReader(body, 20 * BLOCK, pool) as reader, pytest.raises(IncompleteBody):
        read_all(reader, BLOCK)
    assert len(pool._idle) == READ_AHEAD_DEPTH  # its threads stopped and gave every buffer back


@pytest.mark.parametrize("length", [BLOCK // 2, 10 * BLOCK], ids=["in-caller", "threaded"])
def test_read_error_is_incomplete_body_with_its_cause(length: int) -> None:
    error = ConnectionResetError("peer gone")
    body = Body(payload(length // 2), fail_with=error)
    with HashingBodyReader(body, length, BufferPool(BLOCK, keep=8)) as reader:
        with pytest.raises(IncompleteBody) as raised:
            read_all(reader, BLOCK)
        assert raised.value.__cause__ is error


def test_stopping_early_stops_receiving_and_returns_the_buffers() -> None:
    pool = BufferPool(BLOCK, keep=8)
    body = Body(payload(100 * BLOCK))
    with HashingBodyReader(body, 100 * BLOCK, pool) as reader:
        reader.read(BLOCK)  # the storage write failed after the first block, say
    assert body.delivered <= READ_AHEAD_DEPTH * BLOCK  # the receiver read no further than its buffers
    assert len(pool._idle) == READ_AHEAD_DEPTH


def test_memory_is_a_few_blocks_whatever_the_length() -> None:
    pool = BufferPool(BLOCK, keep=64)
    with HashingBodyReader(Body(payload(1000 * BLOCK), chunk=BLOCK), 1000 * BLOCK, pool) as reader:
        read_all(reader, BLOCK)
    # The pool started empty: what came back is every buffer the reader ever had.
    assert len(pool._idle) == READ_AHEAD_DEPTH
    with HashingBodyReader(Body(payload(10)), 10, pool) as reader:
        read_all(reader, BLOCK)
    assert len(pool._idle) == READ_AHEAD_DEPTH  # a one-block body borrowed one and gave it back


def test_pool_keeps_at_most_keep_buffers() -> None:
    pool = BufferPool(BLOCK, keep=2)
    pool.give_back(pool.take(5))
    assert len(pool._idle) == 2


def test_stream_body_copies_from_any_wsgi_input() -> None:
    body = StreamBody(io.BytesIO(b"abcdef"))
    buffer = memoryview(bytearray(4))
    assert body.readinto(buffer) == 4 and bytes(buffer) == b"abcd"
    assert body.readinto(buffer) == 2 and bytes(buffer[:2]) == b"ef"
    assert body.readinto(buffer) == 0
