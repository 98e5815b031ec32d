"""Per-client quotas (contract v1.2, "Sharing one service"): open sessions and open bytes.

A create counts the client's open sessions under the client's row lock, in the transaction that
inserts the session (``dao.lock_client_usage``), so creates racing on any number of hosts cannot
both take the last free slot, and a session that ends frees its room for the next create at once.
The limits are the configured defaults (``config.Quotas``) unless an operator set an override
(``python -m chunksvc limits set``).
"""

from __future__ import annotations

import dataclasses

from chunksvc import dao
from chunksvc.config import Quotas
from chunksvc.db import Connection, Database
from chunksvc.errors import QuotaExceeded
from chunksvc.rows import UsageRow


@dataclasses.dataclass(frozen=True)
class Usage:
    """A client's limits and what it uses of them."""

    sessions_limit: int
    sessions_used: int
    bytes_limit: int
    bytes_used: int


class QuotaService:
    def __init__(self, db: Database, defaults: Quotas) -> None:
        self._db = db
        self._defaults = defaults

    def usage_of(self, row: UsageRow) -> Usage:
        sessions = self._defaults.sessions if row.max_sessions is None else row.max_sessions
        size = self._defaults.bytes if row.max_bytes is None else row.max_bytes
        return Usage(sessions, row.open_sessions, size, row.open_bytes)

    def usage(self, client_id: int) -> Usage:
        with self._db.connection() as conn:
            (row,) = dao.client_usage(conn, client_id=client_id)
        return self.usage_of(row)

    def lock(self, conn: Connection, client_id: int) -> Usage:
        """Inside a create's transaction: serialise the client's creates and count its use."""
        return self.usage_of(dao.lock_client_usage(conn, client_id))

    @staticmethod
    def check(usage: Usage, size: int) -> None:
        """``QuotaExceeded`` unless one more open session of ``size`` bytes fits (sessions first)."""
        if usage.sessions_used + 1 > usage.sessions_limit:
            raise QuotaExceeded(
                f"the client has {usage.sessions_used} open sessions, its limit is {usage.sessions_limit}:"
                " complete or abort some first",
                quota="sessions",
                limit=usage.sessions_limit,
                used=usage.sessions_used,
                requested=1,
            )
        if usage.bytes_used + size > usage.bytes_limit:
            raise QuotaExceeded(
                f"the client's open sessions hold {usage.bytes_used} bytes, its limit is {usage.bytes_limit}:"
                f" {size} more do not fit",
                quota="bytes",
                limit=usage.bytes_limit,
                used=usage.bytes_used,
                requested=size,
            )
