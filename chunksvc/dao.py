"""One typed function per named statement in ``sql/queries.sql``; rows come back as ``chunksvc.rows``.

Functions take a ``db.Connection``; callers decide the transaction boundaries. Each function is
where a Python signature meets its statement's parameter names, and where the statement's
result gets its type: a row dataclass (``db.dataclass_row``), or a checked value (a lease taken,
a list of ids). Nothing above this module indexes a row by column name. Leases (rows with an owner
and an expiry) are taken, renewed and given back here; ``services.leases`` keeps them alive.

Why these functions, and not a loader that turns the file into callables (aiosql reads exactly
this ``-- name:`` format)? The loader the house needs is already here, and small:
``db.load_queries`` splits the file on its headers, and ``db.Connection`` runs a statement by
name with psycopg's errors translated at that one boundary. That is procrastinate's model too:
its ``sql/queries.sql`` is parsed into a dict, and typed methods of its job manager run the
statements and turn rows into its objects, as these functions do. What a method-generating
loader would retire is these functions, and with them the one thing they add, types: aiosql's
query methods are attributes made at run time, so to mypy each call is ``Callable[..., Any]``;
a misspelt parameter, an argument of the wrong type or a row read the wrong way would be found
by a request, not by ``mypy --strict``. Its record classes are built from every column by
keyword, which breaks on a column a migration adds while the previous release still serves
(see ``db.dataclass_row``). It would be one more dependency, and 57 statements would move to
its ``:name`` parameters and operation suffixes (``^`` one row, ``$`` a value, ``!`` a count),
which say in the file what each function's signature says here. And a third of these
functions do what no loader does: wrap a jsonb parameter, unpack a keyset cursor, turn rows
into a value (a lease taken, a set of keys, counts by status). The rest are a few lines each;
tests/test_dao.py keeps them and the file in step (every statement is run by exactly one
function here, and every name run here is in the file), so neither side can drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import RowMaker

from chunksvc.db import Connection, column_names, dataclass_row, json_param
from chunksvc.rows import (
    ApiKeyRow,
    AuthRow,
    CensusRow,
    ClaimedDeliveryRow,
    ClientRow,
    ClientUsageRow,
    CompletionRow,
    EndedSessionRow,
    EventSessionRow,
    FrontierRow,
    OpsSessionRow,
    OverdueRow,
    PartRow,
    PartSessionRow,
    PieceAttemptRow,
    PrunableCountRow,
    PrunableEventRow,
    RateOverrideRow,
    RateTokenRow,
    RecordedPartRow,
    RedeliveryRow,
    RevokedKeyRow,
    SessionRow,
    StagedPieceRow,
    SweptSessionRow,
    TusStateRow,
    UploadTokenRow,
    UsageRow,
    WebhookCensusRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
    WebhookEndpointStateRow,
)

_SESSION = dataclass_row(SessionRow)
_OPS_SESSION = dataclass_row(OpsSessionRow)
_PART = dataclass_row(PartRow)
_TUS_STATE = dataclass_row(TusStateRow)
_COMPLETION = dataclass_row(CompletionRow)
_FRONTIER = dataclass_row(FrontierRow)
_STAGED_PIECE = dataclass_row(StagedPieceRow)
_PIECE_ATTEMPT = dataclass_row(PieceAttemptRow)
_CLIENT = dataclass_row(ClientRow)
_USAGE = dataclass_row(UsageRow)
_CLIENT_USAGE = dataclass_row(ClientUsageRow)
_RATE_OVERRIDE = dataclass_row(RateOverrideRow)
_RATE_TOKEN = dataclass_row(RateTokenRow)
_API_KEY = dataclass_row(ApiKeyRow)
_REVOKED_KEY = dataclass_row(RevokedKeyRow)
_RECORDED_PART = dataclass_row(RecordedPartRow)
_CENSUS = dataclass_row(CensusRow)
_OVERDUE = dataclass_row(OverdueRow)
_ENDED_SESSION = dataclass_row(EndedSessionRow)
_SWEPT_SESSION = dataclass_row(SweptSessionRow)
_WEBHOOK_ENDPOINT = dataclass_row(WebhookEndpointRow)
_WEBHOOK_ENDPOINT_STATE = dataclass_row(WebhookEndpointStateRow)
_CLAIMED_DELIVERY = dataclass_row(ClaimedDeliveryRow)
_EVENT_SESSION = dataclass_row(EventSessionRow)
_WEBHOOK_CENSUS = dataclass_row(WebhookCensusRow)
_WEBHOOK_DELIVERY = dataclass_row(WebhookDeliveryRow)
_REDELIVERY = dataclass_row(RedeliveryRow)
_PRUNABLE_EVENT = dataclass_row(PrunableEventRow)
_PRUNABLE_COUNT = dataclass_row(PrunableCountRow)
_UPLOAD_TOKEN = dataclass_row(UploadTokenRow)


# --- clients and keys -----------------------------------------------------------------------


def _auth_row(cursor: psycopg.Cursor[Any]) -> RowMaker[AuthRow]:
    """``authenticate``'s row: the key's client, then what a part's checks read of the session
    (its columns all NULL when no session of that client was asked for or found)."""
    if column_names(cursor) != _AUTH_COLUMNS:
        raise TypeError(f"authenticate returns {column_names(cursor)}, not {_AUTH_COLUMNS}")

    def make(values: Sequence[Any]) -> AuthRow:
        client_id, client_name, token_session_id, token_expired, session_id, status, size, part_size, total_parts = (
            values
        )
        session = PartSessionRow(session_id, status, size, part_size, total_parts) if session_id is not None else None
        return AuthRow(client_id, client_name, session, token_session_id, bool(token_expired))

    return make


_AUTH_COLUMNS = (
    "client_id",
    "client_name",
    "token_session_id",
    "token_expired",
    "session_id",
    "effective_status",
    "size",
    "part_size",
    "total_parts",
)


def authenticate(
    conn: Connection, key_hash: bytes | None, session_id: UUID | None = None, *, token_hash: bytes | None = None
) -> AuthRow | None:
    """By an API key's hash, or (``key_hash`` None) by an upload token's."""
    return conn.one("authenticate", _auth_row, key_hash=key_hash, token_hash=token_hash, session_id=session_id)


def upsert_client(conn: Connection, name: str) -> ClientRow:
    client = conn.one("upsert_client", _CLIENT, name=name)
    assert client is not None  # INSERT ... ON CONFLICT DO UPDATE ... RETURNING always returns it
    return client


def insert_api_key(conn: Connection, client_id: int, prefix: str, key_hash: bytes) -> None:
    conn.execute("insert_api_key", client_id=client_id, prefix=prefix, key_hash=key_hash)


def list_api_keys(conn: Connection) -> list[ApiKeyRow]:
    return conn.all("list_api_keys", _API_KEY)


def revoke_api_keys(conn: Connection, target: str) -> list[RevokedKeyRow]:
    return conn.all("revoke_api_keys", _REVOKED_KEY, target=target)


def insert_upload_token(
    conn: Connection, token_hash: bytes, session_id: UUID, client_id: int, ttl: int
) -> UploadTokenRow | None:
    return conn.one(
        "insert_upload_token", _UPLOAD_TOKEN, token_hash=token_hash, session_id=session_id, client_id=client_id, ttl=ttl
    )


def delete_dead_upload_tokens(conn: Connection, limit: int) -> list[UUID]:
    """The sessions of the tokens removed (one entry per token)."""
    return conn.values("delete_dead_upload_tokens", UUID, limit=limit)


def count_dead_upload_tokens(conn: Connection) -> int:
    return conn.value("count_dead_upload_tokens", int)


# --- sessions -------------------------------------------------------------------------------


def insert_session(
    conn: Connection,
    *,
    id: UUID,
    client_id: int,
    filename: str,
    content_type: str,
    size: int,
    part_size: int,
    total_parts: int,
    sha256: str | None,
    metadata: dict[str, str],
    idempotency_key: str | None,
    request_fingerprint: bytes | None,
    ttl: int,
) -> SessionRow | None:
    """The new session; None when the client already used this Idempotency-Key."""
    return conn.one(
        "insert_session",
        _SESSION,
        id=id,
        client_id=client_id,
        filename=filename,
        content_type=content_type,
        size=size,
        part_size=part_size,
        total_parts=total_parts,
        sha256=sha256,
        metadata=json_param(metadata),
        idempotency_key=idempotency_key,
        request_fingerprint=request_fingerprint,
        ttl=ttl,
    )


def get_session_by_idempotency_key(conn: Connection, client_id: int, idempotency_key: str) -> SessionRow | None:
    return conn.one("get_session_by_idempotency_key", _SESSION, client_id=client_id, idempotency_key=idempotency_key)


def get_session(conn: Connection, session_id: UUID, client_id: int) -> SessionRow | None:
    return conn.one("get_session", _SESSION, id=session_id, client_id=client_id)


def ops_list_sessions(conn: Connection, client: str | None, status: str | None, limit: int) -> list[OpsSessionRow]:
    return conn.all("ops_list_sessions", _OPS_SESSION, client=client, status=status, limit=limit)


def ops_get_session(conn: Connection, session_id: UUID) -> OpsSessionRow | None:
    return conn.one("ops_get_session", _OPS_SESSION, id=session_id)


def lock_session(conn: Connection, session_id: UUID, client_id: int) -> SessionRow | None:
    return conn.one("lock_session", _SESSION, id=session_id, client_id=client_id)


def list_sessions(
    conn: Connection,
    client_id: int,
    status: str | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[SessionRow]:
    after_created_at, after_id = after if after else (None, None)
    return conn.all(
        "list_sessions",
        _SESSION,
        client_id=client_id,
        status=status,
        after_created_at=after_created_at,
        after_id=after_id,
        limit=limit,
    )


def mark_completing(conn: Connection, session_id: UUID, sha256: str | None) -> SessionRow:
    """The session, now COMPLETING; the caller holds its row lock (``lock_session``)."""
    session = conn.one("mark_completing", _SESSION, id=session_id, sha256=sha256)
    assert session is not None  # the row is locked by the caller: it exists
    return session


def mark_completed(
    conn: Connection, session_id: UUID, owner: UUID, object_key: str, object_size: int, object_sha256: str
) -> SessionRow | None:
    """The completed session; None when ``owner`` no longer holds its completion lease on a
    COMPLETING session (nothing changed)."""
    return conn.one(
        "mark_completed",
        _SESSION,
        id=session_id,
        owner=owner,
        object_key=object_key,
        object_size=object_size,
        object_sha256=object_sha256,
    )


def mark_failed(conn: Connection, session_id: UUID, owner: UUID) -> bool:
    """Whether the session is now FAILED (False: ``owner`` no longer held its completion lease)."""
    return conn.execute("mark_failed", id=session_id, owner=owner) > 0


def take_completion_lease(conn: Connection, session_id: UUID, owner: UUID, seconds: float) -> bool:
    """Whether ``owner`` now holds the session's completion lease for ``seconds`` (False: a live
    holder has it). The caller holds the session's row lock (``lock_session``)."""
    return bool(conn.values("take_completion_lease", UUID, id=session_id, owner=owner, seconds=seconds))


