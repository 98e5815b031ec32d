-- Every statement the service runs, each under a `-- name:` header and called by that name
-- (chunksvc.db.load_queries). Parameters are psycopg named placeholders. Each statement is run
-- by one function of chunksvc.dao, which names the dataclass its rows become (chunksvc.rows,
-- filled by column name: a statement returns at least the columns its dataclass declares).
-- Session rows carry `status` (as stored) and `effective_status` (as clients see it).

-- name: authenticate
-- The client behind an unrevoked key (`key_hash`) or an upload token (`token_hash`; one of the
-- two is NULL) and, in the same round trip (the part path is the hot one), the few columns a
-- part's checks read of a session: for a key, that client's session `session_id` (NULL: none
-- asked for; a malformed id is passed as NULL too); for a token, always the token's own session,
-- so the caller can answer 401 for an ended session before 404 for another one. No row: unknown
-- or revoked key, unknown token. `session_id` NULL: no such session of this client.
-- `token_expired` is decided by the database's clock, the one every host shares. last_used_at
-- (keys) is refreshed at most once a minute, so this rarely writes. A PL/pgSQL function
-- (migrations 0007, 0010), so its plans are kept by the server connection instead of made on
-- every request.
SELECT client_id, client_name, token_session_id, token_expired,
       session_id, effective_status, size, part_size, total_parts
  FROM chunksvc_authenticate_2(%(key_hash)s::bytea, %(token_hash)s::bytea, %(session_id)s::uuid);

-- name: upsert_client
INSERT INTO clients (name) VALUES (%(name)s)
ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
RETURNING id, name;

-- name: insert_api_key
INSERT INTO api_keys (client_id, prefix, key_hash) VALUES (%(client_id)s, %(prefix)s, %(key_hash)s);

-- name: list_api_keys
SELECT c.name AS client_name, k.prefix, k.created_at, k.last_used_at, k.revoked_at
  FROM api_keys k JOIN clients c ON c.id = k.client_id
 ORDER BY c.name, k.created_at;

-- name: revoke_api_keys
-- By key prefix, or every key of a client by name.
UPDATE api_keys k SET revoked_at = now()
  FROM clients c
 WHERE c.id = k.client_id AND k.revoked_at IS NULL
   AND (k.prefix = %(target)s OR c.name = %(target)s)
RETURNING c.name AS client_name, k.prefix;

-- name: insert_upload_token
-- An upload token (only its hash) for the client's session `session_id`, expiring `ttl` seconds
-- from now but never after the session does, in whole seconds (as the API shows times: the
-- expiry a client reads is never later than the real one). No row: no such session of this
-- client, or it is past its expiry (the caller checked its status just before; this closes the
-- gap, and keeps the table's expires_at > created_at check from failing).
INSERT INTO upload_tokens (token_hash, session_id, client_id, expires_at)
SELECT %(token_hash)s, s.id, s.client_id,
       LEAST(date_trunc('second', now() + make_interval(secs => %(ttl)s)), s.expires_at)
  FROM upload_sessions s
 WHERE s.id = %(session_id)s AND s.client_id = %(client_id)s AND s.expires_at > now()
RETURNING session_id, expires_at;

-- name: delete_dead_upload_tokens
-- The reaper's: up to `limit` tokens no request can use any more, past their expiry or of an
-- ended session (by stored status: the expire phase stores EXPIRED first). A COMPLETED session's
-- tokens stay until they expire: they still read the session. They answer 401 already; this only
-- keeps the table small. SKIP LOCKED: two reapers delete different ones.
DELETE FROM upload_tokens
 WHERE id IN (SELECT t.id
                FROM upload_tokens t JOIN upload_sessions s ON s.id = t.session_id
               WHERE t.expires_at <= now() OR s.status IN ('ABORTED', 'EXPIRED', 'FAILED')
               LIMIT %(limit)s
                 FOR UPDATE OF t SKIP LOCKED)
RETURNING session_id;

-- name: count_dead_upload_tokens
-- What delete_dead_upload_tokens would remove, for a dry run.
SELECT count(*)
  FROM upload_tokens t JOIN upload_sessions s ON s.id = t.session_id
 WHERE t.expires_at <= now() OR s.status IN ('ABORTED', 'EXPIRED', 'FAILED');

-- name: insert_session
-- Returns nothing when the client already used this Idempotency-Key.
INSERT INTO upload_sessions (
    id, client_id, filename, content_type, size, part_size, total_parts, sha256, metadata,
    idempotency_key, request_fingerprint, expires_at
) VALUES (
    %(id)s, %(client_id)s, %(filename)s, %(content_type)s, %(size)s, %(part_size)s, %(total_parts)s,
    %(sha256)s, %(metadata)s, %(idempotency_key)s, %(request_fingerprint)s,
    now() + make_interval(secs => %(ttl)s)
)
ON CONFLICT (client_id, idempotency_key) DO NOTHING
RETURNING *, chunksvc_session_status(status, expires_at) AS effective_status;

-- name: get_session_by_idempotency_key
SELECT *, chunksvc_session_status(status, expires_at) AS effective_status
  FROM upload_sessions
 WHERE client_id = %(client_id)s AND idempotency_key = %(idempotency_key)s;

-- name: get_session
SELECT *, chunksvc_session_status(status, expires_at) AS effective_status
  FROM upload_sessions
 WHERE id = %(id)s AND client_id = %(client_id)s;

-- name: lock_session
-- The row lock that serialises every change to one session (parts, complete, abort).
SELECT *, chunksvc_session_status(status, expires_at) AS effective_status
  FROM upload_sessions
 WHERE id = %(id)s AND client_id = %(client_id)s
   FOR UPDATE;

-- name: list_sessions
-- Newest first; the cursor is the (created_at, id) of the last row of the previous page.
-- A filter on a status not ended (INIT, IN_PROGRESS, COMPLETING) is also stated on the stored
-- status, which it implies: the planner then reads the few such rows through the partial indexes
-- instead of walking the client's whole history through the function (10^6 sessions: 553 ms ->
-- 0.2 ms for IN_PROGRESS, make bench-curves). Not for ended statuses: EXPIRED is also stored as
-- INIT/IN_PROGRESS past expiry, and the extra condition made the planner pick a worse plan.
-- tus partial uploads (migration 0011) are not what the client uploaded: left out.
SELECT *, chunksvc_session_status(status, expires_at) AS effective_status
  FROM upload_sessions
 WHERE client_id = %(client_id)s AND NOT tus_partial
   AND (%(status)s::text IS NULL OR chunksvc_session_status(status, expires_at) = %(status)s::text)
   AND (%(status)s::text IS NULL OR %(status)s::text NOT IN ('INIT', 'IN_PROGRESS', 'COMPLETING')
        OR status = %(status)s::text)
   AND (%(after_created_at)s::timestamptz IS NULL
        OR (created_at, id) < (%(after_created_at)s::timestamptz, %(after_id)s::uuid))
 ORDER BY created_at DESC, id DESC
 LIMIT %(limit)s;

