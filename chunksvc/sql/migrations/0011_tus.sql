-- tus 1.0 on the same sessions (contract v1.2, "Standard upload clients"): what a tus upload
-- needs beyond its session. A tus upload IS an upload_sessions row; its full parts are ordinary
-- upload_parts rows. What tus adds: PATCH bodies of any length (a trailing part not filled yet),
-- the Upload-Metadata header as the client sent it, and concatenation (partial uploads, hidden,
-- whose bytes become a final upload's).

-- The bytes of the part a tus upload is in the middle of: the pieces of it PATCHes brought that did
-- not fill it yet, each stored under its own key in the session's parts prefix (so abort, purge
-- and the orphan sweep treat them like part bytes; referenced_part_keys names them), in order of
-- `start` (its offset in the part). A piece is written once: a PATCH adds a row, it never rewrites
-- the bytes before it. The PATCH that fills the part reads the pieces back, stores them with its
-- own bytes as an ordinary part and drops these rows in the same transaction.
-- Upload-Offset = the contiguous recorded parts' bytes + these pieces' sizes.
CREATE TABLE tus_incomplete_parts (
    session_id  uuid NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    part_number integer NOT NULL CHECK (part_number >= 1),
    start       bigint NOT NULL CHECK (start >= 0),
    size        bigint NOT NULL CHECK (size > 0),
    storage_key text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, part_number, start)
);

-- Uploads created through POST /tus/. A session without a row here (created by the native API)
-- can still be driven through /tus/{id}: it is a plain upload with no metadata header of its own.
CREATE TABLE tus_uploads (
    session_id uuid PRIMARY KEY REFERENCES upload_sessions (id) ON DELETE CASCADE,
    -- Upload-Metadata as sent (HEAD answers it back byte for byte); NULL: none.
    metadata   text,
    concat     text NOT NULL DEFAULT 'none' CHECK (concat IN ('none', 'partial', 'final')),
    -- A partial upload: the final upload it went into, and its place there (1-based). At most one
    -- final per partial: its bytes are removed once that final is assembled.
    final_id   uuid REFERENCES upload_sessions (id) ON DELETE CASCADE,
    position   integer CHECK (position >= 1),
    CONSTRAINT tus_final_position CHECK ((final_id IS NULL) = (position IS NULL)),
    CONSTRAINT tus_only_partials_concatenate CHECK (final_id IS NULL OR concat = 'partial'),
    CONSTRAINT tus_one_partial_per_position UNIQUE (final_id, position)
);

-- Partial uploads are sessions of their own (quotas, expiry and the reaper apply) but not what
-- the client uploaded: they are left out of GET /uploads/sessions and send no webhook events.
-- A column, not a join on tus_uploads, so the listing's plans (tuned on partial indexes) stay.
ALTER TABLE upload_sessions ADD COLUMN tus_partial boolean NOT NULL DEFAULT false;

-- The outbox trigger of 0005, with partial uploads left out (their ending is no upload's).
CREATE OR REPLACE FUNCTION chunksvc_session_event() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    new_event webhook_events%ROWTYPE;
BEGIN
    IF NEW.tus_partial THEN
        RETURN NULL;
    END IF;
    -- FOR SHARE: as in 0005 (an endpoint removed at the same moment is seen or waits).
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

-- When a final upload ends (completed, failed, aborted, expired), its partials end with it:
-- ABORTED (silently, above), so the reaper purges what is left of their bytes. In the database,
-- like the outbox, so every path that ends a final (a request, the background assembler, the
-- reaper, `sessions abort`) does it in the same transaction.
CREATE FUNCTION chunksvc_tus_final_ended() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    UPDATE upload_sessions s
       SET status = 'ABORTED', updated_at = now()
      FROM tus_uploads t
     WHERE t.final_id = NEW.id AND s.id = t.session_id AND s.status IN ('INIT', 'IN_PROGRESS');
    RETURN NULL;
END
$$;

CREATE TRIGGER upload_sessions_tus_final_ended
    AFTER UPDATE OF status ON upload_sessions
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.status IN ('COMPLETED', 'FAILED', 'ABORTED', 'EXPIRED'))
    EXECUTE FUNCTION chunksvc_tus_final_ended();