def renew_completion_lease(conn: Connection, session_id: UUID, owner: UUID, seconds: float, assembled: int) -> bool:
    """Whether ``owner`` still holds the lease (now for ``seconds`` more, progress recorded)."""
    return bool(
        conn.values("renew_completion_lease", UUID, id=session_id, owner=owner, seconds=seconds, assembled=assembled)
    )


def release_completion_lease(conn: Connection, session_id: UUID, owner: UUID) -> bool:
    """Whether ``owner`` held the lease (and has now given it back)."""
    return conn.execute("release_completion_lease", id=session_id, owner=owner) > 0


def pending_assemblies(conn: Connection, limit: int) -> list[CompletionRow]:
    return conn.all("pending_assemblies", _COMPLETION, limit=limit)


def mark_aborted(conn: Connection, session_id: UUID) -> int:
    return conn.execute("mark_aborted", id=session_id)


# --- parts ----------------------------------------------------------------------------------


def list_parts(conn: Connection, session_id: UUID, after: int, limit: int) -> list[PartRow]:
    return conn.all("list_parts", _PART, session_id=session_id, after=after, limit=limit)


def record_part(
    conn: Connection,
    session_id: UUID,
    client_id: int,
    part_number: int,
    size: int,
    sha256: str,
    storage_key: str,
) -> RecordedPartRow | None:
    return conn.one(
        "record_part",
        _RECORDED_PART,
        session_id=session_id,
        client_id=client_id,
        part_number=part_number,
        size=size,
        sha256=sha256,
        storage_key=storage_key,
    )


