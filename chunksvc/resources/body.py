"""A part's request body as a ``services.streaming.PartBody``: Falcon's ``req.bounded_stream``.

The stream never yields more than ``Content-Length`` bytes, so a client cannot push bytes of
its next request into this part.
"""

from __future__ import annotations

from typing import Any

import falcon


class StreamBody:
    """A WSGI input stream: each read is copied into the caller's buffer."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def readinto(self, buffer: memoryview, /) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def abandon(self) -> None:
        """A WSGI input cannot be interrupted; the server drains or drops the unread rest."""


def part_body(req: falcon.Request) -> StreamBody:
    """The body of ``req``, of which nothing was read yet."""
    return StreamBody(req.bounded_stream)
