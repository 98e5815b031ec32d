-- The part path's two statements as PL/pgSQL functions, so PostgreSQL plans them once per server
-- connection instead of on every part.
--
-- Why: a 4 KiB part spent about half of its PostgreSQL CPU planning its two statements (the
-- key-and-session lookup and record_part, each a statement of several CTEs), because the pool
-- prepares no statement on the server (CHUNKSVC_DB_PREPARE_THRESHOLD: a prepared statement belongs
-- to one server connection, which a PgBouncer in transaction mode does not keep for a client).
-- A PL/pgSQL function's statements are planned on first use and the plans kept by the server
-- connection that ran them, whoever called: nothing depends on the client's connection, so this
-- holds direct and through PgBouncer alike. The statement that calls a function is trivial to plan.
--
-- The functions do what the statements in queries.sql did (the same locks, the same answers);
-- queries.sql calls them and keeps the reasoning. A change to either is a new migration
-- (CREATE OR REPLACE FUNCTION): the previous release keeps working meanwhile, as it calls them by
-- the same names and columns.

-- The client behind an unrevoked key and, when `p_session_id` is that client's session, the few
-- columns of it that a part's checks read. No row: unknown or revoked key. `session_id` NULL: no
-- such session of this client, or none asked for. last_used_at is refreshed at most once a minute.
CREATE FUNCTION chunksvc_authenticate(p_key_hash bytea, p_session_id uuid)
    RETURNS TABLE (
        client_id        bigint,
        client_name      text,
        session_id       uuid,
        effective_status text,
        size             bigint,
        part_size        bigint,
        total_parts      integer
    )
    LANGUAGE plpgsql
AS $$
DECLARE
    key_id    bigint;
    last_used timestamptz;
BEGIN
    SELECT k.id, k.client_id, c.name, k.last_used_at
      INTO key_id, client_id, client_name, last_used
      FROM api_keys k JOIN clients c ON c.id = k.client_id
     WHERE k.key_hash = p_key_hash AND k.revoked_at IS NULL;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF last_used IS NULL OR last_used < now() - interval '1 minute' THEN
        -- The condition again: a concurrent request may have written it while this one waited
        -- for the row's lock (READ COMMITTED re-checks the WHERE on the row it waited for).
        UPDATE api_keys SET last_used_at = now()
         WHERE id = key_id AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute');
    END IF;
    SELECT s.id, chunksvc_session_status(s.status, s.expires_at), s.size, s.part_size, s.total_parts
      INTO session_id, effective_status, size, part_size, total_parts
      FROM upload_sessions s
     WHERE s.id = p_session_id AND s.client_id = chunksvc_authenticate.client_id;
    RETURN NEXT;  -- the session's columns are NULL when it was not found
END;
$$;

-- A received part's whole transaction (one statement calls it, and commits on its own): lock the
-- session row, insert the part if the session still accepts parts and the number is free, and
-- count it under that lock. No row: no such session of this client. `inserted` false on an open
-- session: the number was taken (the caller compares digests with get_part). A concurrent call
-- waits for the lock, then reads the committed row and counters (READ COMMITTED: each statement
-- of a function takes a fresh snapshot, and a row it had to wait for is read as committed).
CREATE FUNCTION chunksvc_record_part(
    p_session_id uuid, p_client_id bigint, p_part_number integer, p_size bigint, p_sha256 text,
    p_storage_key text
)
    RETURNS TABLE (
        effective_status text,
        inserted         boolean,
        received_parts   integer,
        received_bytes   bigint,
        status           text
    )
    LANGUAGE plpgsql
AS $$
BEGIN
    SELECT chunksvc_session_status(s.status, s.expires_at), s.received_parts, s.received_bytes
      INTO effective_status, received_parts, received_bytes
      FROM upload_sessions s
     WHERE s.id = p_session_id AND s.client_id = p_client_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    inserted := false;
    status := effective_status;
    IF effective_status IN ('INIT', 'IN_PROGRESS') THEN
        INSERT INTO upload_parts (session_id, part_number, size, sha256, storage_key)
        VALUES (p_session_id, p_part_number, p_size, p_sha256, p_storage_key)
        ON CONFLICT (session_id, part_number) DO NOTHING;
        IF FOUND THEN
            UPDATE upload_sessions s
               SET received_parts = s.received_parts + 1,
                   received_bytes = s.received_bytes + p_size,
                   status = 'IN_PROGRESS',
                   updated_at = now()
             WHERE s.id = p_session_id
            RETURNING s.received_parts, s.received_bytes, s.status
                 INTO received_parts, received_bytes, status;
            inserted := true;
        END IF;
    END IF;
    RETURN NEXT;
END;
$$;
