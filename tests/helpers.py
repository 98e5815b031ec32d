"""Small helpers for driving the app through webtest."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import webtest

from chunksvc.services import layout


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_digest(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def split(data: bytes, part_size: int) -> list[bytes]:
    return [data[i : i + part_size] for i in range(0, len(data), part_size)]


def create(app: webtest.TestApp, auth: dict, status: int = 201, headers: dict | None = None, **body):
    body.setdefault("filename", "file.bin")
    return app.post_json("/uploads/sessions", body, headers={**auth, **(headers or {})}, status=status)


def put_part(app: webtest.TestApp, auth: dict, session_id: str, number, data: bytes, status=201, headers=None):
    return app.put(
        f"/uploads/sessions/{session_id}/parts/{number}",
        params=data,
        headers={**auth, "Content-Type": "application/octet-stream", **(headers or {})},
        status=status,
    )


def complete(app: webtest.TestApp, auth: dict, session_id: str, status: int = 200, body=None):
    if body is None:
        return app.post(f"/uploads/sessions/{session_id}/complete", headers=auth, status=status)
    return app.post_json(f"/uploads/sessions/{session_id}/complete", body, headers=auth, status=status)


def uploaded(
    app: webtest.TestApp, auth: dict, size: int, part_size: int = 1024, sha256: str | None = None, seed: int = 0
) -> tuple[str, bytes]:
    """A session of ``size`` bytes with every part uploaded, announcing ``sha256`` (by default the
    data's own); ``(id, data)``."""
    data = payload(size, seed)
    session_id = create(app, auth, size=len(data), part_size=part_size, sha256=sha256 or sha(data)).json["id"]
    for number, chunk in enumerate(split(data, part_size), start=1):
        put_part(app, auth, session_id, number, chunk)
    return session_id, data


def raw_put(app: webtest.TestApp, auth: dict, session_id: str, number, stream, content_length, status):
    """A PUT whose body stream and Content-Length we control (None: no Content-Length)."""
    request = webtest.TestRequest.blank(f"/uploads/sessions/{session_id}/parts/{number}", method="PUT", headers=auth)
    request.environ["wsgi.input"] = stream
    request.environ.pop("CONTENT_LENGTH", None)
    if content_length is not None:
        request.environ["CONTENT_LENGTH"] = str(content_length)
    return app.do_request(request, status=status)


class ShortBody(io.RawIOBase):
    """A body that delivers ``data`` and then ends, as when the client disconnects."""

    def __init__(self, data: bytes, on_first_read=None) -> None:
        self._data = io.BytesIO(data)
        self._on_first_read = on_first_read

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._on_first_read is not None:
            hook, self._on_first_read = self._on_first_read, None
            hook()
        return self._data.read(size)


def put_part_aborted_midway(app: webtest.TestApp, auth: dict, session_id: str, number: int, data: bytes, status: int):
    """PUT part ``number`` whose body's first read aborts the session (the abort lands while the
    part's bytes stream); the response."""

    def abort_meanwhile() -> None:
        app.delete(f"/uploads/sessions/{session_id}", headers=auth, status=204)

    request = webtest.TestRequest.blank(
        f"/uploads/sessions/{session_id}/parts/{number}",
        method="PUT",
        headers={**auth, "Content-Type": "application/octet-stream"},
    )
    request.environ["wsgi.input"] = ShortBody(data, on_first_read=abort_meanwhile)
    request.environ["CONTENT_LENGTH"] = str(len(data))
    return app.do_request(request, status=status)


def query(database_url: str, statement: str, params: tuple = ()) -> list[tuple]:
    """``statement`` on its own autocommit connection: its rows ([] for a statement without any)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def wait_for(what, describe: str, timeout: float = 60, interval: float = 0.01):
    """Poll until ``what()`` is truthy (an event in another process, not a speed requirement)."""
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, f"gave up waiting for {describe}"
        time.sleep(interval)
    return value


def hold_completion_lease(database_url: str, session_id, seconds: float, status: str | None = None) -> uuid.UUID:
    """What a live assembler holds on ``session_id``: its completion lease, for ``seconds`` from now
    (nobody renews it: it runs out then, as a dead assembler's does); optionally a status too."""
    owner = uuid.uuid4()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE upload_sessions SET status = COALESCE(%s, status), completion_owner = %s,"
            " completion_lease_until = clock_timestamp() + make_interval(secs => %s) WHERE id = %s",
            (status, owner, seconds, session_id),
        )
    return owner


def run_out_completion_lease(database_url: str, session_id) -> None:
    """The session's completion lease runs out now: its owner stays, its expiry becomes this
    moment, the state an unrenewed lease (``hold_completion_lease``'s) reaches when its time comes,
    for tests about what follows the run-out rather than about how long it takes."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE upload_sessions SET completion_lease_until = clock_timestamp()"
            " WHERE id = %s AND completion_lease_until > clock_timestamp()",
            (session_id,),
        )


def completion_lease_ran_out(database_url: str, session_id) -> bool:
    """Whether the session's completion lease is free (never taken, given back, or run out)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT completion_lease_until IS NULL OR completion_lease_until <= clock_timestamp()"
            " FROM upload_sessions WHERE id = %s",
            (session_id,),
        ).fetchone()
    assert row is not None
    return bool(row[0])


def migrate_twice_at_once(url: str) -> list[list[str]]:
    """Two hosts running ``migrate`` on ``url`` at the same moment: what each applied."""
    from chunksvc import migrations

    results: list[list[str]] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        results.append(migrations.migrate(url))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# --- S3 staging (tests/test_frontier_s3.py, tests/test_pieces_s3.py) -------------------------

PART_S3 = 5 * 1024 * 1024  # S3's smallest part but the last


def staging_of(database_url: str, session_id: str) -> tuple[str | None, dict[int, str | None]]:
    """The session's staging id and each part's recorded token."""
    [(staged_id,)] = query(database_url, "SELECT staged_id FROM upload_sessions WHERE id = %s", (session_id,))
    rows = query(
        database_url, "SELECT part_number, staged_token FROM upload_parts WHERE session_id = %s", (session_id,)
    )
    return staged_id, dict(rows)


def upload_parts_in(app, auth, data: bytes, order) -> str:
    """A session of ``data`` in 5 MiB parts, announcing its SHA-256, with the parts of ``order`` sent."""
    parts = split(data, PART_S3)
    session_id = create(app, auth, size=len(data), part_size=PART_S3, sha256=sha(data)).json["id"]
    for number in order:
        put_part(app, auth, session_id, number, parts[number - 1])
    return session_id


def stored_object(storage, session_id: str) -> bytes:
    """The session's object, as stored."""
    with storage.open(layout.object_key(session_id)) as stored:
        return stored.read()


def unfinished_uploads(storage) -> int:
    """How many multipart uploads under the service's prefixes are unfinished (none is swept)."""
    return storage.sweep_incomplete(layout.PREFIXES, datetime.now(UTC) + timedelta(hours=1), dry_run=True)


def completes_as(app, auth, storage, session_id: str, data: bytes) -> dict:
    """Completes the session; asserts it is COMPLETED with ``data``'s SHA-256 and holds ``data``."""
    done = complete(app, auth, session_id).json
    assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)
    assert stored_object(storage, session_id) == data
    return done


def frontier_parts(database_url: str, session_id: str) -> int:
    """How many parts the session's hash frontier has passed."""
    [(parts,)] = query(database_url, "SELECT frontier_parts FROM upload_sessions WHERE id = %s", (session_id,))
    return parts