-- name: ops_list_sessions
-- The operator's view: any client's sessions (filtered by client name and status), newest first.
SELECT s.*, c.name AS client_name, chunksvc_session_status(s.status, s.expires_at) AS effective_status
  FROM upload_sessions s JOIN clients c ON c.id = s.client_id
 WHERE (%(client)s::text IS NULL OR c.name = %(client)s::text)
   AND (%(status)s::text IS NULL OR chunksvc_session_status(s.status, s.expires_at) = %(status)s::text)
 ORDER BY s.created_at DESC, s.id DESC
 LIMIT %(limit)s;

-- name: ops_get_session
SELECT s.*, c.name AS client_name, chunksvc_session_status(s.status, s.expires_at) AS effective_status
  FROM upload_sessions s JOIN clients c ON c.id = s.client_id
 WHERE s.id = %(id)s;

-- name: list_parts
SELECT part_number, size, sha256, storage_key, created_at
  FROM upload_parts
 WHERE session_id = %(session_id)s AND part_number > %(after)s
 ORDER BY part_number
 LIMIT %(limit)s;

-- name: record_part
-- A received part's whole transaction in one statement, so one round trip (it commits on its
-- own): lock the session row, insert the part if the session still accepts parts (states.OPEN)
-- and the number is free, and count it under that lock. No row: no such session of this
-- client. `inserted` false on an open session: the number was taken (the caller compares
-- digests with get_part). A concurrent call waits for the lock and then sees the committed row
-- and counters. A PL/pgSQL function (migration 0007, which has the statements), so its plans
-- are kept by the server connection: planning this and `authenticate` as CTE statements on
-- every part was half of a 4 KiB part's PostgreSQL CPU (0.93-0.97 ms, now 0.47-0.57 ms:
-- python -m tools.bench --backends file --figures small --rounds 3, twice each).
SELECT effective_status, inserted, received_parts, received_bytes, status
  FROM chunksvc_record_part(
           %(session_id)s::uuid, %(client_id)s::bigint, %(part_number)s::integer, %(size)s::bigint,
           %(sha256)s::text, %(storage_key)s::text
       );

-- name: get_part
SELECT part_number, size, sha256, storage_key, created_at
  FROM upload_parts
 WHERE session_id = %(session_id)s AND part_number = %(part_number)s;

-- name: heal_part
-- Self-healing: part `part_number` is recorded with these bytes (same `sha256`), but its stored
-- bytes are gone; point the row at the fresh copy a retried PUT just stored. Under the session's
-- row lock and only while the session takes parts, so a completion never sees the row change
-- under it; `storage_key = old_key` makes a concurrent heal of the same part win once. No row:
-- nothing changed (the session moved on, or another retry healed the part first).
WITH locked AS (
    SELECT id
      FROM upload_sessions
     WHERE id = %(session_id)s AND client_id = %(client_id)s
       AND chunksvc_session_status(status, expires_at) IN ('INIT', 'IN_PROGRESS')
       FOR UPDATE
)
UPDATE upload_parts p
   SET storage_key = %(new_key)s
  FROM locked
 WHERE p.session_id = locked.id AND p.part_number = %(part_number)s
   AND p.storage_key = %(old_key)s AND p.sha256 = %(sha256)s
RETURNING p.part_number;

-- name: drop_lost_parts
-- A completion found recorded parts whose stored bytes are gone: forget those parts so the
-- client's ordinary resume re-sends them, correct the counters, and reopen the session with at
-- least a full TTL left (the client needs the time to re-send; it did nothing wrong). The
-- dropped keys are remembered in lost_parts, so bytes that were only out of sight are never
-- swept as orphans. The caller holds the session's row lock (lock_session, same transaction);
-- every part of the statement repeats its check (COMPLETING, and the completion lease is the
-- caller's: `owner`), so nothing changes otherwise; the reopened session's lease is cleared.
WITH dropped AS (
    DELETE FROM upload_parts p
     USING upload_sessions s
     WHERE s.id = %(id)s AND s.status = 'COMPLETING' AND s.completion_owner = %(owner)s
       AND p.session_id = s.id AND p.storage_key = ANY(%(storage_keys)s::text[])
    RETURNING p.session_id, p.part_number, p.size, p.sha256, p.storage_key
), remembered AS (
    INSERT INTO lost_parts (storage_key, session_id, part_number, size, sha256)
    SELECT storage_key, session_id, part_number, size, sha256 FROM dropped
    ON CONFLICT (storage_key) DO NOTHING
)
UPDATE upload_sessions s
   SET received_parts = s.received_parts - (SELECT count(*) FROM dropped),
       received_bytes = s.received_bytes - (SELECT COALESCE(sum(size), 0) FROM dropped),
       status = 'IN_PROGRESS',
       assembled_bytes = NULL,
       expires_at = GREATEST(s.expires_at, now() + make_interval(secs => %(ttl)s)),
       updated_at = now(),
       completion_owner = NULL,
       completion_lease_until = NULL,
       -- Parts are re-sent, maybe into bytes the frontier already hashed: it starts over.
       frontier_parts = 0,
       frontier_bytes = 0,
       frontier_state = NULL,
       frontier_owner = NULL,
       frontier_lease_until = NULL
 WHERE s.id = %(id)s AND s.status = 'COMPLETING' AND s.completion_owner = %(owner)s
RETURNING *, chunksvc_session_status(status, expires_at) AS effective_status;

-- name: missing_parts
SELECT n AS part_number
  FROM generate_series(1, %(total_parts)s::integer) AS n
 WHERE NOT EXISTS (SELECT 1 FROM upload_parts p WHERE p.session_id = %(session_id)s AND p.part_number = n)
 ORDER BY n
 LIMIT %(limit)s;

-- name: part_sources
-- What an assembly reads, in order: the session's parts; for a tus final upload (migration 0011,
-- which has no parts of its own) its partial uploads' parts, partial after partial.
SELECT part_number, size, sha256, storage_key, created_at
  FROM (
      SELECT 0 AS position, part_number, size, sha256, storage_key, created_at
        FROM upload_parts
       WHERE session_id = %(session_id)s
      UNION ALL
      SELECT t.position, p.part_number, p.size, p.sha256, p.storage_key, p.created_at
        FROM tus_uploads t JOIN upload_parts p ON p.session_id = t.session_id
       WHERE t.final_id = %(session_id)s
  ) sources
 ORDER BY position, part_number;

-- name: mark_completing
UPDATE upload_sessions
   SET status = 'COMPLETING', sha256 = COALESCE(sha256, %(sha256)s), assembled_bytes = 0, updated_at = now()
 WHERE id = %(id)s
RETURNING *, chunksvc_session_status(status, expires_at) AS effective_status;

-- name: mark_completed
-- Only from COMPLETING and only by the holder of the completion lease (`owner`): an assembler
-- that lost its lease (it stalled past its expiry and another took over, or the session ended)
-- must not record an outcome over the new holder's. The lease ends with the outcome. No row:
-- not ours to record (the caller reads the session to see what became of it).
UPDATE upload_sessions
   SET status = 'COMPLETED', object_key = %(object_key)s, object_size = %(object_size)s,
       object_sha256 = %(object_sha256)s, assembled_bytes = NULL, updated_at = now(),
       completion_owner = NULL, completion_lease_until = NULL
 WHERE id = %(id)s AND status = 'COMPLETING' AND completion_owner = %(owner)s
RETURNING *, chunksvc_session_status(status, expires_at) AS effective_status;