def get_part(conn: Connection, session_id: UUID, part_number: int) -> PartRow | None:
    return conn.one("get_part", _PART, session_id=session_id, part_number=part_number)


def heal_part(
    conn: Connection,
    session_id: UUID,
    client_id: int,
    part_number: int,
    sha256: str,
    old_key: str,
    new_key: str,
) -> bool:
    """Whether the part's row now points at ``new_key``."""
    healed = conn.execute(
        "heal_part",
        session_id=session_id,
        client_id=client_id,
        part_number=part_number,
        sha256=sha256,
        old_key=old_key,
        new_key=new_key,
    )
    return healed > 0


def drop_lost_parts(
    conn: Connection, session_id: UUID, owner: UUID, storage_keys: list[str], ttl: int
) -> SessionRow | None:
    """The reopened session; None when it was not COMPLETING under ``owner``'s completion lease
    (nothing changed)."""
    return conn.one("drop_lost_parts", _SESSION, id=session_id, owner=owner, storage_keys=storage_keys, ttl=ttl)


def missing_parts(conn: Connection, session_id: UUID, total_parts: int, limit: int) -> list[int]:
    return conn.values("missing_parts", int, session_id=session_id, total_parts=total_parts, limit=limit)


def part_sources(conn: Connection, session_id: UUID) -> list[PartRow]:
    return conn.all("part_sources", _PART, session_id=session_id)


