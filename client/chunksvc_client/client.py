"""``Client``: every call of the chunksvc HTTP contract, and ``upload_file`` built on them.

Each call is one HTTP request, retried by the ``RetryPolicy`` (the only place that decides what
is retried). Failures raise ``ApiError`` with the contract's ``code``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx

from chunksvc_client.errors import ApiError
from chunksvc_client.progress import NoProgress, Progress
from chunksvc_client.retry import RetryPolicy

__all__ = ["Attempt", "Client", "FileRange"]

BLOCK_SIZE = 1024 * 1024  # a part is read and sent in blocks of this size: memory stays flat
# States a session cannot leave: an upload that finds its session in one of them starts anew.
DEAD = frozenset({"ABORTED", "EXPIRED", "FAILED"})
MAX_FRESH_STARTS = 20
# Rounds of "complete, then send what it says is missing" before giving up on a session.
MAX_REPAIR_ROUNDS = 20
# Seconds each complete asks the server to wait for the verified object (``Prefer: wait``); the
# service honours up to 20, an older one ignores the header.
COMPLETE_SERVER_WAIT = 15


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One HTTP attempt, as ``Client(on_attempt=...)`` sees it."""

    method: str
    path: str
    status: int  # 0: no answer came (connection error or timeout)
    seconds: float
    response_bytes: int
    error: ApiError | None  # for a failure: what it was (retried or not)


@dataclasses.dataclass(frozen=True)
class FileRange:
    """``length`` bytes of the file at ``path`` from ``offset``: a part, sent without loading it."""

    path: Path
    offset: int
    length: int

    def blocks(self, block_size: int = BLOCK_SIZE) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            remaining = self.length
            while remaining:
                block = f.read(min(block_size, remaining))
                if not block:
                    raise OSError(f"{self.path} is shorter than expected (it changed during the upload)")
                remaining -= len(block)
                yield block

    def sha256(self) -> bytes:
        digest = hashlib.sha256()
        for block in self.blocks():
            digest.update(block)
        return digest.digest()


def content_digest(sha256: bytes) -> str:
    """An RFC 9530 ``Content-Digest`` value."""
    return f"sha-256=:{base64.b64encode(sha256).decode()}:"


