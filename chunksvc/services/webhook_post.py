"""One webhook attempt on the wire: the signed event POSTed, within one deadline for the whole
exchange up to the answer's head."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
import urllib.parse
from uuid import UUID

from chunksvc.services.webhook_signing import SIGNATURE_HEADER


def post(url: str, body: bytes, signature: str, event_id: UUID, timeout: float) -> tuple[int | None, str | None]:
    """POST the event; ``(status, None)`` when the endpoint answered within ``timeout`` seconds
    (the whole exchange up to the answer's head), else ``(None, what went wrong)``."""
    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    connection: http.client.HTTPConnection
    # The port always given: with none, http.client would read "::1" (an IPv6 literal) as host:port.
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port or 443, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    late = f"no answer within {timeout:g} s"
    stopwatch: threading.Timer | None = None

    def within_deadline() -> None:
        """Each step's socket timeout is what is left of the attempt's ``timeout``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(late)
        if connection.sock is not None:
            connection.sock.settimeout(remaining)

    try:
        connection.connect()
        within_deadline()
        # A receiver that trickles its answer a byte at a time stays within every socket
        # timeout; at the deadline the socket is shut, which ends any read or write on it.
        stopwatch = threading.Timer(deadline - time.monotonic(), _shut, (connection,))
        stopwatch.daemon = True
        stopwatch.start()
        connection.request(
            "POST",
            target,
            body=body,
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: signature,
                "Chunksvc-Event-Id": str(event_id),
                "User-Agent": "chunksvc-webhooks/1",
                "Connection": "close",
            },
        )
        within_deadline()
        # The status decides; the answer's body is not read (a receiver that sends a 2xx
        # head and then holds the connection has still answered).
        status = connection.getresponse().status
        if time.monotonic() > deadline:
            return None, late
        return status, None
    except TimeoutError:
        return None, late
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline:
            return None, late  # the stopwatch shut the socket
        return None, f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if stopwatch is not None:
            stopwatch.cancel()
        connection.close()


def _shut(connection: http.client.HTTPConnection) -> None:
    with contextlib.suppress(OSError):
        if connection.sock is not None:
            connection.sock.shutdown(socket.SHUT_RDWR)