def parts_from(conn: Connection, session_id: UUID, after: int, limit: int) -> list[PartRow]:
    return conn.all("parts_from", _PART, session_id=session_id, after=after, limit=limit)


# --- the hash frontier ----------------------------------------------------------------------


def take_frontier(conn: Connection, session_id: UUID, owner: UUID, seconds: float) -> FrontierRow | None:
    """The frontier, now ``owner``'s for ``seconds``; None while a live holder has it."""
    return conn.one("take_frontier", _FRONTIER, id=session_id, owner=owner, seconds=seconds)


def save_frontier(
    conn: Connection, session_id: UUID, owner: UUID, parts: int, hashed: int, state: bytes, seconds: float
) -> bool:
    """Whether ``owner`` still held the frontier, and saved this step (lease pushed on)."""
    saved = conn.values(
        "save_frontier", UUID, id=session_id, owner=owner, parts=parts, bytes=hashed, state=state, seconds=seconds
    )
    return bool(saved)


def release_frontier(conn: Connection, session_id: UUID, owner: UUID) -> bool:
    return bool(conn.values("release_frontier", UUID, id=session_id, owner=owner))


# --- staged objects -------------------------------------------------------------------------


def begin_staging(conn: Connection, session_id: UUID, owner: UUID, staged_id: str) -> bool:
    """Whether ``owner`` (the frontier's holder) recorded ``staged_id`` as the session's staging."""
    return bool(conn.values("begin_staging", UUID, id=session_id, owner=owner, staged_id=staged_id))