class Client:
    """A chunksvc client for one service URL and API key; safe to share between threads."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: bool | str = True,
        max_connections: int = 32,
        on_attempt: Callable[[Attempt], None] | None = None,
    ) -> None:
        """``timeout``: seconds any one network operation may take (connect, a read, a write);
        ``transport``: an httpx transport (e.g. ``httpx.WSGITransport(app=...)`` in tests);
        ``on_attempt`` sees every attempt, retried ones included (for logs, metrics and tests)."""
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._on_attempt = on_attempt
        self._read_timeout = timeout
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "chunksvc-client/0.1"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            # A CA bundle's path as httpx wants it now (a bare path is deprecated there).
            verify=ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the contract's calls -----------------------------------------------------------------

    def create_session(
        self,
        filename: str,
        size: int,
        *,
        part_size: int | None = None,
        content_type: str | None = None,
        sha256: str | None = None,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """A new session (or, with an ``Idempotency-Key`` used before, that key's session).

        Without a key a connection error is not retried: the session may have been created.
        """
        body: dict[str, Any] = {"filename": filename, "size": size}
        optional = {"part_size": part_size, "content_type": content_type, "sha256": sha256, "metadata": metadata}
        body.update({name: value for name, value in optional.items() if value is not None})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call(
            "POST", "/uploads/sessions", json_body=body, headers=headers, repeatable=idempotency_key is not None
        ).json()

    def get_session(self, session_id: str) -> dict[str, Any]:
        return self._call("GET", f"/uploads/sessions/{session_id}").json()

    def iter_sessions(self, status: str | None = None, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """The caller's sessions, newest first, following cursors page by page."""
        params: dict[str, Any] = {"limit": page_size}
        if status:
            params["status"] = status
        while True:
            page = self._call("GET", "/uploads/sessions", params=params).json()
            yield from page["sessions"]
            if not page["next_cursor"]:
                return
            params["cursor"] = page["next_cursor"]

    def iter_parts(self, session_id: str, page_size: int = 1000) -> Iterator[dict[str, Any]]:
        """The session's received parts in part-number order, page by page."""
        params: dict[str, Any] = {"limit": page_size, "after": 0}
        while True:
            page = self._call("GET", f"/uploads/sessions/{session_id}/parts", params=params).json()
            yield from page["parts"]
            if page["next_after"] is None:
                return
            params["after"] = page["next_after"]

    def put_part(
        self,
        session_id: str,
        part_number: int,
        body: bytes | FileRange,
        *,
        sha256: bytes | None = None,
        on_sent: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Upload one part with its ``Content-Digest`` (computed here unless ``sha256`` is given).

        A ``FileRange`` is streamed from the file in blocks, again on each retry. ``on_sent`` is
        called with each block's size as it goes out, and with minus what was sent when an
        attempt fails.
        """
        if sha256 is None:
            sha256 = hashlib.sha256(body).digest() if isinstance(body, bytes) else body.sha256()
        length = len(body) if isinstance(body, bytes) else body.length
        headers = {
            "Content-Digest": content_digest(sha256),
            "Content-Length": str(length),
            "Content-Type": "application/octet-stream",
        }

        def attempt() -> httpx.Response:
            sent = 0

            def blocks() -> Iterator[bytes]:
                nonlocal sent
                source = [body] if isinstance(body, bytes) else body.blocks()
                for block in source:
                    yield block
                    sent += len(block)
                    if on_sent:
                        on_sent(len(block))

            try:
                return self._request(
                    "PUT", f"/uploads/sessions/{session_id}/parts/{part_number}", content=blocks(), headers=headers
                )
            except ApiError:
                if on_sent and sent:
                    on_sent(-sent)
                raise

        return self.retry.run(attempt).json()

    def complete(
        self,
        session_id: str,
        sha256: str | None = None,
        *,
        wait: bool = True,
        on_assembling: Callable[[dict[str, Any]], None] | None = None,
        poll_interval: float = 2.0,
        server_wait: int = COMPLETE_SERVER_WAIT,
    ) -> dict[str, Any]:
        """Complete the session; the completed session object.

        A large upload is assembled in the background (``202``): with ``wait`` each complete asks
        the server to answer once the object is verified (``Prefer: wait=<server_wait>``, RFC
        7240), and calls again at once when it answered 202 after waiting (``Preference-Applied``);
        a server that does not wait is polled after each ``Retry-After``. Complete is idempotent,
        and takes over an assembly whose worker died. It goes on until ``COMPLETED``;
        ``on_assembling`` sees the session each time, with ``assembled_bytes``. It raises
        ``checksum_mismatch`` when the session ends ``FAILED``, and ``parts_missing`` (the parts
        in ``error.problem``) when parts were lost and the session was reopened for them.
        """
        body = {"sha256": sha256} if sha256 else None
        path = f"/uploads/sessions/{session_id}/complete"
        # The wait must end well inside one read's timeout, or the answer would never be read.
        seconds = min(server_wait, int(self._read_timeout / 2)) if wait else 0
        headers = {"Prefer": f"wait={seconds}"} if seconds > 0 else None
        while True:
            try:
                response = self._call("POST", path, json_body=body, headers=headers)
            except ApiError as error:
                if error.code == "session_not_active":
                    session = self.get_session(session_id)
                    if session["status"] == "FAILED":  # found out in the background
                        raise ApiError(
                            422,
                            "checksum_mismatch",
                            "the assembled upload did not match its size or SHA-256",
                            problem=session,
                            request_id=error.request_id,
                        ) from None
                raise
            session = response.json()
            if not wait or response.status_code != 202:
                return session
            if on_assembling:
                on_assembling(session)
            if headers is None or "Preference-Applied" not in response.headers:
                self.retry.sleep(_retry_after(response) or poll_interval)

    def limits(self) -> dict[str, Any]:
        """The caller's quotas and its use of them (``GET /uploads/limits``)."""
        result: dict[str, Any] = self._call("GET", "/uploads/limits").json()
        return result

    def abort(self, session_id: str) -> None:
        """Abort the session and remove its stored parts (waits out an assembly in progress)."""
        self._call("DELETE", f"/uploads/sessions/{session_id}")

    # --- whole files --------------------------------------------------------------------------

    def upload_file(
        self,
        path: str | os.PathLike[str],
        *,
        part_size: int | None = None,
        parallel: int = 4,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
        progress: Progress | None = None,
        filename: str | None = None,
    ) -> dict[str, Any]:
        """Upload a file; the completed session object.

        Parts are streamed from the file (memory does not grow with its size), ``parallel`` at
        once, each with its ``Content-Digest``; the whole file's SHA-256 is sent at completion.
        Resumable: the session is found again by an ``Idempotency-Key`` derived from the file's
        absolute path, size and modification time and the upload's options, so running it again
        after a crash continues the same session and sends only the parts the server lacks. A
        session that expired, was aborted or failed is replaced by a fresh one.
        """
        upload = _FileUpload(
            self, Path(path), part_size, parallel, content_type, metadata, progress or NoProgress(), filename
        )
        try:
            return upload.run()
        finally:
            upload.progress.close()

    # --- one request --------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        repeatable: bool = True,
    ) -> httpx.Response:
        content = None if json_body is None else json.dumps(json_body).encode()
        all_headers = {**(headers or {}), **({"Content-Type": "application/json"} if content else {})}
        return self.retry.run(
            lambda: self._request(method, path, content=content, headers=all_headers, params=params),
            repeatable=repeatable,
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One attempt: the response if it is a success, else ``ApiError``."""
        started = time.monotonic()
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:  # no retry can mend the URL
            raise ValueError(f"{self.url} is not a usable http(s) URL: {exc}") from exc
        except httpx.TransportError as exc:  # refused, reset, timed out, ...
            error = ApiError.connection(f"{method} {path}: {type(exc).__name__}: {exc}")
            if self._on_attempt:
                self._on_attempt(Attempt(method, path, 0, time.monotonic() - started, 0, error))
            raise error from exc
        failure = _error_from(response) if response.status_code >= 400 else None
        if self._on_attempt:
            self._on_attempt(
                Attempt(method, path, response.status_code, time.monotonic() - started, len(response.content), failure)
            )
        if failure is not None:
            raise failure
        return response


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _error_from(response: httpx.Response) -> ApiError:
    """The ``ApiError`` for an error answer: a problem document, or anything else (a proxy's page)."""
    problem: dict[str, Any] = {}
    if "json" in response.headers.get("Content-Type", ""):
        try:
            parsed = response.json()
            problem = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            problem = {}
    code = problem.get("code") or f"http_{response.status_code}"
    detail = problem.get("detail") or response.reason_phrase or "error"
    return ApiError(
        response.status_code,
        str(code),
        str(detail),
        problem=problem,
        request_id=response.headers.get("X-Request-ID"),
        retry_after=_retry_after(response),
    )


class _FileUpload:
    """One ``upload_file`` run: find or create the session, send what is missing, complete."""

    def __init__(
        self,
        client: Client,
        path: Path,
        part_size: int | None,
        parallel: int,
        content_type: str | None,
        metadata: dict[str, str] | None,
        progress: Progress,
        filename: str | None,
    ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.client = client
        self.path = path.resolve()
        stat = self.path.stat()
        if stat.st_size == 0:
            raise ValueError(f"{path} is empty: chunksvc stores uploads of at least one byte")
        self.size = stat.st_size
        self.mtime_ns = stat.st_mtime_ns
        self.part_size = part_size
        self.parallel = parallel
        self.content_type = content_type
        self.metadata = metadata
        self.progress = progress
        self.filename = filename or self.path.name
        self._file_sha256: str | None = None

    def resume_key(self, generation: int) -> str:
        """The ``Idempotency-Key`` of this file's upload: the same for the same file and options,
        so a rerun finds its session; ``generation`` moves on past a session that is dead."""
        identity = json.dumps(
            [str(self.path), self.size, self.mtime_ns, self.part_size, self.content_type, self.metadata, self.filename],
            sort_keys=True,
        )
        return f"chunksvc-client-{hashlib.sha256(identity.encode()).hexdigest()[:40]}-{generation}"

    def run(self) -> dict[str, Any]:
        for generation in range(MAX_FRESH_STARTS):
            session = self.client.create_session(
                self.filename,
                self.size,
                part_size=self.part_size,
                content_type=self.content_type,
                metadata=self.metadata,
                idempotency_key=self.resume_key(generation),
            )
            if session["status"] in DEAD:
                continue  # an earlier run's session ended without completing: start afresh
            try:
                return self._finish(session)
            except ApiError as error:
                if error.code != "session_not_active":
                    raise
                # It expired or was aborted while we uploaded: start afresh (a new generation).
        raise ApiError(409, "session_not_active", f"gave up after {MAX_FRESH_STARTS} fresh sessions")

    def _finish(self, session: dict[str, Any]) -> dict[str, Any]:
        session_id = session["id"]
        if session["status"] == "COMPLETED":
            return session
        if session["status"] != "COMPLETING":
            self._send_missing(session)
        for _ in range(MAX_REPAIR_ROUNDS):
            try:
                return self.client.complete(
                    session_id,
                    self._file_sha256,
                    on_assembling=lambda s: self.progress.assembling(s.get("assembled_bytes"), self.size),
                )
            except ApiError as error:
                if error.code != "parts_missing":
                    raise
                # Parts the server asks for again (lost from its storage, say): whatever it
                # lacks now, listed or beyond the list's first 100, is sent again.
                self._send_missing(self.client.get_session(session_id))
        raise ApiError(409, "parts_missing", "the server kept asking for parts again")

    def _send_missing(self, session: dict[str, Any]) -> None:
        """Hash the file in one sequential pass while the parts the server lacks are sent."""
        session_id, part_size, total_parts = session["id"], session["part_size"], session["total_parts"]
        present = {part["part_number"]: part["sha256"] for part in self.client.iter_parts(session_id)}
        already = sum(self._length(n, part_size, total_parts) for n in present)
        self.progress.start(self.size, already)
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="chunksvc-part")
        in_flight: set[Future] = set()
        try:
            for number, digest in self._hash_parts(part_size, total_parts):
                if number in present:
                    if present[number] != digest.hex():
                        raise ApiError(
                            409,
                            "part_conflict",
                            f"part {number} on the server differs from"
                            f" {self.path}: the file changed since this upload began",
                        )
                    continue
                # At most `parallel` parts queued beyond those being sent: the hashing pass
                # waits for a sender to finish one, so nothing piles up in memory.
                while len(in_flight) >= 2 * self.parallel:
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    _raise_first(done)
                in_flight.add(pool.submit(self._put, session_id, number, part_size, total_parts, digest, stop))
            while in_flight:
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                _raise_first(done)
        except BaseException:
            stop.set()  # parts not yet started are skipped; those being sent end with their attempt
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    def _put(
        self, session_id: str, number: int, part_size: int, total_parts: int, digest: bytes, stop: threading.Event
    ) -> None:
        if stop.is_set():
            return  # another part failed: the upload is ending
        part = FileRange(self.path, (number - 1) * part_size, self._length(number, part_size, total_parts))
        self.client.put_part(session_id, number, part, sha256=digest, on_sent=self.progress.advance)

    def _hash_parts(self, part_size: int, total_parts: int) -> Iterator[tuple[int, bytes]]:
        """``(part number, SHA-256)`` for each part in order, and the whole file's SHA-256 at the end."""
        whole = hashlib.sha256()
        buffer = memoryview(bytearray(BLOCK_SIZE))  # one buffer, refilled: no allocation per block
        with open(self.path, "rb", buffering=0) as f:
            for number in range(1, total_parts + 1):
                part = hashlib.sha256()
                remaining = self._length(number, part_size, total_parts)
                while remaining:
                    count = f.readinto(buffer[: min(BLOCK_SIZE, remaining)])
                    if not count:
                        raise OSError(f"{self.path} shrank during the upload")
                    part.update(buffer[:count])
                    whole.update(buffer[:count])
                    remaining -= count
                yield number, part.digest()
        if os.stat(self.path).st_mtime_ns != self.mtime_ns:
            raise OSError(f"{self.path} changed during the upload")
        self._file_sha256 = whole.hexdigest()

    def _length(self, number: int, part_size: int, total_parts: int) -> int:
        return part_size if number < total_parts else self.size - part_size * (total_parts - 1)


def _raise_first(done: Any) -> None:
    """Re-raise the first failure among the finished futures ``done``."""
    for future in done:
        if future.exception() is not None:
            raise future.exception()