-- name: mark_failed
-- As mark_completed: only the lease's holder records the outcome, and the lease ends with it.
UPDATE upload_sessions
   SET status = 'FAILED', assembled_bytes = NULL, updated_at = now(),
       completion_owner = NULL, completion_lease_until = NULL
 WHERE id = %(id)s AND status = 'COMPLETING' AND completion_owner = %(owner)s;

-- name: take_completion_lease
-- The completion lease: who assembles the session (`owner`, one per attempt), and until when.
-- Run in the transaction that holds the session's row lock (lock_session) and checks its status,
-- so the check and the claim are one decision. Taken only when free: never taken, given back, or
-- run out (its holder died, or stalled past it). Rows, not a session-level advisory lock: behind
-- a transaction-pooling PgBouncer consecutive statements of one client run on different server
-- connections, so a lock on "the session" would be taken on one, given back on another, and
-- shared with every client the first serves next. The lease's times are the database's clock,
-- as each statement runs (clock_timestamp(): a take that waited for the row lock dates the lease
-- from the take, not from its transaction's start). No row: a live holder has it.
UPDATE upload_sessions
   SET completion_owner = %(owner)s,
       completion_lease_until = clock_timestamp() + make_interval(secs => %(seconds)s)
 WHERE id = %(id)s
   AND (completion_lease_until IS NULL OR completion_lease_until <= clock_timestamp())
RETURNING completion_owner;

-- name: renew_completion_lease
-- About once a second while the assembly runs (services.leases.LeaseKeeper): push the lease on
-- and record the assembly's progress in the same write (updated_at stays: it dates state
-- changes, not progress). Only while `owner` still holds it on a COMPLETING session. No row: the
-- lease was lost (it ran out and another took over, or the session ended), and the assembly
-- must stop; an owner whose lease ran out with nobody taking it over renews it (nothing else ran).
UPDATE upload_sessions
   SET completion_lease_until = clock_timestamp() + make_interval(secs => %(seconds)s),
       assembled_bytes = %(assembled)s
 WHERE id = %(id)s AND status = 'COMPLETING' AND completion_owner = %(owner)s
RETURNING id;

-- name: release_completion_lease
-- An assembly that ends without an outcome (storage full or down, an error): the lease goes
-- back at once, so completing again, the background assembler or the reaper's re-drive need not
-- wait for it to run out. The outcomes (mark_completed, mark_failed, drop_lost_parts, and
-- mark_aborted) clear it in their own statement.
UPDATE upload_sessions SET completion_owner = NULL, completion_lease_until = NULL
 WHERE id = %(id)s AND completion_owner = %(owner)s;

-- name: pending_assemblies
-- Accepted completions, oldest first, that no live assembler holds (their completion lease is
-- free: never taken, given back, or run out): the assembler of each host offers to take them;
-- the lease lets one at a time run each. Small uploads too: one assembled in a request keeps its
-- lease while the request runs, so its lease is free only when that request died or gave up
-- (a database outage: it answered 202), and then a client that only polls GET still sees it end.
SELECT id, client_id, updated_at
  FROM upload_sessions
 WHERE status = 'COMPLETING'
   AND (completion_lease_until IS NULL OR completion_lease_until <= clock_timestamp())
 ORDER BY updated_at
 LIMIT %(limit)s;

-- name: mark_aborted
-- The caller holds the row lock and, for a COMPLETING session, took its free completion lease
-- in the same transaction (take_completion_lease): the lease ends here. This WHERE clause is what
-- decides whether a session may be aborted (every state but COMPLETED): no row means it may not
-- (UploadService.abort answers 409 completed); states.TRANSITIONS documents it.
UPDATE upload_sessions
   SET status = 'ABORTED', updated_at = now(), completion_owner = NULL, completion_lease_until = NULL
 WHERE id = %(id)s AND status <> 'COMPLETED';

-- name: take_frontier
-- The hash frontier's lease (services.frontier): whoever holds it carries the session's whole-file
-- SHA-256 on from the saved state over the parts recorded next in order. Taken only when free
-- (never taken, given back, or run out: its holder died mid-hash). While the session is open or
-- completing; an ended session's frontier is of no use. No row: a live holder has it, or the
-- session ended.
UPDATE upload_sessions
   SET frontier_owner = %(owner)s,
       frontier_lease_until = clock_timestamp() + make_interval(secs => %(seconds)s)
 WHERE id = %(id)s
   AND status IN ('INIT', 'IN_PROGRESS', 'COMPLETING')
   AND (frontier_lease_until IS NULL OR frontier_lease_until <= clock_timestamp())
RETURNING id, part_size, total_parts, size, frontier_parts, frontier_bytes, frontier_state, staged_id;

-- name: save_frontier
-- A step of the frontier: the state after `parts` parts, saved with the lease pushed on. Only by
-- the holder, so a holder that stalled past its lease (and was taken over) saves nothing; and only
-- forward, so a state is never replaced by an older one. No row: the lease is lost.
UPDATE upload_sessions
   SET frontier_parts = %(parts)s,
       frontier_bytes = %(bytes)s,
       frontier_state = %(state)s,
       frontier_lease_until = clock_timestamp() + make_interval(secs => %(seconds)s)
 WHERE id = %(id)s AND frontier_owner = %(owner)s AND frontier_parts <= %(parts)s
RETURNING id;

-- name: release_frontier
UPDATE upload_sessions
   SET frontier_owner = NULL, frontier_lease_until = NULL
 WHERE id = %(id)s AND frontier_owner = %(owner)s
RETURNING id;

-- name: parts_from
-- The recorded parts numbered `after` + 1 onward, in order (the frontier takes the run of them
-- with no gap). The primary key (session_id, part_number) serves it.
SELECT part_number, size, sha256, storage_key, created_at
  FROM upload_parts
 WHERE session_id = %(session_id)s AND part_number > %(after)s
 ORDER BY part_number
 LIMIT %(limit)s;

-- name: begin_staging
-- The session's staging (StagedObject.begin) recorded, by the frontier's holder (`owner`) only and
-- only while the session is open or completing, so an abort (which takes the row lock) either sees
-- it and abandons it, or comes first and this records nothing (the caller abandons the staging).
-- Any earlier staging's tokens are forgotten with it: they name pieces of another upload.
WITH forgotten AS (
    UPDATE upload_parts SET staged_token = NULL
     WHERE session_id = %(id)s AND staged_token IS NOT NULL
       AND EXISTS (SELECT 1 FROM upload_sessions s
                    WHERE s.id = %(id)s AND s.frontier_owner = %(owner)s
                      AND s.status IN ('INIT', 'IN_PROGRESS', 'COMPLETING'))
)
UPDATE upload_sessions
   SET staged_id = %(staged_id)s
 WHERE id = %(id)s AND frontier_owner = %(owner)s AND status IN ('INIT', 'IN_PROGRESS', 'COMPLETING')
   -- Never over one a part's request began (begin_part_staging): its pieces are in that one.
   AND staged_id IS NULL
RETURNING id;

-- name: record_staged_piece
-- Part `part_number` was copied into the session's staging `staged_id` and the store answered
-- `token`. Only if the part's row still holds the bytes that were copied (`sha256`: a part
-- dropped as lost and sent again with other bytes is not this one) and the staging is still the
-- session's.
UPDATE upload_parts p
   SET staged_token = %(token)s
  FROM upload_sessions s
 WHERE p.session_id = %(id)s AND p.part_number = %(part_number)s AND p.sha256 = %(sha256)s
   AND s.id = p.session_id AND s.staged_id = %(staged_id)s