def record_staged_piece(
    conn: Connection, session_id: UUID, staged_id: str, part_number: int, sha256: str, token: str
) -> bool:
    """Whether the part (still those bytes, in that staging) now records its piece's token."""
    recorded = conn.values(
        "record_staged_piece",
        int,
        id=session_id,
        staged_id=staged_id,
        part_number=part_number,
        sha256=sha256,
        token=token,
    )
    return bool(recorded)


def staged_pieces(conn: Connection, session_id: UUID) -> list[StagedPieceRow]:
    return conn.all("staged_pieces", _STAGED_PIECE, session_id=session_id)


def forget_staging(conn: Connection, session_id: UUID, staged_id: str) -> bool:
    return bool(conn.values("forget_staging", UUID, id=session_id, staged_id=staged_id))


def take_piece(conn: Connection, session_id: UUID, part_number: int) -> PieceAttemptRow | None:
    """This request's attempt at the part and the session's staging (``take_piece``); None if the
    part is recorded already or the session takes no parts."""
    return conn.one("take_piece", _PIECE_ATTEMPT, id=session_id, part_number=part_number)


def begin_part_staging(conn: Connection, session_id: UUID, staged_id: str) -> bool:
    """Whether ``staged_id`` is now the session's staging (it had none and still takes parts)."""
    return bool(conn.values("begin_part_staging", UUID, id=session_id, staged_id=staged_id))


def session_staging(conn: Connection, session_id: UUID) -> str | None:
    found = conn.values("session_staging", str, id=session_id)
    return found[0] if found else None


def live_stagings(conn: Connection) -> set[str]:
    return set(conn.values("live_stagings", str))


# --- health ---------------------------------------------------------------------------------


def ping(conn: Connection) -> bool:
    return conn.value("ping", int) == 1


# --- metrics --------------------------------------------------------------------------------


def set_local_statement_timeout(conn: Connection, seconds: float) -> None:
    """Bound the rest of the caller's transaction's statements to ``seconds`` each."""
    conn.execute("set_local_statement_timeout", milliseconds=max(1, round(seconds * 1000)))


def session_census(conn: Connection) -> dict[str, int]:
    """Sessions by status (INIT, IN_PROGRESS, COMPLETING) and awaiting the reaper (``overdue``:
    open past expiry; ``unpurged``: ended, stored bytes not removed yet). Absent keys are 0."""
    return {row.status: row.sessions for row in conn.all("session_census", _CENSUS)}


# --- reaper ---------------------------------------------------------------------------------


def expire_overdue_sessions(conn: Connection, limit: int) -> list[UUID]:
    return conn.values("expire_overdue_sessions", UUID, limit=limit)


def overdue_sessions(conn: Connection, limit: int) -> tuple[int, list[UUID]]:
    """How many open sessions are overdue, and the first ``limit`` of them."""
    rows = conn.all("overdue_sessions", _OVERDUE, limit=limit)
    return (rows[0].overdue if rows else 0), [row.id for row in rows]


def claim_unpurged_sessions(conn: Connection, after: tuple[datetime, UUID] | None, limit: int) -> list[EndedSessionRow]:
    after_updated_at, after_id = after if after else (None, None)
    return conn.all(
        "claim_unpurged_sessions",
        _ENDED_SESSION,
        after_updated_at=after_updated_at,
        after_id=after_id,
        limit=limit,
    )


def mark_purged(conn: Connection, session_ids: list[UUID]) -> int:
    return conn.execute("mark_purged", ids=session_ids)


def stale_completions(
    conn: Connection, lease: float, after: tuple[datetime, UUID] | None, limit: int
) -> list[CompletionRow]:
    after_updated_at, after_id = after if after else (None, None)
    return conn.all(
        "stale_completions",
        _COMPLETION,
        lease=lease,
        after_updated_at=after_updated_at,
        after_id=after_id,
        limit=limit,
    )


