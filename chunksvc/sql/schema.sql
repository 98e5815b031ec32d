-- The schema the migrations produce (make schema writes it; tests/test_migrations.py checks it).
CREATE FUNCTION public.chunksvc_authenticate(p_key_hash bytea, p_session_id uuid) RETURNS TABLE(client_id bigint, client_name text, session_id uuid, effective_status text, size bigint, part_size bigint, total_parts integer)
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

CREATE FUNCTION public.chunksvc_authenticate_2(p_key_hash bytea, p_token_hash bytea, p_session_id uuid) RETURNS TABLE(client_id bigint, client_name text, token_session_id uuid, token_expired boolean, session_id uuid, effective_status text, size bigint, part_size bigint, total_parts integer)
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

CREATE FUNCTION public.chunksvc_record_part(p_session_id uuid, p_client_id bigint, p_part_number integer, p_size bigint, p_sha256 text, p_storage_key text) RETURNS TABLE(effective_status text, inserted boolean, received_parts integer, received_bytes bigint, status text)
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

CREATE FUNCTION public.chunksvc_refilled(tokens double precision, refilled_at timestamp with time zone, rate double precision, burst double precision) RETURNS double precision
    LANGUAGE sql STABLE
    AS $$
    SELECT least(burst, tokens + rate * greatest(0, extract(epoch FROM now() - refilled_at))::double precision)
$$;

CREATE FUNCTION public.chunksvc_session_event() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION public.chunksvc_session_status(status text, expires_at timestamp with time zone) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN CASE WHEN ((status = ANY (ARRAY['INIT'::text, 'IN_PROGRESS'::text])) AND (expires_at <= now())) THEN 'EXPIRED'::text ELSE status END;

CREATE FUNCTION public.chunksvc_tus_final_ended() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    UPDATE upload_sessions s
       SET status = 'ABORTED', updated_at = now()
      FROM tus_uploads t
     WHERE t.final_id = NEW.id AND s.id = t.session_id AND s.status IN ('INIT', 'IN_PROGRESS');
    RETURN NULL;
END
$$;

CREATE FUNCTION public.chunksvc_tus_state(p_session_id uuid) RETURNS TABLE(tus_created boolean, tus_metadata text, concat text, final_id uuid, contiguous_parts integer, contiguous_bytes bigint, held_bytes bigint, held_keys text[], held_sizes bigint[])
    LANGUAGE sql STABLE
    AS $$
    SELECT t.session_id IS NOT NULL, t.metadata, COALESCE(t.concat, 'none'), t.final_id,
           c.parts, c.bytes, h.bytes, h.keys, h.sizes
      FROM (SELECT p_session_id AS id) s
      LEFT JOIN tus_uploads t ON t.session_id = s.id
     CROSS JOIN LATERAL (
          SELECT count(*)::integer AS parts, COALESCE(sum(numbered.size), 0)::bigint AS bytes
            FROM (SELECT p.part_number, p.size, row_number() OVER (ORDER BY p.part_number) AS rank
                    FROM upload_parts p
                   WHERE p.session_id = s.id) numbered
           WHERE numbered.part_number = numbered.rank
     ) c
     CROSS JOIN LATERAL (
          -- Only pieces of the part the offset has reached: a native PUT may have filled theirs.
          SELECT COALESCE(sum(i.size), 0)::bigint AS bytes,
                 COALESCE(array_agg(i.storage_key ORDER BY i.start), '{}') AS keys,
                 COALESCE(array_agg(i.size ORDER BY i.start), '{}') AS sizes
            FROM tus_incomplete_parts i
           WHERE i.session_id = s.id AND i.part_number = c.parts + 1
     ) h
$$;

CREATE TABLE public.api_keys (
    id bigint NOT NULL,
    client_id bigint NOT NULL,
    prefix text NOT NULL,
    key_hash bytea NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    last_used_at timestamp with time zone,
    revoked_at timestamp with time zone,
    CONSTRAINT api_keys_key_hash_check CHECK ((octet_length(key_hash) = 32))
);

ALTER TABLE public.api_keys ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.api_keys_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.client_limits (
    client_id bigint NOT NULL,
    max_sessions bigint,
    max_bytes bigint,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    rate_limit double precision,
    rate_burst integer,
    CONSTRAINT client_limits_max_bytes_check CHECK ((max_bytes >= 0)),
    CONSTRAINT client_limits_max_sessions_check CHECK ((max_sessions >= 0)),
    CONSTRAINT client_limits_rate_burst_check CHECK ((rate_burst >= 0)),
    CONSTRAINT client_limits_rate_limit_check CHECK ((rate_limit >= (0)::double precision))
);

