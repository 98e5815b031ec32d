"""What the fault tests drive the service with, and what they check afterwards.

``Caller`` speaks HTTP to one or more chunksvc hosts and retries exactly what the contract says a
client retries (connection errors, 502/503/504, 507), recording every status it saw. ``Tally``
adds those up per fault. ``measure_invariants`` is the verdict: every COMPLETED object is its
source byte for byte, counters equal part rows, and after a reap with no grace period storage
holds exactly the completed objects plus the recorded parts of live sessions.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.client
import itertools
import json
import os
import random
import threading
import time
from collections.abc import Iterable, Sequence

import psycopg

from chunksvc.storage import Storage

RETRYABLE_STATUSES = frozenset({502, 503, 504, 507})


@dataclasses.dataclass
class Answer:
    status: int
    body: dict | None
    attempts: int


class Tally:
    """Statuses seen (every attempt, retried ones included), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.statuses: collections.Counter[int | str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()  # of 5xx answers

    def add(self, status: int | str) -> None:
        with self._lock:
            self.statuses[status] += 1

    def add_code(self, code: str) -> None:
        with self._lock:
            self.codes[code] += 1

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if isinstance(status, int) and status >= 500)

    def __repr__(self) -> str:
        return f"Tally({dict(sorted(self.statuses.items(), key=str))}, 5xx codes {dict(self.codes)})"


class Caller:
    """Requests with the contract's retry policy, spread over ``ports`` (several hosts)."""

    def __init__(self, ports: Sequence[int], api_key: str, tally: Tally, *, attempts: int = 40,
                 backoff: float = 0.05, timeout: float = 30) -> None:
        self._ports = itertools.cycle(ports)
        self._lock = threading.Lock()
        self._key = api_key
        self.tally = tally
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = timeout

    def __call__(self, method: str, path: str, body: bytes | dict | None = None,
                 headers: dict[str, str] | None = None, retry: bool = True) -> Answer:
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        all_headers = {"Authorization": f"Bearer {self._key}", **(headers or {})}
        if isinstance(body, dict):
            all_headers["Content-Type"] = "application/json"
        for attempt in range(1, self._attempts + 1):
            with self._lock:
                port = next(self._ports)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self._timeout)
            try:
                conn.request(method, path, body=payload, headers=all_headers)
                response = conn.getresponse()
                data = response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                self.tally.add("connection_error")
                status, data = None, b""
            finally:
                conn.close()
            if status is not None:
                self.tally.add(status)
                if status >= 500:
                    self.tally.add_code(_problem_code(data))
                if status not in RETRYABLE_STATUSES:
                    return Answer(status, json.loads(data) if data else None, attempt)
            if not retry:
                return Answer(status or 0, json.loads(data) if data else None, attempt)
            # Backoff with jitter, capped: the faults in these tests last seconds.
            time.sleep(min(1.0, self._backoff * 2 ** min(attempt, 5)) * random.uniform(0.5, 1.0))
        raise AssertionError(f"{method} {path}: still failing after {self._attempts} attempts; {self.tally}")


def _problem_code(data: bytes) -> str:
    try:
        return json.loads(data)["code"]
    except (ValueError, KeyError, TypeError):
        return "not a problem document"