def sessions_for_sweep(conn: Connection, session_ids: list[UUID]) -> list[SweptSessionRow]:
    return conn.all("sessions_for_sweep", _SWEPT_SESSION, ids=session_ids)


def referenced_part_keys(conn: Connection, session_ids: list[UUID], storage_keys: list[str]) -> set[str]:
    return set(conn.values("referenced_part_keys", str, session_ids=session_ids, storage_keys=storage_keys))


def take_reaper_lease(conn: Connection, name: str, owner: UUID, seconds: float) -> bool:
    """Whether ``owner`` now holds the lease ``name`` (a reaper phase, or the periodic run) for
    ``seconds`` (False: another reaper holds it)."""
    return bool(conn.values("take_reaper_lease", UUID, name=name, owner=owner, seconds=seconds))


def renew_reaper_lease(conn: Connection, name: str, owner: UUID, seconds: float) -> bool:
    """Whether ``owner`` still holds the lease (now for ``seconds`` more)."""
    return bool(conn.values("renew_reaper_lease", UUID, name=name, owner=owner, seconds=seconds))


def release_reaper_lease(conn: Connection, name: str, owner: UUID) -> bool:
    """Whether ``owner`` held the lease (and has now given it back)."""
    return conn.execute("release_reaper_lease", name=name, owner=owner) > 0


# --- webhooks -------------------------------------------------------------------------------


def insert_webhook_endpoint(
    conn: Connection, client_name: str, url: str, secret_nonce: bytes, key_id: str
) -> WebhookEndpointRow | None:
    """The new endpoint; None when no client has that name."""
    return conn.one(
        "insert_webhook_endpoint",
        _WEBHOOK_ENDPOINT,
        client_name=client_name,
        url=url,
        secret_nonce=secret_nonce,
        key_id=key_id,
    )


def get_webhook_endpoint(conn: Connection, endpoint_id: int) -> WebhookEndpointRow | None:
    return conn.one("get_webhook_endpoint", _WEBHOOK_ENDPOINT, id=endpoint_id)


def list_webhook_endpoints(conn: Connection, client_name: str | None) -> list[WebhookEndpointStateRow]:
    return conn.all("list_webhook_endpoints", _WEBHOOK_ENDPOINT_STATE, client_name=client_name)


def remove_webhook_endpoint(conn: Connection, endpoint_id: int) -> bool:
    """True when the endpoint was in use (and now is not)."""
    return bool(conn.values("remove_webhook_endpoint", int, id=endpoint_id))


def drop_pending_deliveries(conn: Connection, endpoint_id: int) -> int:
    return conn.execute("drop_pending_deliveries", endpoint_id=endpoint_id)


def rotate_webhook_secret(
    conn: Connection, endpoint_id: int, secret_nonce: bytes, key_id: str, overlap: int
) -> WebhookEndpointRow | None:
    return conn.one(
        "rotate_webhook_secret",
        _WEBHOOK_ENDPOINT,
        id=endpoint_id,
        secret_nonce=secret_nonce,
        key_id=key_id,
        overlap=overlap,
    )


def redeliver_webhook_event(conn: Connection, event_id: UUID) -> list[int] | None:
    """The endpoints the event is due to again (none: all pending, or its endpoints are gone);
    None when there is no such event (never made, or pruned)."""
    row = conn.one("redeliver_webhook_event", _REDELIVERY, event_id=event_id)
    return row.endpoints if row is not None and row.found else None


def claim_webhook_deliveries(
    conn: Connection,
    limit: int,
    lease: float,
    busy_endpoints: Sequence[int],
    key_id: str,
    only_endpoints: Sequence[int] | None = None,
) -> list[ClaimedDeliveryRow]:
    return conn.all(
        "claim_webhook_deliveries",
        _CLAIMED_DELIVERY,
        limit=limit,
        lease=lease,
        busy_endpoints=list(busy_endpoints),
        key_id=key_id,
        only_endpoints=None if only_endpoints is None else list(only_endpoints),
    )


