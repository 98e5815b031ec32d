-- Upload tokens (contract v1.2, "Browsers: CORS and upload tokens"): a credential a session's owner
-- mints (POST /uploads/sessions/{id}/tokens) and hands to a browser or device instead of its API
-- key. A token grants that one session's part, tus, status, complete and abort calls, until it
-- expires or the session ends.

-- Like API keys, tokens are 256-bit random and stored only as their SHA-256 (no slow hash needed:
-- nothing to guess). `client_id` is the session's owner, as whom the token's requests act.
-- `expires_at` is never later than the session's own (the minting statement clamps it).
-- ON DELETE CASCADE: a session row never deleted today, but a token must not outlive one that is;
-- the reaper removes a session's tokens when it purges the session, and expired ones on its passes.
CREATE TABLE upload_tokens (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash bytea NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    session_id uuid NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    client_id  bigint NOT NULL REFERENCES clients (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    CONSTRAINT upload_token_expires_after_creation CHECK (expires_at > created_at)
);
-- The reaper's two deletes: by session (purged sessions) and by expiry.
CREATE INDEX upload_tokens_session_idx ON upload_tokens (session_id);
CREATE INDEX upload_tokens_expires_idx ON upload_tokens (expires_at);

-- 0007's chunksvc_authenticate with a second kind of credential: the client behind an unrevoked
-- API key (p_key_hash) or behind an upload token (p_token_hash; give one of the two), and the few
-- columns of a session that a part's checks read, in one round trip (the part path is the hot
-- one). A new name, not CREATE OR REPLACE: the release before this one keeps calling the old
-- function, with its columns, while this one rolls out.
--
-- For a key, the session is `p_session_id` if it is that client's (as in 0007). For a token it is
-- always the token's own session, whatever was asked for: the caller answers 401 for an expired
-- token or an ended session before it compares the session asked for (404 if another).
-- No row: unknown or revoked key, or unknown token. `token_session_id` NULL: a key.
CREATE FUNCTION chunksvc_authenticate_2(p_key_hash bytea, p_token_hash bytea, p_session_id uuid)
    RETURNS TABLE (
        client_id        bigint,
        client_name      text,
        token_session_id uuid,
        token_expired    boolean,
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
    wanted    uuid := p_session_id;
BEGIN
    IF p_token_hash IS NOT NULL THEN
        SELECT t.client_id, c.name, t.session_id, t.expires_at <= now()
          INTO client_id, client_name, token_session_id, token_expired
          FROM upload_tokens t JOIN clients c ON c.id = t.client_id
         WHERE t.token_hash = p_token_hash;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        wanted := token_session_id;
    ELSE
        SELECT k.id, k.client_id, c.name, k.last_used_at
          INTO key_id, client_id, client_name, last_used
          FROM api_keys k JOIN clients c ON c.id = k.client_id
         WHERE k.key_hash = p_key_hash AND k.revoked_at IS NULL;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF last_used IS NULL OR last_used < now() - interval '1 minute' THEN
            -- As in 0007: the condition again, for a concurrent request that wrote it meanwhile.
            UPDATE api_keys SET last_used_at = now()
             WHERE id = key_id AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute');
        END IF;
    END IF;
    SELECT s.id, chunksvc_session_status(s.status, s.expires_at), s.size, s.part_size, s.total_parts
      INTO session_id, effective_status, size, part_size, total_parts
      FROM upload_sessions s
     WHERE s.id = wanted AND s.client_id = chunksvc_authenticate_2.client_id;
    RETURN NEXT;  -- the session's columns are NULL when it was not found (or none asked for)
END;
$$;
