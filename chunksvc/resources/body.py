"""A part's request body as a ``services.streaming.PartBody``: exactly ``Content-Length`` bytes.

A client cannot push bytes of its next request into this part: neither reader gives more than
``Content-Length`` bytes.

Under gunicorn the body is received straight from the connection's socket into the part's
buffers (``SocketBody``). gunicorn's own reader (``wsgi.input``) copies each byte three or four
times on the way (a read-ahead buffer, slices of it, a buffer of its own) before the part's
buffer gets it: a tenth of a worker's time when 8 MiB parts stream (py-spy). Anywhere else, or
when gunicorn's reader is not the kind this knows, Falcon's ``req.bounded_stream`` is read
(``StreamBody``).

A body that sends nothing for ``idle_timeout`` seconds is abandoned (``IncompleteBody``): a
client that stalls mid-body must not hold a server thread for as long as it likes. gunicorn
hands the application the connection's socket (``gunicorn.socket``), whose timeout bounds each
receive; under a server that does not, only the server's and the proxy's own timeouts apply.
"""

from __future__ import annotations

import io
import socket
import ssl
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


class SocketBody:
    """A body of known length received from gunicorn's socket with ``recv_into``.

    gunicorn reads ahead: the first bytes of the body usually arrived with the request head and
    wait in its buffer. Those are handed out first (only up to the body's length: bytes beyond it
    are the next request's and stay buffered), then the rest is received into the caller's buffer.
    gunicorn's reader is kept in step with every byte handed out (its buffer and its remaining
    length), so whether the body was read to its end or abandoned, gunicorn drains exactly what is
    left of it, and the connection's next request starts where it should. A receive that fails
    marks gunicorn's reader as failed, as its own failure would: the connection is then closed,
    not reused.
    """

    def __init__(self, wsgi_input: Any, sock: socket.socket, idle_timeout: float | None) -> None:
        self._input = wsgi_input
        self._reader = wsgi_input.reader
        self._sock = sock
        self._idle_timeout = idle_timeout
        self._unreader = self._reader.unreader
        if idle_timeout is not None:
            sock.settimeout(idle_timeout)  # gunicorn makes it blocking again before the next request

    @classmethod
    def of(cls, req: falcon.Request, idle_timeout: float | None) -> SocketBody | None:
        """The body of ``req`` read from gunicorn's socket, or None where that cannot be done
        safely: not gunicorn, a body without a length (chunked), or one already read from."""
        wsgi_input: Any = req.env.get("wsgi.input")
        sock: object = req.env.get("gunicorn.socket")
        if not isinstance(sock, socket.socket):
            return None
        reader = getattr(wsgi_input, "reader", None)
        unreader = getattr(reader, "unreader", None)
        reads_this_socket = getattr(unreader, "sock", None) is sock
        if (
            type(reader).__name__ != "LengthReader"
            or not reads_this_socket
            or not isinstance(getattr(unreader, "buf", None), io.BytesIO)
            or not isinstance(getattr(reader, "length", None), int)
            or not isinstance(getattr(wsgi_input, "buf", None), io.BytesIO)
            or wsgi_input.buf.getbuffer().nbytes  # gunicorn's reader holds bytes already read
        ):
            return None
        return cls(wsgi_input, sock, idle_timeout)

    def readinto(self, buffer: memoryview, /) -> int:
        want: int = min(len(buffer), self._reader.length)
        if want <= 0:
            return 0
        if self._unreader.buf.getbuffer().nbytes:  # read ahead with the head: a few KiB at most
            ahead = self._unreader.buf.getvalue()
            count = min(want, len(ahead))
            buffer[:count] = ahead[:count]
            self._unreader.buf = io.BytesIO()
            self._unreader.buf.write(ahead[count:])
        else:
            try:
                count = self._sock.recv_into(buffer, want)
            except TimeoutError:
                self._input.failed = True
                raise IncompleteBody(
                    f"the request body stalled: no bytes arrived for {self._idle_timeout:g} s"
                ) from None
            except OSError:
                self._input.failed = True
                raise
            if not count:
                self._input.failed = True  # the client closed its side mid-body
                return 0
        self._reader.length -= count
        if not self._reader.length and isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            # The body's last TLS record also held the start of the next request, decrypted and
            # held by OpenSSL: neither on the socket (gunicorn's poller would not see it, and
            # would wait for bytes that already came) nor in gunicorn's buffer. Put it there.
            self._unreader.buf.seek(0, io.SEEK_END)
            self._unreader.buf.write(self._sock.recv(self._sock.pending()))
        return count


def part_body(req: falcon.Request, idle_timeout: float | None = None) -> SocketBody | StreamBody:
    """The body of ``req``, of which nothing was read yet."""
    return SocketBody.of(req, idle_timeout) or StreamBody(
        req.bounded_stream, req.env.get("gunicorn.socket"), idle_timeout
    )