def event_sessions(conn: Connection, event_ids: Sequence[UUID]) -> dict[UUID, EventSessionRow]:
    return {row.event_id: row for row in conn.all("event_sessions", _EVENT_SESSION, event_ids=list(event_ids))}


def record_webhook_delivered(conn: Connection, event_id: UUID, endpoint_id: int, status: int) -> float | None:
    """Seconds from the event's state change to this delivery; None if it was delivered before."""
    latencies = conn.values(
        "record_webhook_delivered", float, event_id=event_id, endpoint_id=endpoint_id, status=status
    )
    return latencies[0] if latencies else None


def record_webhook_failed(
    conn: Connection,
    event_id: UUID,
    endpoint_id: int,
    *,
    claim: UUID,
    status: int | None,
    error: str,
    retry_in: float,
    retry_for: float,
) -> str | None:
    """The delivery's state after the failure (``pending`` or ``dead``); None when ``claim`` no
    longer holds it (delivered, or claimed again, meanwhile by another deliverer)."""
    states = conn.values(
        "record_webhook_failed",
        str,
        event_id=event_id,
        endpoint_id=endpoint_id,
        claim=claim,
        status=status,
        error=error,
        retry_in=retry_in,
        retry_for=retry_for,
    )
    return states[0] if states else None


def webhook_census(conn: Connection) -> WebhookCensusRow:
    census = conn.one("webhook_census", _WEBHOOK_CENSUS)
    assert census is not None  # an aggregate without GROUP BY always returns its one row
    return census


def list_webhook_deliveries(
    conn: Connection, *, endpoint_id: int | None, session_id: UUID | None, state: str | None, limit: int
) -> list[WebhookDeliveryRow]:
    return conn.all(
        "list_webhook_deliveries",
        _WEBHOOK_DELIVERY,
        endpoint_id=endpoint_id,
        session_id=session_id,
        state=state,
        limit=limit,
    )


def set_webhook_url(conn: Connection, endpoint_id: int, url: str) -> WebhookEndpointRow | None:
    return conn.one("set_webhook_url", _WEBHOOK_ENDPOINT, id=endpoint_id, url=url)


# --- webhook retention ----------------------------------------------------------------------


def prunable_webhook_events(conn: Connection, retention: float, limit: int) -> tuple[int, list[UUID]]:
    """How many events a prune would remove now (older than ``retention`` seconds, no delivery
    pending), and the first ``limit`` of them, oldest first."""
    rows = conn.all("prunable_webhook_events", _PRUNABLE_COUNT, retention=retention, limit=limit)
    return (rows[0].prunable if rows else 0), [row.id for row in rows]


def claim_prunable_webhook_events(
    conn: Connection, retention: float, after: tuple[datetime, UUID] | None, limit: int
) -> list[PrunableEventRow]:
    """The next ``limit`` events to prune after the cursor, locked until the transaction ends."""
    after_created_at, after_id = after if after else (None, None)
    return conn.all(
        "claim_prunable_webhook_events",
        _PRUNABLE_EVENT,
        retention=retention,
        after_created_at=after_created_at,
        after_id=after_id,
        limit=limit,
    )


def lock_webhook_deliveries_of_events(conn: Connection, event_ids: list[UUID]) -> None:
    """Lock these events' deliveries until the transaction ends (see the statement)."""
    conn.values("lock_webhook_deliveries_of_events", UUID, ids=event_ids)


def prune_webhook_events(conn: Connection, event_ids: list[UUID]) -> list[UUID]:
    """Remove these events with their deliveries, but none that has a pending delivery now; the
    ids removed."""
    return conn.values("prune_webhook_events", UUID, ids=event_ids)


# --- quotas -------------------------------------------------------------------------------------