def upload(call: Caller, data: bytes, part_size: int, order: Iterable[int] | None = None) -> str:
    """Create a session for ``data``, send every part (retrying), complete it; the session id."""
    created = call("POST", "/uploads/sessions", {
        "filename": "chaos.bin", "size": len(data), "part_size": part_size,
        "sha256": hashlib.sha256(data).hexdigest(),
    }, headers={"Idempotency-Key": hashlib.sha256(data).hexdigest()})
    assert created.status in (200, 201), created
    session_id = created.body["id"]
    count = -(-len(data) // part_size)
    for number in order or range(1, count + 1):
        put = call("PUT", f"/uploads/sessions/{session_id}/parts/{number}",
                   data[(number - 1) * part_size: number * part_size])
        assert put.status in (200, 201), put
    finish(call, session_id, data, part_size)
    return session_id


def finish(call: Caller, session_id: str, data: bytes, part_size: int) -> dict:
    """Complete, re-sending whatever ``parts_missing`` lists (the client's ordinary resume)."""
    for _ in range(40):
        done = call("POST", f"/uploads/sessions/{session_id}/complete")
        if done.status == 200:
            return done.body
        if (done.status, done.body["code"]) == (409, "completion_in_progress"):
            time.sleep(0.5)  # a crashed assembler's lock is on its way out
            continue
        assert (done.status, done.body["code"]) == (409, "parts_missing"), done
        for number in done.body["missing_parts"]:
            put = call("PUT", f"/uploads/sessions/{session_id}/parts/{number}",
                       data[(number - 1) * part_size: number * part_size])
            assert put.status in (200, 201), put
    raise AssertionError(f"session {session_id} never completed")


# --- the verdict ---------------------------------------------------------------------------------


def query(database_url: str, statement: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(statement, params).fetchall()


def stored_keys(storage: Storage) -> set[str]:
    return {listed.key for prefix in ("parts/", "objects/") for listed in storage.list_keys(prefix)}


def sha256_of(storage: Storage, key: str) -> str:
    digest = hashlib.sha256()
    with storage.open(key) as stored:
        while block := stored.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def measure_invariants(database_url: str, storage: Storage, sources: dict[str, str]) -> tuple[dict, list[str]]:
    """Counts for the report (``lost`` and ``leaked`` among them), and every broken invariant.

    ``sources`` maps the id of every session the test expects COMPLETED to its source's SHA-256.
    Call it after a reap with zero grace period (and no requests in flight).
    """
    problems: list[str] = []
    lost_uploads = 0
    sessions = {
        str(row[0]): row[1:]
        for row in query(database_url, """
            SELECT s.id, s.status, s.received_parts, s.received_bytes, s.object_key, s.object_sha256,
                   count(p.part_number), COALESCE(sum(p.size), 0)
              FROM upload_sessions s LEFT JOIN upload_parts p ON p.session_id = s.id
             GROUP BY s.id""")
    }
    for session_id, (_status, parts, size, _key, _sha, rows, row_bytes) in sessions.items():
        if (parts, size) != (rows, row_bytes):
            problems.append(f"{session_id}: counters {parts} parts/{size} bytes, rows {rows}/{row_bytes}")
    for session_id, sha256 in sources.items():
        status, *_rest, key, object_sha, _rows, _bytes = sessions[session_id]
        if status != "COMPLETED":
            problems.append(f"{session_id}: {status}, expected COMPLETED (lost)")
            lost_uploads += 1
        elif object_sha != sha256 or sha256_of(storage, key) != sha256:
            problems.append(f"{session_id}: object is not its source")
            lost_uploads += 1
    for session_id, (status, *_rest, key, _sha, _rows, _bytes) in sessions.items():
        if status == "COMPLETED" and not storage.exists(key):
            problems.append(f"{session_id}: COMPLETED without its object")
    live_parts = {
        row[0] for row in query(database_url, """
            SELECT p.storage_key FROM upload_parts p JOIN upload_sessions s ON s.id = p.session_id
             WHERE s.status IN ('INIT', 'IN_PROGRESS')""")
    }
    objects = {value[3] for value in sessions.values() if value[0] == "COMPLETED"}
    keys = stored_keys(storage)
    if lost := live_parts - keys:
        problems.append(f"recorded parts of live sessions missing from storage: {sorted(lost)[:5]}")
    if leaked := keys - live_parts - objects:
        problems.append(f"stored bytes no record needs (leaked): {sorted(leaked)[:5]} ({len(leaked)})")
    counts = {
        "sessions": len(sessions),
        "completed": sum(1 for value in sessions.values() if value[0] == "COMPLETED"),
        "stored_keys": len(keys),
        "lost": lost_uploads + len(lost),
        "leaked": len(leaked),
    }
    return counts, problems


def record_fault(fault: str, tally: Tally, counts: dict) -> None:
    """Append one line about a fault run to the file named by CHUNKSVC_FAULT_REPORT, if set:
    what was tried, the statuses seen, and what was lost or leaked."""
    path = os.environ.get("CHUNKSVC_FAULT_REPORT")
    if not path:
        return
    line = {
        "fault": fault,
        "statuses": {str(status): count for status, count in sorted(tally.statuses.items(), key=str)},
        "codes_5xx": dict(tally.codes),
        "server_errors": tally.server_errors,
        **counts,
    }
    with open(path, "a", encoding="utf-8") as report:
        report.write(json.dumps(line) + "\n")
