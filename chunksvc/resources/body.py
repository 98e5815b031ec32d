"""A part's request body as a ``services.streaming.PartBody``: Falcon's ``req.bounded_stream``.

The stream never yields more than ``Content-Length`` bytes, so a client cannot push bytes of
its next request into this part.

A body that sends nothing for ``idle_timeout`` seconds is abandoned (``IncompleteBody``): a
client that stalls mid-body must not hold a server thread for as long as it likes. gunicorn
hands the application the connection's socket (``gunicorn.socket``), whose timeout bounds each
receive; under a server that does not, only the server's and the proxy's own timeouts apply.
"""

from __future__ import annotations

import socket
from typing import Any

import falcon

from chunksvc.errors import IncompleteBody


class StreamBody:
    """A WSGI input stream: each read is copied into the caller's buffer."""

    def __init__(self, stream: Any, sock: socket.socket | None = None, idle_timeout: float | None = None) -> None:
        self._stream = stream
        self._idle_timeout = idle_timeout
        if sock is not None and idle_timeout is not None:
            # gunicorn makes the socket blocking again (no timeout) before each request on it.
            sock.settimeout(idle_timeout)

    def readinto(self, buffer: memoryview, /) -> int:
        try:
            data = self._stream.read(len(buffer))
        except TimeoutError:
            raise IncompleteBody(f"the request body stalled: no bytes arrived for {self._idle_timeout:g} s") from None
        buffer[: len(data)] = data
        return len(data)


def part_body(req: falcon.Request, idle_timeout: float | None = None) -> StreamBody:
    """The body of ``req``, of which nothing was read yet."""
    return StreamBody(req.bounded_stream, req.env.get("gunicorn.socket"), idle_timeout)
