-- Parts a completion dropped because their stored bytes could not be found (the session was
-- reopened for the client to send them again). Their keys stay on record: if the storage only
-- looked empty (an unmounted disk, a wrong bucket) and the bytes come back, the reaper's orphan
-- sweep must not take them for bytes that no record needs. They go with the session's purge,
-- once the session has ended.
CREATE TABLE lost_parts (
    storage_key text PRIMARY KEY,
    session_id  uuid NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    part_number integer NOT NULL,
    size        bigint NOT NULL,
    sha256      text NOT NULL,
    dropped_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lost_parts_session_idx ON lost_parts (session_id);