RETURNING p.part_number;

-- name: staged_pieces
-- What completing a staged object needs: every part in order, with the token of its piece (NULL:
-- not copied in yet).
SELECT part_number, size, sha256, storage_key, staged_token
  FROM upload_parts
 WHERE session_id = %(session_id)s
 ORDER BY part_number;

-- name: forget_staging
-- The session's staging is gone (finished, aborted or swept behind its back): its id and tokens
-- are forgotten, so the next part the frontier passes begins another. Only if it is still that one.
WITH forgotten AS (
    UPDATE upload_parts SET staged_token = NULL
     WHERE session_id = %(id)s AND staged_token IS NOT NULL
       AND EXISTS (SELECT 1 FROM upload_sessions s WHERE s.id = %(id)s AND s.staged_id = %(staged_id)s)
)
UPDATE upload_sessions SET staged_id = NULL
 WHERE id = %(id)s AND staged_id = %(staged_id)s
RETURNING id;

-- name: take_piece
-- A part about to be sent straight into the session's staging (services.staging): the number of
-- this request among all requests ever made for the part (1 for the first; each writes a piece
-- number of its own, since a killed writer's UploadPart may still land), and the session's staging
-- (NULL: none begun yet). Nothing when the part is recorded already (a retry goes the usual way,
-- to be compared with what was accepted) or the session takes no parts; record_part decides the
-- rest under the row lock, as for any part.
WITH session AS (
    SELECT s.id, s.staged_id FROM upload_sessions s
     WHERE s.id = %(id)s AND s.status IN ('INIT', 'IN_PROGRESS')
       AND NOT EXISTS (SELECT 1 FROM upload_parts p WHERE p.session_id = s.id AND p.part_number = %(part_number)s)
), attempt AS (
    INSERT INTO staged_part_attempts (session_id, part_number, attempts)
    SELECT id, %(part_number)s, 1 FROM session
        ON CONFLICT (session_id, part_number) DO UPDATE SET attempts = staged_part_attempts.attempts + 1
    RETURNING attempts
)
SELECT attempt.attempts, session.staged_id FROM attempt, session;

-- name: begin_part_staging
-- The session's staging, begun by the request of a part sent straight in: recorded only if the
-- session has none yet and still takes parts. Of two requests beginning one at once, one wins
-- (the other abandons its own and uses the winner's: session_staging), and an abort (row lock)
-- either sees it and abandons it, or came first and this records nothing.
UPDATE upload_sessions SET staged_id = %(staged_id)s
 WHERE id = %(id)s AND staged_id IS NULL AND status IN ('INIT', 'IN_PROGRESS')
RETURNING id;

-- name: session_staging
-- The session's staging, if one was begun (what completing, aborting or purging it acts on).
SELECT staged_id FROM upload_sessions WHERE id = %(id)s AND staged_id IS NOT NULL;

-- name: live_stagings
-- Stagings the reaper's sweep of unfinished uploads must leave alone: those of sessions whose
-- bytes are not purged yet (an ended session's staging goes with its purge, or, if that failed,
-- with the sweep after it).
SELECT staged_id FROM upload_sessions WHERE staged_id IS NOT NULL AND purged_at IS NULL;

-- name: ping
SELECT 1 AS ok;

-- metrics ------------------------------------------------------------------------------------

-- name: set_local_statement_timeout
-- Bounds every statement after it in this transaction (in milliseconds): /metrics must answer
-- even when the database is slow.
SELECT set_config('statement_timeout', %(milliseconds)s::text, true);

-- name: session_census
-- The sessions gauges, counted when /metrics is scraped. Ended sessions are the bulk of the
-- table and grow with history, so no arm reads them: each arm counts only rows a partial index
-- holds, whose size follows the uploads under way, not the history (about 8 ms for 5,000 open
-- sessions among a million ended ones, where a plain GROUP BY status takes 330 ms and grows):
-- open sessions through upload_sessions_open_expiry_idx (an index scan: its rows change with
-- every part, so an index-only scan would visit the heap anyway); COMPLETING ones through
-- upload_sessions_closed_status_idx; ended sessions not purged yet, index-only, through
-- upload_sessions_unpurged_idx (a few, while the reaper runs). Open sessions past their expiry
-- (clients see EXPIRED; the reaper has not marked them yet) are `overdue`, not INIT/IN_PROGRESS.
SELECT CASE WHEN expires_at <= now() THEN 'overdue' ELSE status END AS status, count(*) AS sessions
  FROM upload_sessions
 WHERE status IN ('INIT', 'IN_PROGRESS')
 GROUP BY 1
UNION ALL
SELECT 'COMPLETING', count(*)
  FROM upload_sessions
 WHERE status = 'COMPLETING'
UNION ALL
SELECT 'unpurged', count(*)
  FROM upload_sessions
 WHERE purged_at IS NULL AND status IN ('COMPLETED', 'ABORTED', 'EXPIRED', 'FAILED');

-- reaper ------------------------------------------------------------------------------------
-- Several reapers may run at once (cron on several hosts): row claims use SKIP LOCKED, so each
-- takes rows no other holds and none waits; whole phases take a lease (reaper_leases).

-- name: expire_overdue_sessions
-- Stores EXPIRED on open sessions past their expiry (clients already read them as EXPIRED).
WITH overdue AS (
    SELECT id
      FROM upload_sessions
     WHERE status IN ('INIT', 'IN_PROGRESS') AND expires_at <= now()
     ORDER BY expires_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE upload_sessions s
   SET status = 'EXPIRED', updated_at = now()
  FROM overdue
 WHERE s.id = overdue.id
RETURNING s.id;

-- name: overdue_sessions
-- What expiry would do now (a dry run): the first `limit` overdue open sessions, each row with
-- the count of all of them (the window is counted before LIMIT applies).
SELECT id, count(*) OVER () AS overdue
  FROM upload_sessions
 WHERE status IN ('INIT', 'IN_PROGRESS') AND expires_at <= now()
 ORDER BY expires_at
 LIMIT %(limit)s;

-- name: claim_unpurged_sessions
-- Ended sessions whose stored bytes were not removed yet, oldest first from a keyset cursor.
-- The row locks last until the claiming transaction ends; a row another reaper purged
-- meanwhile is re-checked under the lock and left out.
SELECT id, status, updated_at
  FROM upload_sessions
 WHERE purged_at IS NULL AND status IN ('COMPLETED', 'ABORTED', 'EXPIRED', 'FAILED')
   AND (%(after_updated_at)s::timestamptz IS NULL
        OR (updated_at, id) > (%(after_updated_at)s::timestamptz, %(after_id)s::uuid))
 ORDER BY updated_at, id
 LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED;

-- name: mark_purged
-- Bookkeeping only: updated_at (what clients see) stays as it was.
UPDATE upload_sessions SET purged_at = now() WHERE id = ANY(%(ids)s::uuid[]);

-- name: stale_completions
-- COMPLETING sessions untouched for longer than `lease` (the re-drive's grace, which leaves a
-- client the time to retry its completion itself) whose completion lease is free (never taken,
-- given back, or run out: no live assembler), oldest first from a keyset cursor.
SELECT id, client_id, updated_at
  FROM upload_sessions
 WHERE status = 'COMPLETING' AND updated_at <= now() - make_interval(secs => %(lease)s)
   AND (completion_lease_until IS NULL OR completion_lease_until <= clock_timestamp())
   AND (%(after_updated_at)s::timestamptz IS NULL
        OR (updated_at, id) > (%(after_updated_at)s::timestamptz, %(after_id)s::uuid))
 ORDER BY updated_at, id
 LIMIT %(limit)s;

-- name: sessions_for_sweep
-- The orphan sweep's one lookup per batch of stored keys: which of their sessions exist, and
-- whether their bytes were already purged.
SELECT id, status, purged_at IS NOT NULL AS purged
  FROM upload_sessions
 WHERE id = ANY(%(ids)s::uuid[]);

-- name: referenced_part_keys
-- Which of these stored keys (of these sessions) a part row points to, or a dropped part did
-- (lost_parts). Keys of a live session named by neither are bytes whose record never committed
-- (kept when its outcome was unknown).
SELECT storage_key
  FROM upload_parts
 WHERE session_id = ANY(%(session_ids)s::uuid[]) AND storage_key = ANY(%(storage_keys)s::text[])
UNION ALL
SELECT storage_key
  FROM lost_parts
 WHERE session_id = ANY(%(session_ids)s::uuid[]) AND storage_key = ANY(%(storage_keys)s::text[])
UNION ALL
-- A tus upload's part in the making (migration 0011): its bytes are the upload's too.
SELECT storage_key
  FROM tus_incomplete_parts
 WHERE session_id = ANY(%(session_ids)s::uuid[]) AND storage_key = ANY(%(storage_keys)s::text[]);

-- name: take_reaper_lease
-- The lease on a whole reaper phase (or on the periodic run), held by `owner` for `seconds`
-- and renewed while it runs. Taken when nobody has it, or when its holder's lease ran out (that
-- reaper died or stalled): ON CONFLICT locks the existing row and checks `until` on its latest
-- version, so of two reapers that try at once exactly one gets it. Rows, not a session-level
-- advisory lock, for the same reason as take_completion_lease. No row: another reaper has it.
INSERT INTO reaper_leases (name, owner, until)
VALUES (%(name)s, %(owner)s, clock_timestamp() + make_interval(secs => %(seconds)s))
ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, until = EXCLUDED.until
 WHERE reaper_leases.until <= clock_timestamp()
RETURNING owner;

-- name: renew_reaper_lease
-- Only while `owner` still holds it (an UPDATE, never an insert: a lease that another took
-- and gave back meanwhile is not ours again). No row: lost.
UPDATE reaper_leases SET until = clock_timestamp() + make_interval(secs => %(seconds)s)
 WHERE name = %(name)s AND owner = %(owner)s
RETURNING owner;

-- name: release_reaper_lease
DELETE FROM reaper_leases WHERE name = %(name)s AND owner = %(owner)s;

-- webhooks ----------------------------------------------------------------------------------
-- Endpoints are managed by ops (`python -m chunksvc webhooks ...`); events are written by the
-- trigger of migration 0005 in the transaction of each session's ending change; deliverers (a
-- thread in every server process, or `deliver --once`) claim due deliveries with SKIP LOCKED
-- and a lease, POST them with no transaction open, then record the outcome.

-- name: insert_webhook_endpoint
-- Only for a client that exists (one with an API key): a misspelt name is refused, not created.
INSERT INTO webhook_endpoints (client_id, url, secret_nonce, key_id)
SELECT id, %(url)s, %(secret_nonce)s, %(key_id)s
  FROM clients
 WHERE name = %(client_name)s
RETURNING id, client_id, %(client_name)s AS client_name, url, secret_nonce, key_id, previous_nonce,
          previous_until, created_at, removed_at;

-- name: get_webhook_endpoint
SELECT e.id, e.client_id, c.name AS client_name, e.url, e.secret_nonce, e.key_id, e.previous_nonce,
       e.previous_until, e.created_at, e.removed_at
  FROM webhook_endpoints e
  JOIN clients c ON c.id = e.client_id
 WHERE e.id = %(id)s;

-- name: list_webhook_endpoints
-- Endpoints in use (of one client, or all), each with its deliveries' state: pending (failing:
-- those of them that have failed at least once) and dead, read through the partial indexes.
SELECT e.id, c.name AS client_name, e.url, e.key_id, e.created_at, e.previous_until,
       (SELECT count(*) FROM webhook_deliveries d
         WHERE d.endpoint_id = e.id AND d.state = 'pending') AS pending,
       (SELECT count(*) FROM webhook_deliveries d
         WHERE d.endpoint_id = e.id AND d.state = 'pending' AND d.last_error IS NOT NULL) AS failing,
       (SELECT count(*) FROM webhook_deliveries d
         WHERE d.endpoint_id = e.id AND d.state = 'dead') AS dead
  FROM webhook_endpoints e
  JOIN clients c ON c.id = e.client_id
 WHERE e.removed_at IS NULL AND (%(client_name)s::text IS NULL OR c.name = %(client_name)s)
 ORDER BY c.name, e.id;

