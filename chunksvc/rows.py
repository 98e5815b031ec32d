"""The typed shape of every row a named statement returns: one frozen dataclass per shape.

``dao`` builds these from result columns by name (``db.dataclass_row``), so each field is a
column the statement must return: a renamed or missing column fails on the statement's first
row, naming the statement and the column, instead of as a ``KeyError`` deep in a service. Services
take and return these; the renderers in ``chunksvc.resources`` turn them into the contract's JSON.

This module imports nothing of the service: every layer may use it, as every layer uses ``errors``.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from uuid import UUID


@dataclasses.dataclass(frozen=True)
class SessionRow:
    """A row of ``upload_sessions`` with ``effective_status``.

    ``status`` is the status as stored; ``effective_status`` is the one clients see (an open
    session past its expiry reads ``EXPIRED`` before the reaper stores it): every decision about
    what a request may do, and every answer, goes by ``effective_status``.
    """

    id: UUID
    client_id: int
    status: str
    filename: str
    content_type: str
    size: int
    part_size: int
    total_parts: int
    received_parts: int
    received_bytes: int
    sha256: str | None
    metadata: dict[str, str]
    idempotency_key: str | None
    request_fingerprint: bytes | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    # The assembled object: all three set exactly when COMPLETED.
    object_key: str | None
    object_size: int | None
    object_sha256: str | None
    purged_at: datetime | None
    assembled_bytes: int | None  # while COMPLETING: bytes of the object written so far
    effective_status: str


@dataclasses.dataclass(frozen=True)
class TusStateRow(SessionRow):
    """A session as ``/tus/`` sees it (``tus_state``): its tus row's columns (``concat`` is
    ``none`` for a session the native API created), the bytes of its parts 1..n received without
    a gap, and the pieces stored so far of the part after them."""

    tus_created: bool  # created by POST /tus/ (else by the native API)
    tus_metadata: str | None  # Upload-Metadata as sent at creation
    concat: str  # none, partial or final
    final_id: UUID | None  # a partial: the final upload it went into
    contiguous_parts: int
    contiguous_bytes: int
    # The part in the making (number contiguous_parts + 1): its pieces' bytes, keys and sizes.
    held_bytes: int
    held_keys: list[str]
    held_sizes: list[int]


@dataclasses.dataclass(frozen=True)
class OpsSessionRow(SessionRow):
    """A session with its client's name and completion lease: the operator's view (``sessions
    list`` / ``show``)."""

    client_name: str
    # Who assembles it while COMPLETING (a process's lease id), and until when (the database's
    # clock); both None when no one holds the lease.
    completion_owner: UUID | None
    completion_lease_until: datetime | None


@dataclasses.dataclass(frozen=True)
class PartSessionRow:
    """What a part's checks read of its session (``authenticate``, on the part path)."""

    id: UUID
    effective_status: str
    size: int
    part_size: int
    total_parts: int


@dataclasses.dataclass(frozen=True)
class AuthRow:
    """``authenticate``: the client behind an unrevoked API key or an upload token and what a
    part's checks read of a session (None when not found or none asked for): for a key, the
    session asked for if it is that client's; for a token, always the token's own session.

    ``token_session_id`` is the token's session (None: an API key); ``token_expired`` whether the
    token is past its expiry (False for a key)."""

    client_id: int
    client_name: str
    session: PartSessionRow | None
    token_session_id: UUID | None = None
    token_expired: bool = False


@dataclasses.dataclass(frozen=True)
class UploadTokenRow:
    """``insert_upload_token``: a token minted (its value is only ever in the answer)."""

    session_id: UUID
    expires_at: datetime


@dataclasses.dataclass(frozen=True)
class ClientRow:
    """A row of ``clients``."""

    id: int
    name: str


@dataclasses.dataclass(frozen=True)
class ApiKeyRow:
    """An API key as ``keys list`` shows it (never its hash)."""

    client_name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclasses.dataclass(frozen=True)
class RevokedKeyRow:
    """A key ``revoke_api_keys`` just revoked."""

    client_name: str
    prefix: str


@dataclasses.dataclass(frozen=True)
class PartRow:
    """A row of ``upload_parts`` (of a session the caller names)."""

    part_number: int
    size: int
    sha256: str
    storage_key: str
    created_at: datetime


@dataclasses.dataclass(frozen=True)
class RecordedPartRow:
    """What ``record_part`` did, and the session's counters under its row lock.

    ``inserted``: the part is new (False: the number was taken, or the session takes no parts).
    ``status``: the session's status after the part (``IN_PROGRESS`` once one was inserted).
    """

    effective_status: str
    inserted: bool
    received_parts: int
    received_bytes: int
    status: str


@dataclasses.dataclass(frozen=True)
class FrontierRow:
    """A session's hash frontier, as its lease's new holder finds it (``take_frontier``)."""

    id: UUID
    part_size: int
    total_parts: int
    size: int
    frontier_parts: int  # parts 1..frontier_parts are hashed into frontier_state
    frontier_bytes: int
    frontier_state: bytes | None  # chunksvc.hashstate's saved SHA-256; None before the first part
    staged_id: str | None  # the session's staging (StagedObject.begin), if one was begun