CREATE UNLOGGED TABLE public.client_rate_buckets (
    client_id bigint NOT NULL,
    tokens double precision NOT NULL,
    refilled_at timestamp with time zone NOT NULL,
    taken integer NOT NULL
);

CREATE TABLE public.clients (
    id bigint NOT NULL,
    name text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT clients_name_check CHECK ((name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'::text))
);

ALTER TABLE public.clients ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.clients_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.lost_parts (
    storage_key text NOT NULL,
    session_id uuid NOT NULL,
    part_number integer NOT NULL,
    size bigint NOT NULL,
    sha256 text NOT NULL,
    dropped_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE public.reaper_leases (
    name text NOT NULL,
    owner uuid NOT NULL,
    until timestamp with time zone NOT NULL
);

CREATE TABLE public.schema_migrations (
    version text NOT NULL,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE public.staged_part_attempts (
    session_id uuid NOT NULL,
    part_number integer NOT NULL,
    attempts integer NOT NULL,
    CONSTRAINT staged_part_attempts_attempts_check CHECK ((attempts >= 1)),
    CONSTRAINT staged_part_attempts_part_number_check CHECK ((part_number >= 1))
);

CREATE TABLE public.tus_incomplete_parts (
    session_id uuid NOT NULL,
    part_number integer NOT NULL,
    start bigint NOT NULL,
    size bigint NOT NULL,
    storage_key text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT tus_incomplete_parts_part_number_check CHECK ((part_number >= 1)),
    CONSTRAINT tus_incomplete_parts_size_check CHECK ((size > 0)),
    CONSTRAINT tus_incomplete_parts_start_check CHECK ((start >= 0))
);

CREATE TABLE public.tus_uploads (
    session_id uuid NOT NULL,
    metadata text,
    concat text DEFAULT 'none'::text NOT NULL,
    final_id uuid,
    "position" integer,
    CONSTRAINT tus_final_position CHECK (((final_id IS NULL) = ("position" IS NULL))),
    CONSTRAINT tus_only_partials_concatenate CHECK (((final_id IS NULL) OR (concat = 'partial'::text))),
    CONSTRAINT tus_uploads_concat_check CHECK ((concat = ANY (ARRAY['none'::text, 'partial'::text, 'final'::text]))),
    CONSTRAINT tus_uploads_position_check CHECK (("position" >= 1))
);

CREATE TABLE public.upload_parts (
    session_id uuid NOT NULL,
    part_number integer NOT NULL,
    size bigint NOT NULL,
    sha256 text NOT NULL,
    storage_key text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    staged_token text,
    CONSTRAINT upload_parts_part_number_check CHECK ((part_number >= 1)),
    CONSTRAINT upload_parts_sha256_check CHECK ((sha256 ~ '^[0-9a-f]{64}$'::text)),
    CONSTRAINT upload_parts_size_check CHECK ((size > 0))
);

CREATE TABLE public.upload_sessions (
    id uuid NOT NULL,
    client_id bigint NOT NULL,
    status text DEFAULT 'INIT'::text NOT NULL,
    filename text NOT NULL,
    content_type text NOT NULL,
    size bigint NOT NULL,
    part_size bigint NOT NULL,
    total_parts integer NOT NULL,
    received_parts integer DEFAULT 0 NOT NULL,
    received_bytes bigint DEFAULT 0 NOT NULL,
    sha256 text,
    metadata jsonb DEFAULT '{}'::jsonb NOT NULL,
    idempotency_key text,
    request_fingerprint bytea,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    object_key text,
    object_size bigint,
    object_sha256 text,
    purged_at timestamp with time zone,
    assembled_bytes bigint,
    completion_owner uuid,
    completion_lease_until timestamp with time zone,
    tus_partial boolean DEFAULT false NOT NULL,
    frontier_parts integer DEFAULT 0 NOT NULL,
    frontier_bytes bigint DEFAULT 0 NOT NULL,
    frontier_state bytea,
    frontier_owner uuid,
    frontier_lease_until timestamp with time zone,
    staged_id text,
    CONSTRAINT frontier_in_range CHECK ((((frontier_parts >= 0) AND (frontier_parts <= total_parts)) AND ((frontier_bytes >= 0) AND (frontier_bytes <= size)))),
    CONSTRAINT frontier_state_iff_started CHECK (((frontier_parts = 0) = (frontier_state IS NULL))),
    CONSTRAINT idempotency_fingerprint CHECK (((idempotency_key IS NULL) = (request_fingerprint IS NULL))),
    CONSTRAINT object_iff_completed CHECK (((status = 'COMPLETED'::text) = ((object_key IS NOT NULL) AND (object_size IS NOT NULL) AND (object_sha256 IS NOT NULL)))),
    CONSTRAINT received_bytes_in_range CHECK (((received_bytes >= 0) AND (received_bytes <= size))),
    CONSTRAINT received_parts_in_range CHECK (((received_parts >= 0) AND (received_parts <= total_parts))),
    CONSTRAINT total_parts_matches_sizes CHECK ((total_parts = (((size + part_size) - 1) / part_size))),
    CONSTRAINT upload_sessions_content_type_check CHECK (((char_length(content_type) >= 1) AND (char_length(content_type) <= 255))),
    CONSTRAINT upload_sessions_filename_check CHECK (((char_length(filename) >= 1) AND (char_length(filename) <= 1024))),
    CONSTRAINT upload_sessions_idempotency_key_check CHECK (((char_length(idempotency_key) >= 1) AND (char_length(idempotency_key) <= 255))),
    CONSTRAINT upload_sessions_metadata_check CHECK ((jsonb_typeof(metadata) = 'object'::text)),
    CONSTRAINT upload_sessions_object_sha256_check CHECK ((object_sha256 ~ '^[0-9a-f]{64}$'::text)),
    CONSTRAINT upload_sessions_part_size_check CHECK ((part_size > 0)),
    CONSTRAINT upload_sessions_sha256_check CHECK ((sha256 ~ '^[0-9a-f]{64}$'::text)),
    CONSTRAINT upload_sessions_size_check CHECK ((size > 0)),
    CONSTRAINT upload_sessions_status_check CHECK ((status = ANY (ARRAY['INIT'::text, 'IN_PROGRESS'::text, 'COMPLETING'::text, 'COMPLETED'::text, 'ABORTED'::text, 'EXPIRED'::text, 'FAILED'::text])))
);

CREATE TABLE public.upload_tokens (
    id bigint NOT NULL,
    token_hash bytea NOT NULL,
    session_id uuid NOT NULL,
    client_id bigint NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    CONSTRAINT upload_token_expires_after_creation CHECK ((expires_at > created_at)),
    CONSTRAINT upload_tokens_token_hash_check CHECK ((octet_length(token_hash) = 32))
);

ALTER TABLE public.upload_tokens ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.upload_tokens_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.webhook_deliveries (
    event_id uuid NOT NULL,
    endpoint_id bigint NOT NULL,
    session_id uuid NOT NULL,
    event_seq bigint NOT NULL,
    state text DEFAULT 'pending'::text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    first_attempt_at timestamp with time zone,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    last_attempt_at timestamp with time zone,
    last_status integer,
    last_error text,
    delivered_at timestamp with time zone,
    claim uuid,
    CONSTRAINT webhook_deliveries_state_check CHECK ((state = ANY (ARRAY['pending'::text, 'delivered'::text, 'dead'::text])))
);

CREATE TABLE public.webhook_endpoints (
    id bigint NOT NULL,
    client_id bigint NOT NULL,
    url text NOT NULL,
    secret_nonce bytea NOT NULL,
    key_id text NOT NULL,
    previous_nonce bytea,
    previous_until timestamp with time zone,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    removed_at timestamp with time zone,
    CONSTRAINT previous_secret_has_end CHECK (((previous_nonce IS NULL) = (previous_until IS NULL))),
    CONSTRAINT webhook_endpoints_previous_nonce_check CHECK ((octet_length(previous_nonce) = 32)),
    CONSTRAINT webhook_endpoints_secret_nonce_check CHECK ((octet_length(secret_nonce) = 32)),
    CONSTRAINT webhook_endpoints_url_check CHECK (((url ~ '^https?://'::text) AND (char_length(url) <= 2048)))
);

ALTER TABLE public.webhook_endpoints ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.webhook_endpoints_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.webhook_events (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    seq bigint NOT NULL,
    session_id uuid NOT NULL,
    client_id bigint NOT NULL,
    type text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    session jsonb NOT NULL,
    CONSTRAINT webhook_events_type_check CHECK ((type = ANY (ARRAY['session.completed'::text, 'session.failed'::text, 'session.aborted'::text, 'session.expired'::text])))
);

ALTER TABLE public.webhook_events ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.webhook_events_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash);

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_prefix_key UNIQUE (prefix);

ALTER TABLE ONLY public.client_limits
    ADD CONSTRAINT client_limits_pkey PRIMARY KEY (client_id);

ALTER TABLE ONLY public.client_rate_buckets
    ADD CONSTRAINT client_rate_buckets_pkey PRIMARY KEY (client_id);

ALTER TABLE ONLY public.clients
    ADD CONSTRAINT clients_name_key UNIQUE (name);

ALTER TABLE ONLY public.clients
    ADD CONSTRAINT clients_pkey PRIMARY KEY (id);

ALTER TABLE public.upload_sessions
    ADD CONSTRAINT completion_lease_whole CHECK (((completion_owner IS NULL) = (completion_lease_until IS NULL))) NOT VALID;

ALTER TABLE ONLY public.upload_sessions
    ADD CONSTRAINT idempotency_key_per_client UNIQUE (client_id, idempotency_key);

ALTER TABLE ONLY public.lost_parts
    ADD CONSTRAINT lost_parts_pkey PRIMARY KEY (storage_key);

ALTER TABLE ONLY public.reaper_leases
    ADD CONSTRAINT reaper_leases_pkey PRIMARY KEY (name);

ALTER TABLE ONLY public.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);

ALTER TABLE ONLY public.staged_part_attempts
    ADD CONSTRAINT staged_part_attempts_pkey PRIMARY KEY (session_id, part_number);

ALTER TABLE ONLY public.tus_incomplete_parts
    ADD CONSTRAINT tus_incomplete_parts_pkey PRIMARY KEY (session_id, part_number, start);

ALTER TABLE ONLY public.tus_incomplete_parts
    ADD CONSTRAINT tus_incomplete_parts_storage_key_key UNIQUE (storage_key);

ALTER TABLE ONLY public.tus_uploads
    ADD CONSTRAINT tus_one_partial_per_position UNIQUE (final_id, "position");

ALTER TABLE ONLY public.tus_uploads
    ADD CONSTRAINT tus_uploads_pkey PRIMARY KEY (session_id);

ALTER TABLE ONLY public.upload_parts
    ADD CONSTRAINT upload_parts_pkey PRIMARY KEY (session_id, part_number);

ALTER TABLE ONLY public.upload_sessions
    ADD CONSTRAINT upload_sessions_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.upload_tokens
    ADD CONSTRAINT upload_tokens_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.upload_tokens
    ADD CONSTRAINT upload_tokens_token_hash_key UNIQUE (token_hash);

ALTER TABLE ONLY public.webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (event_id, endpoint_id);

ALTER TABLE ONLY public.webhook_endpoints
    ADD CONSTRAINT webhook_endpoints_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.webhook_events
    ADD CONSTRAINT webhook_events_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.webhook_events
    ADD CONSTRAINT webhook_events_seq_key UNIQUE (seq);

CREATE INDEX api_keys_client_id_idx ON public.api_keys USING btree (client_id);

CREATE INDEX lost_parts_session_idx ON public.lost_parts USING btree (session_id);

CREATE UNIQUE INDEX upload_parts_own_storage_key_idx ON public.upload_parts USING btree (storage_key) WHERE (storage_key !~~ 'parts/%/assembly'::text);

CREATE INDEX upload_parts_storage_key_idx ON public.upload_parts USING btree (storage_key);

CREATE INDEX upload_sessions_client_created_idx ON public.upload_sessions USING btree (client_id, created_at DESC, id DESC);

CREATE INDEX upload_sessions_closed_status_idx ON public.upload_sessions USING btree (status, updated_at) WHERE (status = ANY (ARRAY['COMPLETING'::text, 'ABORTED'::text, 'EXPIRED'::text, 'FAILED'::text]));

CREATE INDEX upload_sessions_live_staging_idx ON public.upload_sessions USING btree (id) WHERE ((staged_id IS NOT NULL) AND (purged_at IS NULL));

CREATE INDEX upload_sessions_open_by_client_idx ON public.upload_sessions USING btree (client_id) INCLUDE (size, expires_at) WHERE (status = ANY (ARRAY['INIT'::text, 'IN_PROGRESS'::text, 'COMPLETING'::text]));

CREATE INDEX upload_sessions_open_expiry_idx ON public.upload_sessions USING btree (expires_at) WHERE (status = ANY (ARRAY['INIT'::text, 'IN_PROGRESS'::text]));

CREATE INDEX upload_sessions_unpurged_idx ON public.upload_sessions USING btree (updated_at, id) WHERE ((purged_at IS NULL) AND (status = ANY (ARRAY['COMPLETED'::text, 'ABORTED'::text, 'EXPIRED'::text, 'FAILED'::text])));

CREATE INDEX upload_tokens_expires_idx ON public.upload_tokens USING btree (expires_at);

CREATE INDEX upload_tokens_session_idx ON public.upload_tokens USING btree (session_id);

CREATE INDEX webhook_deliveries_dead_idx ON public.webhook_deliveries USING btree (endpoint_id) WHERE (state = 'dead'::text);

CREATE INDEX webhook_deliveries_due_idx ON public.webhook_deliveries USING btree (endpoint_id, next_attempt_at) WHERE (state = 'pending'::text);

CREATE INDEX webhook_deliveries_order_idx ON public.webhook_deliveries USING btree (endpoint_id, session_id, event_seq) WHERE (state = 'pending'::text);

CREATE INDEX webhook_endpoints_client_idx ON public.webhook_endpoints USING btree (client_id) WHERE (removed_at IS NULL);

CREATE INDEX webhook_events_created_idx ON public.webhook_events USING btree (created_at, id);

CREATE TRIGGER upload_sessions_outbox AFTER UPDATE OF status ON public.upload_sessions FOR EACH ROW WHEN (((old.status IS DISTINCT FROM new.status) AND (new.status = ANY (ARRAY['COMPLETED'::text, 'FAILED'::text, 'ABORTED'::text, 'EXPIRED'::text])))) EXECUTE FUNCTION public.chunksvc_session_event();

CREATE TRIGGER upload_sessions_tus_final_ended AFTER UPDATE OF status ON public.upload_sessions FOR EACH ROW WHEN (((old.status IS DISTINCT FROM new.status) AND (new.status = ANY (ARRAY['COMPLETED'::text, 'FAILED'::text, 'ABORTED'::text, 'EXPIRED'::text])))) EXECUTE FUNCTION public.chunksvc_tus_final_ended();

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_client_id_fkey FOREIGN KEY (client_id) REFERENCES public.clients(id);

ALTER TABLE ONLY public.client_limits
    ADD CONSTRAINT client_limits_client_id_fkey FOREIGN KEY (client_id) REFERENCES public.clients(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.client_rate_buckets
    ADD CONSTRAINT client_rate_buckets_client_id_fkey FOREIGN KEY (client_id) REFERENCES public.clients(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.lost_parts
    ADD CONSTRAINT lost_parts_session_id_fkey FOREIGN KEY (session_id) REFERENCES public.upload_sessions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.staged_part_attempts
    ADD CONSTRAINT staged_part_attempts_session_id_fkey FOREIGN KEY (session_id) REFERENCES public.upload_sessions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.tus_incomplete_parts
    ADD CONSTRAINT tus_incomplete_parts_session_id_fkey FOREIGN KEY (session_id) REFERENCES public.upload_sessions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.tus_uploads
    ADD CONSTRAINT tus_uploads_final_id_fkey FOREIGN KEY (final_id) REFERENCES public.upload_sessions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.tus_uploads
    ADD CONSTRAINT tus_uploads_session_id_fkey FOREIGN KEY (session_id) REFERENCES public.upload_sessions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.upload_parts
    ADD CONSTRAINT upload_parts_session_id_fkey FOREIGN KEY (session_id) REFERENCES public.upload_sessions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.upload_sessions
    ADD CONSTRAINT upload_sessions_client_id_fkey FOREIGN KEY (client_id) REFERENCES public.clients(id);

ALTER TABLE ONLY public.upload_tokens
    ADD CONSTRAINT upload_tokens_client_id_fkey FOREIGN KEY (client_id) REFERENCES public.clients(id);

ALTER TABLE ONLY public.upload_tokens
    ADD CONSTRAINT upload_tokens_session_id_fkey FOREIGN KEY (session_id) REFERENCES public.upload_sessions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_endpoint_id_fkey FOREIGN KEY (endpoint_id) REFERENCES public.webhook_endpoints(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_event_id_fkey FOREIGN KEY (event_id) REFERENCES public.webhook_events(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.webhook_endpoints
    ADD CONSTRAINT webhook_endpoints_client_id_fkey FOREIGN KEY (client_id) REFERENCES public.clients(id);

ALTER TABLE ONLY public.webhook_events
    ADD CONSTRAINT webhook_events_client_id_fkey FOREIGN KEY (client_id) REFERENCES public.clients(id);

ALTER TABLE ONLY public.webhook_events
    ADD CONSTRAINT webhook_events_session_id_fkey FOREIGN KEY (session_id) REFERENCES public.upload_sessions(id) ON DELETE CASCADE;