-- name: remove_webhook_endpoint
-- Kept on record (its deliveries' history stays readable); no new event is addressed to it.
UPDATE webhook_endpoints SET removed_at = now()
 WHERE id = %(id)s AND removed_at IS NULL
RETURNING id;

-- name: drop_pending_deliveries
-- A removed endpoint's undelivered events: nobody will send them (dead ones stay on record).
DELETE FROM webhook_deliveries WHERE endpoint_id = %(endpoint_id)s AND state = 'pending';

-- name: rotate_webhook_secret
-- A new secret; the current one keeps signing beside it for `overlap` seconds (a roll), unless
-- overlap is 0. A roll begun before is cut short: at most two secrets sign at once.
UPDATE webhook_endpoints
   SET previous_nonce = CASE WHEN %(overlap)s > 0 THEN secret_nonce END,
       previous_until = CASE WHEN %(overlap)s > 0 THEN now() + make_interval(secs => %(overlap)s) END,
       secret_nonce = %(secret_nonce)s,
       key_id = %(key_id)s
 WHERE id = %(id)s AND removed_at IS NULL
RETURNING id, client_id, (SELECT name FROM clients WHERE id = client_id) AS client_name, url, secret_nonce,
          key_id, previous_nonce, previous_until, created_at, removed_at;

-- name: redeliver_webhook_event
-- The event again to each endpoint still in use that had it delivered or gave it up: a new round
-- of retries, due now (an event's own endpoints only; a newer endpoint never had it). A pending
-- delivery is left alone: it is being sent, or will be (making it due now could send it twice
-- at once, and ahead of an earlier event of its session). One row: whether the event exists
-- (never made, or pruned: see prune_webhook_events) and the endpoints it is due to again. The
-- event's row is locked FOR KEY SHARE before any delivery is touched (the sub-select is the
-- delivery scan's index condition, so it runs first): a prune that claimed the event first is
-- waited for (then the event is gone), and one that comes later skips it.
WITH event AS (
    SELECT id FROM webhook_events WHERE id = %(event_id)s FOR KEY SHARE
), due AS (
    UPDATE webhook_deliveries d
       SET state = 'pending', next_attempt_at = now(), attempts = 0, first_attempt_at = NULL,
           delivered_at = NULL, last_error = NULL
      FROM webhook_endpoints e
     WHERE d.event_id = (SELECT id FROM event) AND e.id = d.endpoint_id AND e.removed_at IS NULL
       AND d.state IN ('delivered', 'dead')
    RETURNING d.endpoint_id
)
SELECT EXISTS (SELECT 1 FROM event) AS found,
       ARRAY(SELECT endpoint_id FROM due ORDER BY endpoint_id) AS endpoints;

-- name: claim_webhook_deliveries
-- Due deliveries, at most one per endpoint per claim (a slow endpoint takes one slot at a time,
-- never a whole batch), none to the endpoints this deliverer is already busy with (or only to
-- `only_endpoints`, when given: the deliverer's share for failing endpoints), and only to
-- endpoints whose secret this deliverer's signing key derived (`key_id`); of each endpoint, the
-- soonest due delivery that is the earliest pending event of its session (in order: a later
-- event waits for the earlier one to be delivered or dead). Driven by the endpoints, one probe
-- of webhook_deliveries_due_idx each: the cost follows the endpoints in use, not the backlog (a
-- dead endpoint with 50,000 events due costs one probe, not a scan of them). Rows another
-- deliverer holds are skipped, not waited on. The claim pushes next_attempt_at past the attempt
-- (the lease) and marks it with a fresh `claim`: committed before the POST, it keeps every other
-- deliverer off the row while the attempt runs, makes it due again if the attempt's deliverer
-- dies, and lets a failure be recorded only by the attempt that holds the row.
WITH claimed AS (
    SELECT due.event_id, due.endpoint_id
      FROM webhook_endpoints e
     CROSS JOIN LATERAL (
           SELECT d.event_id, d.endpoint_id, d.next_attempt_at
             FROM webhook_deliveries d
            WHERE d.endpoint_id = e.id AND d.state = 'pending' AND d.next_attempt_at <= now()
              AND NOT EXISTS (
                  SELECT 1 FROM webhook_deliveries earlier
                   WHERE earlier.endpoint_id = d.endpoint_id AND earlier.session_id = d.session_id
                     AND earlier.event_seq < d.event_seq AND earlier.state = 'pending')
            ORDER BY d.next_attempt_at
            LIMIT 1
              FOR UPDATE SKIP LOCKED
           ) due
     WHERE e.removed_at IS NULL AND e.key_id = %(key_id)s
       AND e.id <> ALL(%(busy_endpoints)s::bigint[])
       AND (%(only_endpoints)s::bigint[] IS NULL OR e.id = ANY(%(only_endpoints)s::bigint[]))
     ORDER BY due.next_attempt_at
     LIMIT %(limit)s
)
UPDATE webhook_deliveries d
   SET next_attempt_at = now() + make_interval(secs => %(lease)s), attempts = d.attempts + 1,
       last_attempt_at = now(), first_attempt_at = COALESCE(d.first_attempt_at, now()),
       claim = gen_random_uuid()
  FROM claimed, webhook_events ev, webhook_endpoints e
 WHERE d.event_id = claimed.event_id AND d.endpoint_id = claimed.endpoint_id
   AND ev.id = d.event_id AND e.id = d.endpoint_id
RETURNING d.event_id, d.endpoint_id, d.session_id, d.attempts, d.claim, ev.type,
          ev.created_at AS event_created_at, e.url, e.key_id, e.secret_nonce,
          CASE WHEN e.previous_until > now() THEN e.previous_nonce END AS previous_nonce;

-- name: event_sessions
-- The session each event carries, as its change left it, in the columns of upload_sessions (so
-- the body is rendered as GET renders a session).
SELECT ev.id AS event_id, s.*, s.status AS effective_status
  FROM webhook_events ev
 CROSS JOIN LATERAL jsonb_populate_record(NULL::upload_sessions, ev.session) s
 WHERE ev.id = ANY(%(event_ids)s::uuid[]);

-- name: record_webhook_delivered
-- A 2xx. Also when this attempt's lease had run out and another deliverer took the row: it was
-- delivered either way. Returns the seconds from the state change to now (the metrics' latency;
-- the database's clock on both ends), none when it was delivered before.
UPDATE webhook_deliveries d
   SET state = 'delivered', delivered_at = now(), last_status = %(status)s, last_error = NULL
  FROM webhook_events ev
 WHERE d.event_id = %(event_id)s AND d.endpoint_id = %(endpoint_id)s AND d.state = 'pending'
   AND ev.id = d.event_id
RETURNING extract(epoch FROM clock_timestamp() - ev.created_at)::float8 AS latency;

-- name: record_webhook_failed
-- Anything but a 2xx (`error` says what: never NULL, it marks the delivery as failing): due
-- again after `retry_in` seconds, or dead once `retry_for` seconds have passed since its first
-- try. Only by the attempt that holds the row (`claim`): a late failure never undoes a delivery,
-- nor makes due early a row another deliverer has claimed since (it would be sent twice).
UPDATE webhook_deliveries
   SET last_status = %(status)s, last_error = %(error)s,
       next_attempt_at = now() + make_interval(secs => %(retry_in)s),
       state = CASE WHEN first_attempt_at <= now() - make_interval(secs => %(retry_for)s)
                    THEN 'dead' ELSE 'pending' END
 WHERE event_id = %(event_id)s AND endpoint_id = %(endpoint_id)s AND state = 'pending' AND claim = %(claim)s
RETURNING state;

-- name: webhook_census
-- The delivery gauges, counted when /metrics is scraped, through the partial indexes (pending
-- rows follow the backlog; dead ones stay until redelivered). Failing: pending after a failure.
SELECT count(*) FILTER (WHERE last_error IS NULL) AS pending_new,
       count(*) FILTER (WHERE last_error IS NOT NULL) AS failing,
       (SELECT count(*) FROM webhook_deliveries WHERE state = 'dead') AS dead
  FROM webhook_deliveries
 WHERE state = 'pending';

-- name: list_webhook_deliveries
-- The operator's view of deliveries, newest event first: of one endpoint, one session, in one
-- state (`failing`: pending after a failed attempt), to find an event to redeliver or see why
-- an endpoint fails.
SELECT d.event_id, ev.type, ev.created_at AS event_created_at, d.session_id, d.endpoint_id, d.state, d.attempts,
       d.next_attempt_at, d.last_status, d.last_error, d.delivered_at
  FROM webhook_deliveries d
  JOIN webhook_events ev ON ev.id = d.event_id
 WHERE (%(endpoint_id)s::bigint IS NULL OR d.endpoint_id = %(endpoint_id)s)
   AND (%(session_id)s::uuid IS NULL OR d.session_id = %(session_id)s)
   AND (%(state)s::text IS NULL
        OR d.state = %(state)s
        OR (%(state)s = 'failing' AND d.state = 'pending' AND d.last_error IS NOT NULL))
 ORDER BY ev.seq DESC, d.endpoint_id
 LIMIT %(limit)s;

-- name: set_webhook_url
-- The endpoint moves: its secret, its undelivered events and its history stay with it.
UPDATE webhook_endpoints SET url = %(url)s
 WHERE id = %(id)s AND removed_at IS NULL
RETURNING id, client_id, (SELECT name FROM clients WHERE id = client_id) AS client_name, url, secret_nonce,
          key_id, previous_nonce, previous_until, created_at, removed_at;

-- webhook retention -------------------------------------------------------------------------
-- The reaper removes events older than CHUNKSVC_WEBHOOK_RETENTION whose every delivery is final
-- (delivered or dead), with their deliveries (ON DELETE CASCADE), in batches of its own
-- transaction each. An event with a pending delivery is never removed, whatever its age: it is
-- being sent, or waits for a host with its endpoint's signing key. An event whose endpoints were
-- all removed while it was pending has no delivery left: nothing will send it, and it goes too.

-- name: prunable_webhook_events
-- What the prune would remove now (a dry run): the first `limit` events, each row with the count
-- of all of them (the window is counted before LIMIT applies). Reads every old event once (one
-- hash of the pending deliveries): 0.7 s for 10^6 events.
SELECT ev.id, count(*) OVER () AS prunable
  FROM webhook_events ev
 WHERE ev.created_at < now() - make_interval(secs => %(retention)s)
   AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = ev.id AND d.state = 'pending')
 ORDER BY ev.created_at, ev.id
 LIMIT %(limit)s;

-- name: claim_prunable_webhook_events
-- The next batch, oldest first from a keyset cursor (webhook_events_created_idx, migration 0008),
-- so events kept for a pending delivery are read once per pass, not once per batch. Locked until
-- the batch's transaction ends (SKIP LOCKED: another reaper's batch, or an event a redelivery
-- holds, is passed over, not waited for). The pending check here only narrows the batch: it is
-- made on the statement's snapshot, before the lock; prune_webhook_events makes it again. OFFSET 0
-- keeps each check a probe of the deliveries' primary key per event read: without it the planner
-- may hash every pending delivery (the whole backlog) for each batch, as it did on a few thousand
-- events. 10^6 events, a tenth pending: a batch of 1,000 reads 1,111 events, 1,111 probes, 7-8 ms.
SELECT ev.id, ev.created_at
  FROM webhook_events ev
 WHERE ev.created_at < now() - make_interval(secs => %(retention)s)
   AND (%(after_created_at)s::timestamptz IS NULL
        OR (ev.created_at, ev.id) > (%(after_created_at)s::timestamptz, %(after_id)s::uuid))
   AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = ev.id AND d.state = 'pending' OFFSET 0)
 ORDER BY ev.created_at, ev.id
 LIMIT %(limit)s
   FOR UPDATE OF ev SKIP LOCKED;

-- name: lock_webhook_deliveries_of_events
-- The claimed events' deliveries, locked before prune_webhook_events re-checks them: a writer
-- that changed a delivery without first locking its event (the previous release's
-- redeliver_webhook_event, while a rolling upgrade runs both) is waited for here, so the DELETE's
-- snapshot, taken after, sees its commit (a delivery made pending again keeps its event).
SELECT d.event_id FROM webhook_deliveries d WHERE d.event_id = ANY(%(ids)s::uuid[]) FOR UPDATE;

-- name: prune_webhook_events
-- The claimed events, with their deliveries, unless one became pending meanwhile. A statement of
-- its own, after the claim: its snapshot sees a redelivery that committed before the claim took
-- the row's lock (redeliver_webhook_event locks the event first, so none can commit after).
-- OFFSET 0 as in the claim (without it: a hash of all 20,001 pending deliveries per batch, at
-- 2·10^5 events): a probe per claimed event; 1,000 events with their deliveries, 11 ms at 10^6.
DELETE FROM webhook_events ev
 WHERE ev.id = ANY(%(ids)s::uuid[])
   AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = ev.id AND d.state = 'pending' OFFSET 0)
