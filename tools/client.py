"""A deliberately minimal keep-alive HTTP client for the benchmark: one connection, raw bytes from
memory, no retries, no hashing. The benchmark measures the server with it, so that nothing of a
real client's work (reading files, Content-Digest, retries) is in the server's figures; everything
else (tests, the load test, the client figures of the bench) uses ``chunksvc_client``."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, cast
from urllib.parse import urlsplit


class ApiError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {body[:300]!r}")


class Client:
    """One persistent connection to chunksvc, authenticating with ``api_key``."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 300) -> None:
        parts = urlsplit(base_url)
        self._conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
        self._auth = {"Authorization": f"Bearer {api_key}"}

    def close(self) -> None:
        self._conn.close()

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> bytes:
        """Send one request; return the body of a 2xx answer, else raise ``ApiError``."""
        if self._conn.sock is None:
            self._conn.connect()
            sock = cast(socket.socket, self._conn.sock)  # connect() opened it
            # Headers and body go out in separate writes (the body is never copied into one
            # buffer with them); without NODELAY, Nagle would hold the body back for an ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn.request(method, path, body=body, headers={**self._auth, **(headers or {})})
        response = self._conn.getresponse()
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiError(response.status, data)
        return data

    def create_session(self, size: int, part_size: int) -> str:
        body = json.dumps({"filename": "bench.bin", "size": size, "part_size": part_size})
        answer = self.request("POST", "/uploads/sessions", body, {"Content-Type": "application/json"})
        session_id: str = json.loads(answer)["id"]
        return session_id

    def put_part(self, session_id: str, number: int, data: bytes | memoryview) -> dict[str, Any]:
        # A memoryview is sent as it is; http.client would copy bytes into the header buffer.
        body = data if isinstance(data, memoryview) else memoryview(data)
        headers = {"Content-Length": str(len(body)), "Content-Type": "application/octet-stream"}
        part: dict[str, Any] = json.loads(
            self.request("PUT", f"/uploads/sessions/{session_id}/parts/{number}", body, headers)
        )
        return part

    def complete(self, session_id: str) -> dict[str, Any]:
        session: dict[str, Any] = json.loads(self.request("POST", f"/uploads/sessions/{session_id}/complete"))
        return session

    def abort(self, session_id: str) -> None:
        self.request("DELETE", f"/uploads/sessions/{session_id}")

    def healthz(self) -> None:
        self.request("GET", "/healthz")