def lock_client_usage(conn: Connection, client_id: int) -> UsageRow:
    """The client's open sessions and bytes, counted under its row lock: two statements (see
    lock_client in queries.sql), so call it inside a transaction."""
    conn.values("lock_client", int, client_id=client_id)
    row = conn.one("open_usage", _USAGE, client_id=client_id)
    assert row is not None  # an aggregate always has its one row
    return row


def client_usage(
    conn: Connection, *, client_id: int | None = None, client_name: str | None = None
) -> list[ClientUsageRow]:
    return conn.all("client_usage", _CLIENT_USAGE, client_id=client_id, client_name=client_name)


def set_client_limits(
    conn: Connection,
    client_name: str,
    max_sessions: int | None,
    max_bytes: int | None,
    rate_limit: float | None = None,
    rate_burst: int | None = None,
) -> bool:
    """False when no client has that name. A None keeps what is stored."""
    return bool(
        conn.values(
            "set_client_limits",
            int,
            client_name=client_name,
            max_sessions=max_sessions,
            max_bytes=max_bytes,
            rate_limit=rate_limit,
            rate_burst=rate_burst,
        )
    )


def rate_overrides(conn: Connection) -> list[RateOverrideRow]:
    return conn.all("rate_overrides", _RATE_OVERRIDE)


def take_rate_tokens(conn: Connection, client_id: int, rate: float, burst: float, want: int) -> RateTokenRow:
    row = conn.one("take_rate_token", _RATE_TOKEN, client_id=client_id, rate=rate, burst=burst, want=want)
    assert row is not None  # an upsert's RETURNING always has its row
    return row


def reset_client_limits(conn: Connection, client_name: str) -> None:
    conn.values("reset_client_limits", int, client_name=client_name)


def client_exists(conn: Connection, client_name: str) -> bool:
    return bool(conn.values("client_id_by_name", int, client_name=client_name))


# --- tus (migration 0011) -------------------------------------------------------------------


def tus_state(conn: Connection, session_id: UUID, client_id: int) -> TusStateRow | None:
    return conn.one("tus_state", _TUS_STATE, id=session_id, client_id=client_id)


def lock_tus_state(conn: Connection, session_id: UUID, client_id: int) -> TusStateRow | None:
    return conn.one("lock_tus_state", _TUS_STATE, id=session_id, client_id=client_id)


def insert_tus_upload(conn: Connection, session_id: UUID, metadata: str | None, concat: str) -> None:
    conn.execute("insert_tus_upload", session_id=session_id, metadata=metadata, concat=concat)


def add_tus_incomplete_part(
    conn: Connection, session_id: UUID, part_number: int, start: int, size: int, storage_key: str
) -> None:
    conn.execute(
        "add_tus_incomplete_part",
        session_id=session_id,
        part_number=part_number,
        start=start,
        size=size,
        storage_key=storage_key,
    )


def drop_tus_incomplete_parts(conn: Connection, session_id: UUID, part_number: int) -> list[str]:
    """The keys of the pieces dropped (their bytes go once this commits)."""
    return conn.values("drop_tus_incomplete_parts", str, session_id=session_id, part_number=part_number)


def concatenate_tus_partials(conn: Connection, final_id: UUID, client_id: int, partial_ids: list[UUID]) -> list[UUID]:
    """The partials the final took (fewer than asked: one was not eligible)."""
    return conn.values(
        "concatenate_tus_partials", UUID, final_id=final_id, client_id=client_id, partial_ids=partial_ids
    )


def tus_partials_of(conn: Connection, final_id: UUID) -> list[UUID]:
    return conn.values("tus_partials_of", UUID, final_id=final_id)


def mark_tus_final_ready(conn: Connection, final_id: UUID) -> bool:
    """Whether the final upload now has all its bytes (every partial's parts are recorded)."""
    return bool(conn.values("mark_tus_final_ready", UUID, final_id=final_id))