RETURNING ev.id;

-- ============================================================================================
-- Quotas (contract v1.2): open sessions and open bytes per client.

-- name: lock_client
-- Inside a create's transaction, before its count and INSERT. The client's row lock (FOR NO KEY
-- UPDATE: it does not block key-sharing locks such as the sessions' foreign key checks)
-- serialises the creates of one client on every host, so two of them cannot both take the last
-- free slot. It must be a statement of its own: a statement's snapshot is taken when it starts,
-- so a count in the statement that waited for the lock would not see the session the lock's
-- previous holder just committed (READ COMMITTED gives the NEXT statement a new snapshot).
-- Other clients' creates lock other rows and never wait here.
SELECT id FROM clients WHERE id = %(client_id)s FOR NO KEY UPDATE;

-- name: open_usage
-- Open means what clients see: an INIT or IN_PROGRESS session past its expiry is EXPIRED and
-- frees its room at once, before the reaper stores that. Reads the partial index of open
-- sessions (migration 0009), so its cost follows the open sessions, not the client's history.
SELECT count(s.id) AS open_sessions,
       coalesce(sum(s.size), 0)::bigint AS open_bytes,
       (SELECT max_sessions FROM client_limits WHERE client_id = %(client_id)s) AS max_sessions,
       (SELECT max_bytes FROM client_limits WHERE client_id = %(client_id)s) AS max_bytes
  FROM upload_sessions s
 WHERE s.client_id = %(client_id)s
   AND s.status IN ('INIT', 'IN_PROGRESS', 'COMPLETING')
   AND chunksvc_session_status(s.status, s.expires_at) IN ('INIT', 'IN_PROGRESS', 'COMPLETING');

-- name: client_usage
-- open_usage for every client (or one), with the rate overrides (migration 0013), for GET
-- /uploads/limits and `limits show`.
SELECT c.id AS client_id, c.name AS client_name,
       count(s.id) AS open_sessions,
       coalesce(sum(s.size), 0)::bigint AS open_bytes,
       l.max_sessions,
       l.max_bytes,
       l.rate_limit,
       l.rate_burst
  FROM clients c
  LEFT JOIN upload_sessions s
    ON s.client_id = c.id
   AND s.status IN ('INIT', 'IN_PROGRESS', 'COMPLETING')
   AND chunksvc_session_status(s.status, s.expires_at) IN ('INIT', 'IN_PROGRESS', 'COMPLETING')
  LEFT JOIN client_limits l ON l.client_id = c.id
 WHERE (%(client_name)s::text IS NULL OR c.name = %(client_name)s)
   AND (%(client_id)s::bigint IS NULL OR c.id = %(client_id)s)
 GROUP BY c.id, c.name, l.max_sessions, l.max_bytes, l.rate_limit, l.rate_burst
 ORDER BY c.name;

-- name: set_client_limits
-- An override: a column given replaces the stored one, a NULL keeps it (set --sessions alone
-- leaves a bytes override as it was). Nothing when no client has that name.
INSERT INTO client_limits (client_id, max_sessions, max_bytes, rate_limit, rate_burst)
SELECT id, %(max_sessions)s, %(max_bytes)s, %(rate_limit)s, %(rate_burst)s FROM clients WHERE name = %(client_name)s
ON CONFLICT (client_id) DO UPDATE
   SET max_sessions = coalesce(EXCLUDED.max_sessions, client_limits.max_sessions),
       max_bytes = coalesce(EXCLUDED.max_bytes, client_limits.max_bytes),
       rate_limit = coalesce(EXCLUDED.rate_limit, client_limits.rate_limit),
       rate_burst = coalesce(EXCLUDED.rate_burst, client_limits.rate_burst),
       updated_at = now()
RETURNING client_id;

-- name: reset_client_limits
-- Back to the defaults. The client's name is checked apart, so an unknown one is told.
DELETE FROM client_limits WHERE client_id = (SELECT id FROM clients WHERE name = %(client_name)s)
RETURNING client_id;

-- name: client_id_by_name
SELECT id FROM clients WHERE name = %(client_name)s;

-- tus (contract v1.2, migration 0011) ------------------------------------------------------
-- A tus upload is a session; these read and change what tus adds. Every change runs under the
-- session's row lock (lock_tus_state), as parts, completion and abort do.

-- name: tus_state
-- A session as /tus/ sees it, in one round trip: the session and what tus adds to it
-- (chunksvc_tus_state, migration 0015: its tus row, its part in the making, and how far its
-- parts reach without a gap; Upload-Offset is `contiguous_bytes` + `held_bytes`).
SELECT s.*, chunksvc_session_status(s.status, s.expires_at) AS effective_status, tus.*
  FROM upload_sessions s
 CROSS JOIN LATERAL chunksvc_tus_state(s.id) tus
 WHERE s.id = %(id)s AND s.client_id = %(client_id)s;

-- name: lock_tus_state
-- tus_state under the session's row lock: a PATCH checks here, before recording anything, that
-- the upload is where it was when its body began (no other PATCH moved it meanwhile).
SELECT s.*, chunksvc_session_status(s.status, s.expires_at) AS effective_status, tus.*
  FROM upload_sessions s
 CROSS JOIN LATERAL chunksvc_tus_state(s.id) tus
 WHERE s.id = %(id)s AND s.client_id = %(client_id)s
   FOR UPDATE OF s;

-- name: insert_tus_upload
-- In the transaction that created the session (UploadService.create_session's `within`); a
-- partial is marked hidden in the same step.
WITH hidden AS (
    UPDATE upload_sessions SET tus_partial = true WHERE id = %(session_id)s AND %(concat)s::text = 'partial'
)
INSERT INTO tus_uploads (session_id, metadata, concat) VALUES (%(session_id)s, %(metadata)s, %(concat)s);

-- name: add_tus_incomplete_part
-- A piece of the part in the making (the caller holds the row lock and checked the state).
INSERT INTO tus_incomplete_parts (session_id, part_number, start, size, storage_key)
VALUES (%(session_id)s, %(part_number)s, %(start)s, %(size)s, %(storage_key)s);

-- name: drop_tus_incomplete_parts
-- Once part `part_number` is recorded: its pieces (and any left of earlier parts) are in it, or
-- stale. Returns their keys, whose bytes go after the commit.
DELETE FROM tus_incomplete_parts
 WHERE session_id = %(session_id)s AND part_number <= %(part_number)s
RETURNING storage_key;

-- name: concatenate_tus_partials
-- A final upload takes its partials, in order, under their row locks: each must be this client's
-- partial, in no other final, and not ended. Their expiry moves to the final's (they hold its
-- bytes until it is assembled). Returns the partials taken: fewer than asked means one was not
-- eligible, and the caller rolls the whole creation back.
WITH wanted AS (
    SELECT id, ordinality::integer AS position
      FROM unnest(%(partial_ids)s::uuid[]) WITH ORDINALITY AS w (id, ordinality)
), locked AS (
    SELECT s.id, w.position
      FROM upload_sessions s JOIN wanted w ON w.id = s.id
      JOIN tus_uploads t ON t.session_id = s.id
     WHERE s.client_id = %(client_id)s AND t.concat = 'partial' AND t.final_id IS NULL
       AND chunksvc_session_status(s.status, s.expires_at) IN ('INIT', 'IN_PROGRESS')
       FOR UPDATE OF s, t
), extended AS (
    UPDATE upload_sessions s
       SET expires_at = GREATEST(s.expires_at, (SELECT f.expires_at FROM upload_sessions f WHERE f.id = %(final_id)s))
      FROM locked
     WHERE s.id = locked.id
)
UPDATE tus_uploads t
   SET final_id = %(final_id)s, position = locked.position
  FROM locked
 WHERE t.session_id = locked.id
RETURNING t.session_id;

-- name: tus_partials_of
-- A final upload's partials, in order (HEAD answers them in Upload-Concat).
SELECT session_id FROM tus_uploads WHERE final_id = %(final_id)s ORDER BY position;

-- name: mark_tus_final_ready
-- Under the final's row lock: once every partial has all its parts recorded, the final has all
-- its bytes: its counters say so (completion checks them), and it can be completed. No row: not
-- yet (or it moved on already).
UPDATE upload_sessions f
   SET received_parts = f.total_parts, received_bytes = f.size, status = 'IN_PROGRESS', updated_at = now()
 WHERE f.id = %(final_id)s AND f.status = 'INIT' AND f.expires_at > now()
   AND NOT EXISTS (
       SELECT 1
         FROM tus_uploads t JOIN upload_sessions p ON p.id = t.session_id
        WHERE t.final_id = f.id
          AND (p.received_bytes < p.size OR p.status NOT IN ('INIT', 'IN_PROGRESS'))
   )
RETURNING f.id;


-- Request-rate limits (contract v1.2): a token bucket per client (migration 0013).

-- name: rate_overrides
-- Every client's rate override. Each worker keeps this list a few seconds (RateLimiter), so a
-- client with no limit at all (the default: CHUNKSVC_RATE_LIMIT=0) costs no statement per request.
SELECT client_id, rate_limit, rate_burst
  FROM client_limits
 WHERE rate_limit IS NOT NULL OR rate_burst IS NOT NULL;

-- name: take_rate_token
-- Take up to %(want)s whole tokens from the client's bucket (a worker spends them on its next
-- requests, see RateLimiter), in one statement, exact across every worker and host: the row lock
-- of the upsert serialises one client's takers, and other clients' rows are never waited on.
-- The bucket refills at %(rate)s tokens a second up to %(burst)s, by the database's clock. A take
-- gets the whole tokens there, at most %(want)s; none (0 taken) refuses the request and takes
-- nothing, so a client flooding past its limit still gets exactly its rate. `now()` is this
-- statement's start: one that waited for the lock may be older than the row, hence greatest().
-- The first take of a client finds a full bucket. Autocommit, on an UNLOGGED table: no WAL flush.
-- Returns the tokens left and how many were taken (RETURNING sees only the new row, so the count
-- is stored beside the tokens). chunksvc_refilled (migration 0013) is the bucket's level before
-- this take: a plain SQL function, inlined by the planner.
INSERT INTO client_rate_buckets AS b (client_id, tokens, refilled_at, taken)
VALUES (%(client_id)s, %(burst)s::double precision - least(%(want)s, floor(%(burst)s::double precision)),
        now(), least(%(want)s, floor(%(burst)s::double precision)))
ON CONFLICT (client_id) DO UPDATE
   SET tokens = chunksvc_refilled(b.tokens, b.refilled_at, %(rate)s, %(burst)s)
                - least(%(want)s, floor(chunksvc_refilled(b.tokens, b.refilled_at, %(rate)s, %(burst)s))),
       refilled_at = greatest(b.refilled_at, now()),
       taken = least(%(want)s, floor(chunksvc_refilled(b.tokens, b.refilled_at, %(rate)s, %(burst)s)))
RETURNING b.tokens, b.taken;