@dataclasses.dataclass(frozen=True)
class PieceAttemptRow:
    """A request's turn at a part sent straight into the session's staging (``take_piece``)."""

    attempts: int  # this request's number among every request for the part (from 1)
    staged_id: str | None  # the session's staging; None: none begun yet


@dataclasses.dataclass(frozen=True)
class StagedPieceRow:
    """A part of a session being staged, with the token of its piece (``staged_pieces``)."""

    part_number: int
    size: int
    sha256: str
    storage_key: str
    staged_token: str | None  # None: not copied into the staging (yet)


@dataclasses.dataclass(frozen=True)
class CompletionRow:
    """A ``COMPLETING`` session to drive to its end (the background assembler, the reaper)."""

    id: UUID
    client_id: int
    updated_at: datetime  # the keyset cursor of the reaper's scan


@dataclasses.dataclass(frozen=True)
class EndedSessionRow:
    """An ended session whose stored bytes the reaper's purge removes."""

    id: UUID
    status: str
    updated_at: datetime  # the keyset cursor of the purge's scan


@dataclasses.dataclass(frozen=True)
class SweptSessionRow:
    """The owner of stored keys the orphan sweep found: its status and whether it was purged."""

    id: UUID
    status: str
    purged: bool


@dataclasses.dataclass(frozen=True)
class OverdueRow:
    """An overdue open session, with how many there are in all."""

    id: UUID
    overdue: int


@dataclasses.dataclass(frozen=True)
class CensusRow:
    """One line of ``session_census``: a status (or ``overdue``, ``unpurged``) and its count."""

    status: str
    sessions: int


# --- webhooks -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WebhookEndpointRow:
    """A client's webhook endpoint. Its secret is derived from ``secret_nonce`` and the signing
    key ``key_id`` names (``chunksvc.services.webhook_signing``); ``previous_nonce`` signs beside it
    during a secret roll, until ``previous_until``."""

    id: int
    client_id: int
    client_name: str
    url: str
    secret_nonce: bytes
    key_id: str
    previous_nonce: bytes | None
    previous_until: datetime | None
    created_at: datetime
    removed_at: datetime | None


@dataclasses.dataclass(frozen=True)
class WebhookEndpointStateRow:
    """An endpoint in use, with its deliveries: ``pending`` (of which ``failing`` have failed at
    least once) and ``dead``."""

    id: int
    client_name: str
    url: str
    key_id: str  # the signing key its secret was derived from
    created_at: datetime
    previous_until: datetime | None
    pending: int
    failing: int
    dead: int


@dataclasses.dataclass(frozen=True)
class ClaimedDeliveryRow:
    """A delivery a deliverer has claimed (leased) and is about to attempt: the event, the
    endpoint, and the nonces of the secrets that sign it (``previous_nonce`` only during a roll)."""

    event_id: UUID
    endpoint_id: int
    session_id: UUID
    attempts: int  # this attempt included
    claim: UUID  # this attempt's hold on the row: only it may record a failure
    type: str
    event_created_at: datetime
    url: str
    key_id: str
    secret_nonce: bytes
    previous_nonce: bytes | None


@dataclasses.dataclass(frozen=True)
class EventSessionRow(SessionRow):
    """The session an event carries, as the change that made the event left it."""

    event_id: UUID


@dataclasses.dataclass(frozen=True)
class WebhookCensusRow:
    """The delivery gauges: pending deliveries not yet failed, pending ones that have, dead ones."""

    pending_new: int
    failing: int
    dead: int


@dataclasses.dataclass(frozen=True)
class WebhookDeliveryRow:
    """One event to one endpoint, as ``webhooks events`` lists it."""

    event_id: UUID
    type: str
    event_created_at: datetime
    session_id: UUID
    endpoint_id: int
    state: str
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None


@dataclasses.dataclass(frozen=True)
class PrunableEventRow:
    """An event old enough to be pruned, none of whose deliveries is pending (at the claim)."""

    id: UUID
    created_at: datetime  # the keyset cursor of the prune's walk


@dataclasses.dataclass(frozen=True)
class PrunableCountRow:
    """An event a prune would remove now, with how many there are in all (a dry run)."""

    id: UUID
    prunable: int


@dataclasses.dataclass(frozen=True)
class RedeliveryRow:
    """What ``redeliver_webhook_event`` did: whether the event exists, and the endpoints it is due
    to again (none: every delivery is pending, or its endpoints were removed)."""

    found: bool
    endpoints: list[int]


@dataclasses.dataclass(frozen=True)
class UsageRow:
    """A client's open sessions and open bytes, with its overrides (None: the configured default)."""

    open_sessions: int
    open_bytes: int
    max_sessions: int | None
    max_bytes: int | None


@dataclasses.dataclass(frozen=True)
class ClientUsageRow(UsageRow):
    """``UsageRow`` of a named client (``client_usage``)."""

    client_id: int
    client_name: str
    rate_limit: float | None  # requests a second; None: the configured default
    rate_burst: int | None


@dataclasses.dataclass(frozen=True)
class RateOverrideRow:
    """A client's rate override (``rate_overrides``); a None column is the configured default."""

    client_id: int
    rate_limit: float | None
    rate_burst: int | None


@dataclasses.dataclass(frozen=True)
class RateTokenRow:
    """What ``take_rate_token`` left in the client's bucket, and how many tokens it took (0: none
    was there, the request is refused)."""

    tokens: float
    taken: int
