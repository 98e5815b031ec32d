-- chunksvc schema: clients and their API keys, upload sessions and their parts.
-- Applied once by `python -m chunksvc migrate`, which records it in schema_migrations.

CREATE TABLE clients (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Keys are stored only as SHA-256 hashes (they are 256-bit random, so no slow hash is needed);
-- `prefix` is the non-secret start of the key that ops see in `keys list` and use to revoke.
CREATE TABLE api_keys (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_id    bigint NOT NULL REFERENCES clients (id),
    prefix       text NOT NULL UNIQUE,
    key_hash     bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_client_id_idx ON api_keys (client_id);

CREATE TABLE upload_sessions (
    id                  uuid PRIMARY KEY,
    client_id           bigint NOT NULL REFERENCES clients (id),
    status              text NOT NULL DEFAULT 'INIT' CHECK (
        status IN ('INIT', 'IN_PROGRESS', 'COMPLETING', 'COMPLETED', 'ABORTED', 'EXPIRED', 'FAILED')
    ),
    filename            text NOT NULL CHECK (char_length(filename) BETWEEN 1 AND 1024),
    content_type        text NOT NULL CHECK (char_length(content_type) BETWEEN 1 AND 255),
    size                bigint NOT NULL CHECK (size > 0),
    part_size           bigint NOT NULL CHECK (part_size > 0),
    total_parts         integer NOT NULL,
    received_parts      integer NOT NULL DEFAULT 0,
    received_bytes      bigint NOT NULL DEFAULT 0,
    sha256              text CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    metadata            jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    -- Create-request replay: the same key with the same body returns this session.
    idempotency_key     text CHECK (char_length(idempotency_key) BETWEEN 1 AND 255),
    request_fingerprint bytea,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    -- The assembled object, set exactly when COMPLETED.
    object_key          text,
    object_size         bigint,
    object_sha256       text CHECK (object_sha256 ~ '^[0-9a-f]{64}$'),
    CONSTRAINT total_parts_matches_sizes CHECK (total_parts = (size + part_size - 1) / part_size),
    CONSTRAINT received_parts_in_range CHECK (received_parts BETWEEN 0 AND total_parts),
    CONSTRAINT received_bytes_in_range CHECK (received_bytes BETWEEN 0 AND size),
    CONSTRAINT object_iff_completed CHECK (
        (status = 'COMPLETED') = (object_key IS NOT NULL AND object_size IS NOT NULL AND object_sha256 IS NOT NULL)
    ),
    CONSTRAINT idempotency_fingerprint CHECK ((idempotency_key IS NULL) = (request_fingerprint IS NULL)),
    CONSTRAINT idempotency_key_per_client UNIQUE (client_id, idempotency_key)
);
-- GET /uploads/sessions: newest first per client, keyset pagination.
CREATE INDEX upload_sessions_client_created_idx ON upload_sessions (client_id, created_at DESC, id DESC);
-- The reaper's scans: overdue open sessions, and sessions whose stored bytes must go.
CREATE INDEX upload_sessions_open_expiry_idx ON upload_sessions (expires_at)
    WHERE status IN ('INIT', 'IN_PROGRESS');
CREATE INDEX upload_sessions_closed_status_idx ON upload_sessions (status, updated_at)
    WHERE status IN ('COMPLETING', 'ABORTED', 'EXPIRED', 'FAILED');

CREATE TABLE upload_parts (
    session_id  uuid NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    part_number integer NOT NULL CHECK (part_number >= 1),
    size        bigint NOT NULL CHECK (size > 0),
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    -- Each part's bytes live under their own random key, so a retry never overwrites them.
    storage_key text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, part_number)
);

-- The status a client sees: an open session past its expiry reads EXPIRED before any reaper runs.
-- One definition, used by every query that reports or filters on status.
CREATE FUNCTION chunksvc_session_status(status text, expires_at timestamptz) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN CASE WHEN status IN ('INIT', 'IN_PROGRESS') AND expires_at <= now() THEN 'EXPIRED' ELSE status END;
