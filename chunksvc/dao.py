"""One function per named statement in ``sql/queries.sql``; rows come back as dicts.

Functions take a ``db.Connection``; callers decide the transaction boundaries.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from chunksvc.db import Connection, json_param

Row = dict[str, Any]


# --- clients and keys -----------------------------------------------------------------------


def authenticate(conn: Connection, key_hash: bytes, session_id: UUID | None = None) -> Row | None:
    return conn.one("authenticate", key_hash=key_hash, session_id=session_id)


def upsert_client(conn: Connection, name: str) -> Row:
    return conn.one("upsert_client", name=name)


def insert_api_key(conn: Connection, client_id: int, prefix: str, key_hash: bytes) -> Row:
    return conn.one("insert_api_key", client_id=client_id, prefix=prefix, key_hash=key_hash)


def list_api_keys(conn: Connection) -> list[Row]:
    return conn.all("list_api_keys")


def revoke_api_keys(conn: Connection, target: str) -> list[Row]:
    return conn.all("revoke_api_keys", target=target)


# --- sessions -------------------------------------------------------------------------------


def insert_session(conn: Connection, *, metadata: dict[str, str], **fields: Any) -> Row | None:
    return conn.one("insert_session", metadata=json_param(metadata), **fields)


def get_session_by_idempotency_key(conn: Connection, client_id: int, idempotency_key: str) -> Row | None:
    return conn.one("get_session_by_idempotency_key", client_id=client_id, idempotency_key=idempotency_key)


def get_session(conn: Connection, session_id: UUID, client_id: int) -> Row | None:
    return conn.one("get_session", id=session_id, client_id=client_id)


def ops_list_sessions(conn: Connection, client: str | None, status: str | None, limit: int) -> list[Row]:
    return conn.all("ops_list_sessions", client=client, status=status, limit=limit)


def ops_get_session(conn: Connection, session_id: UUID) -> Row | None:
    return conn.one("ops_get_session", id=session_id)


def lock_session(conn: Connection, session_id: UUID, client_id: int) -> Row | None:
    return conn.one("lock_session", id=session_id, client_id=client_id)


def list_sessions(
    conn: Connection,
    client_id: int,
    status: str | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[Row]:
    after_created_at, after_id = after if after else (None, None)
    return conn.all(
        "list_sessions",
        client_id=client_id,
        status=status,
        after_created_at=after_created_at,
        after_id=after_id,
        limit=limit,
    )


def mark_completing(conn: Connection, session_id: UUID, sha256: str | None) -> Row:
    return conn.one("mark_completing", id=session_id, sha256=sha256)


def mark_completed(
    conn: Connection, session_id: UUID, object_key: str, object_size: int, object_sha256: str
) -> Row | None:
    return conn.one(
        "mark_completed",
        id=session_id,
        object_key=object_key,
        object_size=object_size,
        object_sha256=object_sha256,
    )


def mark_failed(conn: Connection, session_id: UUID) -> int:
    return conn.execute("mark_failed", id=session_id)


def set_assembled_bytes(conn: Connection, session_id: UUID, assembled: int) -> int:
    return conn.execute("set_assembled_bytes", id=session_id, assembled=assembled)


def pending_assemblies(conn: Connection, sync_max: int, limit: int) -> list[Row]:
    return conn.all("pending_assemblies", sync_max=sync_max, limit=limit)


def mark_aborted(conn: Connection, session_id: UUID) -> int:
    return conn.execute("mark_aborted", id=session_id)


def try_completion_lock(conn: Connection, session_id: UUID) -> bool:
    return conn.one("try_completion_lock", id=session_id)["locked"]


def release_completion_lock(conn: Connection, session_id: UUID) -> bool:
    return conn.one("release_completion_lock", id=session_id)["released"]


# --- parts ----------------------------------------------------------------------------------


def list_parts(conn: Connection, session_id: UUID, after: int, limit: int) -> list[Row]:
    return conn.all("list_parts", session_id=session_id, after=after, limit=limit)


def record_part(
    conn: Connection,
    session_id: UUID,
    client_id: int,
    part_number: int,
    size: int,
    sha256: str,
    storage_key: str,
) -> Row | None:
    return conn.one(
        "record_part",
        session_id=session_id,
        client_id=client_id,
        part_number=part_number,
        size=size,
        sha256=sha256,
        storage_key=storage_key,
    )


def get_part(conn: Connection, session_id: UUID, part_number: int) -> Row | None:
    return conn.one("get_part", session_id=session_id, part_number=part_number)


def heal_part(
    conn: Connection,
    session_id: UUID,
    client_id: int,
    part_number: int,
    sha256: str,
    old_key: str,
    new_key: str,
) -> bool:
    row = conn.one(
        "heal_part",
        session_id=session_id,
        client_id=client_id,
        part_number=part_number,
        sha256=sha256,
        old_key=old_key,
        new_key=new_key,
    )
    return row is not None


def drop_lost_parts(conn: Connection, session_id: UUID, storage_keys: list[str], ttl: int) -> Row | None:
    return conn.one("drop_lost_parts", id=session_id, storage_keys=storage_keys, ttl=ttl)


def missing_parts(conn: Connection, session_id: UUID, total_parts: int, limit: int) -> list[int]:
    rows = conn.all("missing_parts", session_id=session_id, total_parts=total_parts, limit=limit)
    return [row["part_number"] for row in rows]


def part_sources(conn: Connection, session_id: UUID) -> list[Row]:
    return conn.all("part_sources", session_id=session_id)


# --- health ---------------------------------------------------------------------------------


def ping(conn: Connection) -> bool:
    return conn.one("ping")["ok"] == 1


# --- metrics --------------------------------------------------------------------------------


def set_local_statement_timeout(conn: Connection, seconds: float) -> None:
    """Bound the rest of the caller's transaction's statements to ``seconds`` each."""
    conn.one("set_local_statement_timeout", milliseconds=max(1, round(seconds * 1000)))


def session_census(conn: Connection) -> dict[str, int]:
    """Sessions by status (INIT, IN_PROGRESS, COMPLETING) and awaiting the reaper (``overdue``:
    open past expiry; ``unpurged``: ended, stored bytes not removed yet). Absent keys are 0."""
    return {row["status"]: row["sessions"] for row in conn.all("session_census")}


# --- reaper ---------------------------------------------------------------------------------


def expire_overdue_sessions(conn: Connection, limit: int) -> list[UUID]:
    return [row["id"] for row in conn.all("expire_overdue_sessions", limit=limit)]


def overdue_sessions(conn: Connection, limit: int) -> tuple[int, list[UUID]]:
    """How many open sessions are overdue, and the first ``limit`` of them."""
    rows = conn.all("overdue_sessions", limit=limit)
    return (rows[0]["overdue"] if rows else 0), [row["id"] for row in rows]


def claim_unpurged_sessions(conn: Connection, after: tuple[datetime, UUID] | None, limit: int) -> list[Row]:
    after_updated_at, after_id = after if after else (None, None)
    return conn.all("claim_unpurged_sessions", after_updated_at=after_updated_at, after_id=after_id, limit=limit)


def mark_purged(conn: Connection, session_ids: list[UUID]) -> int:
    return conn.execute("mark_purged", ids=session_ids)


def stale_completions(conn: Connection, lease: float, after: tuple[datetime, UUID] | None, limit: int) -> list[Row]:
    after_updated_at, after_id = after if after else (None, None)
    return conn.all(
        "stale_completions", lease=lease, after_updated_at=after_updated_at, after_id=after_id, limit=limit
    )


def sessions_for_sweep(conn: Connection, session_ids: list[UUID]) -> list[Row]:
    return conn.all("sessions_for_sweep", ids=session_ids)


def referenced_part_keys(conn: Connection, session_ids: list[UUID], storage_keys: list[str]) -> set[str]:
    rows = conn.all("referenced_part_keys", session_ids=session_ids, storage_keys=storage_keys)
    return {row["storage_key"] for row in rows}


def try_reaper_lock(conn: Connection, phase: str) -> bool:
    return conn.one("try_reaper_lock", phase=phase)["locked"]


def release_reaper_lock(conn: Connection, phase: str) -> bool:
    return conn.one("release_reaper_lock", phase=phase)["released"]
