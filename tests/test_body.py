"""resources.body against the gunicorn this project pins: its request objects over a real socket
pair, so a gunicorn whose reader changed shape is noticed here (the part path would silently fall
back to the slower ``StreamBody``), and the bytes around a body stay where gunicorn looks for them."""

from __future__ import annotations

import io
import os
import socket
import ssl
import threading
import types
from typing import Any, cast

import falcon
import pytest
from gunicorn.config import Config
from gunicorn.http import RequestParser

from chunksvc.errors import IncompleteBody
from chunksvc.resources.body import SocketBody, StreamBody, part_body
from tools.nginx import throwaway_certificate


def _parsed(sock: socket.socket) -> tuple[RequestParser, Any]:
    """gunicorn's parser over ``sock`` and the first request it reads (gunicorn ships no types)."""
    parser = RequestParser(Config(), sock, ("127.0.0.1", 1))
    return parser, next(parser)


def _as_request(stand_in: types.SimpleNamespace) -> falcon.Request:
    """A stand-in for a Falcon request with only what ``part_body`` reads of one."""
    return cast(falcon.Request, stand_in)


def _request(gunicorn_request: Any, sock: socket.socket) -> falcon.Request:
    """What ``part_body`` reads of a Falcon request: its WSGI environ, as gunicorn builds it."""
    return _as_request(types.SimpleNamespace(env={"wsgi.input": gunicorn_request.body, "gunicorn.socket": sock}))


def _read_all(body: SocketBody | StreamBody, length: int, block: int = 64 * 1024) -> bytes:
    buffer, received = memoryview(bytearray(block)), bytearray()
    while len(received) < length:
        count = body.readinto(buffer)
        if not count:
            break
        received += buffer[:count]
    return bytes(received)


def test_the_body_and_the_next_request_are_each_where_they_belong() -> None:
    """A body that came whole with its head, and the next request's bytes with it: the body is
    handed out, the next request is left for gunicorn's parser."""
    client, server = socket.socketpair()
    with client, server:
        client.sendall(
            b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        parser, first = _parsed(server)
        body = SocketBody.of(_request(first, server), idle_timeout=5)
        assert body is not None, "gunicorn's reader is not the kind SocketBody knows"
        assert _read_all(body, 10) == b"0123456789"
        assert body.readinto(memoryview(bytearray(8))) == 0
        second = next(parser)
        assert (second.method, second.path) == ("GET", "/b")


def test_a_large_body_is_received_from_the_socket_past_the_read_ahead() -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    client, server = socket.socketpair()
    with client, server:
        head = f"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        sender = threading.Thread(target=client.sendall, args=(head + data + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n",))
        sender.start()
        parser, first = _parsed(server)
        body = part_body(_request(first, server), idle_timeout=5)
        assert isinstance(body, SocketBody)
        assert _read_all(body, len(data), block=1024 * 1024) == data
        sender.join()
        assert next(parser).path == "/b"


def test_an_abandoned_body_leaves_gunicorn_the_rest_to_drain() -> None:
    """Half read, then abandoned (a storage failure, say): gunicorn's drain before the next
    request must consume exactly the unread rest, read-ahead included."""
    client, server = socket.socketpair()
    with client, server:
        client.sendall(
            b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabcdefGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        parser, first = _parsed(server)
        body = SocketBody.of(_request(first, server), idle_timeout=5)
        assert body is not None
        buffer = memoryview(bytearray(4))
        assert body.readinto(buffer) == 4 and bytes(buffer) == b"abcd"
        assert next(parser).path == "/b"


def test_over_tls_the_next_requests_bytes_decrypted_with_the_body_go_to_gunicorns_buffer(tmp_path) -> None:
    """gunicorn serving TLS itself: the body's last TLS record also carries the next request.
    OpenSSL holds those bytes decrypted, off the socket, where gthread's poller would never see
    them (the request would wait for the keep-alive timeout, then be dropped): they must be in
    gunicorn's buffer once the body is read."""
    cert, key = throwaway_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(cert)
    plain_client, plain_server = socket.socketpair()
    handshake: list[ssl.SSLSocket] = []
    accepting = threading.Thread(
        target=lambda: handshake.append(server_context.wrap_socket(plain_server, server_side=True))
    )
    accepting.start()
    with client_context.wrap_socket(plain_client, server_hostname="localhost") as client:
        accepting.join()
        [server] = handshake
        with server:
            # One record (at most 16 KiB): the head, the body and the next request; gunicorn reads the
            # head 8 KiB at a time, so the record's end is still inside OpenSSL then.
            client.sendall(
                b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 12000\r\n\r\n"
                + b"x" * 12000
                + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            parser, first = _parsed(server)
            body = SocketBody.of(_request(first, server), idle_timeout=5)
            assert body is not None
            assert _read_all(body, 12000, block=4096) == b"x" * 12000
            assert server.pending() == 0, "the next request's bytes were left inside OpenSSL"
            assert next(parser).path == "/b"


def test_a_stalled_body_is_abandoned_and_the_connection_not_reused() -> None:
    client, server = socket.socketpair()
    with client, server:
        client.sendall(b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        _, first = _parsed(server)
        body = SocketBody.of(_request(first, server), idle_timeout=0.2)
        assert body is not None
        with pytest.raises(IncompleteBody, match="stalled"):
            body.readinto(memoryview(bytearray(1024)))
        assert first.body.failed is True


def test_elsewhere_the_wsgi_stream_is_read() -> None:
    request = _as_request(
        types.SimpleNamespace(env={"wsgi.input": io.BytesIO(b"abc")}, bounded_stream=io.BytesIO(b"abc"))
    )
    assert SocketBody.of(request, idle_timeout=None) is None
    body = part_body(request)
    assert isinstance(body, StreamBody) and _read_all(body, 3) == b"abc"
