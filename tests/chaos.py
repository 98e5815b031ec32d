"""What the fault tests drive the service with, and what they check afterwards.

The service is driven through the project's one client, ``chunksvc_client``, which retries
exactly what the contract says a client retries; ``Tally`` records every attempt it makes
(retried ones too) through the client's ``on_attempt`` hook. ``measure_invariants`` is the
verdict: every COMPLETED object is its source byte for byte, counters equal part rows, and after
a reap with no grace period storage holds exactly the completed objects plus the recorded parts
of live sessions.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from chunksvc.services import layout
from chunksvc.storage import Storage
from chunksvc_client import ApiError, Attempt, Client, RetryPolicy
from tests.helpers import query

CONNECTION_ERROR = "connection_error"


class Tally:
    """Statuses seen (every attempt, retried ones included) and the codes of 5xx answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.statuses: collections.Counter[int | str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()  # of 5xx answers

    def __call__(self, attempt: Attempt) -> None:
        """The client's ``on_attempt`` hook."""
        with self._lock:
            self.statuses[attempt.status or CONNECTION_ERROR] += 1
            if attempt.status >= 500 and attempt.error is not None:
                self.codes[attempt.error.code] += 1

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if isinstance(status, int) and status >= 500)

    def __repr__(self) -> str:
        return f"Tally({dict(sorted(self.statuses.items(), key=str))}, 5xx codes {dict(self.codes)})"


def client(url: str, api_key: str, tally: Tally, *, attempts: int = 40, timeout: float = 60) -> Client:
    """A client with the contract's retries, quicker than the default (the faults last seconds)."""
    retry = RetryPolicy(attempts=attempts, base_delay=0.05, max_delay=1.0, storage_full_delay=1.0)
    return Client(url, api_key, retry=retry, timeout=timeout, on_attempt=tally)


def upload(chunksvc: Client, data: bytes, part_size: int, parallel: int = 4) -> str:
    """Upload ``data`` as a file with ``upload_file``; the completed session's id."""
    with tempfile.TemporaryDirectory(prefix="chunksvc-chaos-") as work:
        path = Path(work, "chaos.bin")
        path.write_bytes(data)
        session = chunksvc.upload_file(path, part_size=part_size, parallel=parallel)
    assert session["status"] == "COMPLETED", session
    return session["id"]


def finish(chunksvc: Client, session_id: str, data: bytes, part_size: int) -> dict:
    """Complete, sending whatever ``parts_missing`` lists (the client's ordinary resume)."""
    for _ in range(40):
        try:
            return chunksvc.complete(session_id)
        except ApiError as error:
            if error.code != "parts_missing":
                raise
            for number in error.problem["missing_parts"]:
                chunksvc.put_part(session_id, number, data[(number - 1) * part_size : number * part_size])
        time.sleep(0.05)
    raise AssertionError(f"session {session_id} never completed")


# --- the verdict ---------------------------------------------------------------------------------


def stored_keys(storage: Storage) -> set[str]:
    return {listed.key for prefix in layout.PREFIXES for listed in storage.list_keys(prefix)}


def staged_pieces(database_url: str, storage: Storage, pieces: set[str]) -> set[str]:
    """Of ``pieces`` (part keys naming pieces of their session's staging), those the store holds."""
    held = set()
    for session_id in {layout.session_of(key) for key in pieces}:
        assert session_id is not None, "a piece's key names its session"
        [(staged_id,)] = query(database_url, "SELECT staged_id FROM upload_sessions WHERE id = %s", (session_id,))
        if staged_id is not None and storage.staged is not None:
            numbers = storage.staged.placed(layout.object_key(session_id), staged_id)
            held |= {layout.piece_key(session_id, number) for number in numbers}
    return held & pieces


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
        for row in query(
            database_url,
            """
            SELECT s.id, s.status, s.received_parts, s.received_bytes, s.object_key, s.object_sha256,
                   count(p.part_number), COALESCE(sum(p.size), 0)
              FROM upload_sessions s LEFT JOIN upload_parts p ON p.session_id = s.id
             GROUP BY s.id""",
        )
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
        row[0]
        for row in query(
            database_url,
            """
            SELECT p.storage_key FROM upload_parts p JOIN upload_sessions s ON s.id = p.session_id
             WHERE s.status IN ('INIT', 'IN_PROGRESS')""",
        )
    }
    objects = {value[3] for value in sessions.values() if value[0] == "COMPLETED"}
    keys = stored_keys(storage)
    # Parts sent straight into their session's staging have no key: their piece must be staged.
    pieces = {key for key in live_parts if layout.piece_number(key) is not None}
    live_parts -= pieces
    if unstaged := pieces - staged_pieces(database_url, storage, pieces):
        problems.append(f"recorded pieces of live sessions missing from their staging: {sorted(unstaged)[:5]}")
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
