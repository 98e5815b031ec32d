-- Per-client quotas (contract v1.2, "Sharing one service"): an operator's overrides of the
-- configured defaults (CHUNKSVC_QUOTA_SESSIONS, CHUNKSVC_QUOTA_BYTES). A NULL column, or no row,
-- means the default, so a changed default reaches every client without an override at once.

CREATE TABLE client_limits (
    client_id    bigint PRIMARY KEY REFERENCES clients (id) ON DELETE CASCADE,
    max_sessions bigint CHECK (max_sessions >= 0),
    max_bytes    bigint CHECK (max_bytes >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- A create counts the client's open sessions and their bytes: this index holds only the open
-- ones, so the count reads what it counts, not the client's whole history.
CREATE INDEX upload_sessions_open_by_client_idx ON upload_sessions (client_id)
    INCLUDE (size, expires_at)
    WHERE status IN ('INIT', 'IN_PROGRESS', 'COMPLETING');
