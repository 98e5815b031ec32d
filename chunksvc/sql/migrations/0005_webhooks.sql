-- Completion events: each client's webhook endpoints, the events its sessions' state changes
-- produce (a transactional outbox), and one delivery per event and endpoint.

-- A client's endpoint. Its signing secret is not stored: it is derived from the server's signing
-- key (CHUNKSVC_WEBHOOK_KEY, outside the database) and `secret_nonce`, so a dump of this table
-- alone cannot forge a signature. `key_id` names the signing key that derived it: a server
-- holding another key refuses to sign for this endpoint rather than send signatures that fail.
-- During a secret roll the previous nonce stays active (both secrets sign) until `previous_until`.
CREATE TABLE webhook_endpoints (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_id      bigint NOT NULL REFERENCES clients (id),
    url            text NOT NULL CHECK (url ~ '^https?://' AND char_length(url) <= 2048),
    secret_nonce   bytea NOT NULL CHECK (octet_length(secret_nonce) = 32),
    key_id         text NOT NULL,
    previous_nonce bytea CHECK (octet_length(previous_nonce) = 32),
    previous_until timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    removed_at     timestamptz,
    CONSTRAINT previous_secret_has_end CHECK ((previous_nonce IS NULL) = (previous_until IS NULL))
);
CREATE INDEX webhook_endpoints_client_idx ON webhook_endpoints (client_id) WHERE removed_at IS NULL;

-- One row per state change of a session whose client had an endpoint at the time. `session` is
-- the session row as the change left it (the event's body renders it, whatever happens to the
-- session later); `seq` orders one session's events as its changes happened (they are serialised
-- by the session's row lock, so the later change takes the larger number).
CREATE TABLE webhook_events (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq        bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    session_id uuid NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    client_id  bigint NOT NULL REFERENCES clients (id),
    type       text NOT NULL CHECK (
        type IN ('session.completed', 'session.failed', 'session.aborted', 'session.expired')
    ),
    created_at timestamptz NOT NULL DEFAULT now(),
    session    jsonb NOT NULL
);

-- One event to one endpoint. `pending` until a 2xx (`delivered`) or until retrying has lasted
-- long enough since its first try, `first_attempt_at` (then `dead`; `webhooks redeliver` starts a
-- new round: an event that waited behind an earlier one of its session gets its full time). A claim
-- pushes `next_attempt_at` past the attempt's end (a lease): a deliverer that dies mid-attempt
-- leaves the delivery due again once the lease runs out. `session_id` and `event_seq` are copied
-- from the event for the in-order rule (one session's next event waits while an earlier one is
-- pending), which reads only this table's index.
CREATE TABLE webhook_deliveries (
    event_id        uuid NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    session_id      uuid NOT NULL,
    event_seq       bigint NOT NULL,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    first_attempt_at timestamptz,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    claim           uuid,  -- the attempt that holds it (set by each claim)
    PRIMARY KEY (event_id, endpoint_id)
);
-- Each endpoint's due work, soonest first (only pending rows: the bulk of history is never read
-- by deliverers); a claim probes it once per endpoint in use.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (endpoint_id, next_attempt_at) WHERE state = 'pending';
-- The in-order rule: is an earlier event of this session still pending for this endpoint?
CREATE INDEX webhook_deliveries_order_idx ON webhook_deliveries (endpoint_id, session_id, event_seq)
    WHERE state = 'pending';
-- Dead deliveries, per endpoint (the CLI's and the metrics' counts; history is not scanned).
CREATE INDEX webhook_deliveries_dead_idx ON webhook_deliveries (endpoint_id) WHERE state = 'dead';

-- The outbox is written by the database itself, in the transaction of the change: every path
-- that ends a session (a request's completion or abort, the background assembler, the reaper's
-- expiry and re-driven completions, `sessions abort`, a statement typed in psql) produces its
-- event or, rolled back, none. Only a change of the stored status to an ending one counts:
-- aborting an aborted session again changes nothing and sends nothing.
CREATE FUNCTION chunksvc_session_event() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    new_event webhook_events%ROWTYPE;
BEGIN
    -- FOR SHARE: an endpoint removed at the same moment either commits first (its removed_at is
    -- seen here, re-checked under the lock) or waits for this transaction, and then its removal
    -- finds and drops the delivery made here; without the lock a delivery could be left pending
    -- to a removed endpoint for ever.
    PERFORM 1 FROM webhook_endpoints WHERE client_id = NEW.client_id AND removed_at IS NULL FOR SHARE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_events (session_id, client_id, type, session)
    VALUES (NEW.id, NEW.client_id, 'session.' || lower(NEW.status), to_jsonb(NEW))
    RETURNING * INTO new_event;
    INSERT INTO webhook_deliveries (event_id, endpoint_id, session_id, event_seq)
    SELECT new_event.id, e.id, new_event.session_id, new_event.seq
      FROM webhook_endpoints e
     WHERE e.client_id = NEW.client_id AND e.removed_at IS NULL;
    RETURN NULL;
END
$$;

CREATE TRIGGER upload_sessions_outbox
    AFTER UPDATE OF status ON upload_sessions
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.status IN ('COMPLETED', 'FAILED', 'ABORTED', 'EXPIRED'))
    EXECUTE FUNCTION chunksvc_session_event();
