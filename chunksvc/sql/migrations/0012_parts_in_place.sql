-- Parts written in place (issue "time to a verified object"): on a local file system each part's
-- bytes go straight to their offset in one file per session, `parts/<session>/assembly`, which
-- becomes the object by a link; and the whole-file SHA-256 is computed as the parts arrive (the
-- hash frontier), so completing hashes only what is left.

-- Every part written in place names the session's one file. Fresh keys (a part in a file of its
-- own) stay unique: removing one part's bytes must never remove another's. The shared file is
-- removed only with the whole session (completed, failed, aborted or purged).
ALTER TABLE upload_parts DROP CONSTRAINT upload_parts_storage_key_key;
CREATE UNIQUE INDEX upload_parts_own_storage_key_idx ON upload_parts (storage_key)
    WHERE storage_key NOT LIKE 'parts/%/assembly';
CREATE INDEX upload_parts_storage_key_idx ON upload_parts (storage_key);

-- The hash frontier: the SHA-256 state after the first `frontier_parts` parts (`frontier_bytes`
-- bytes), OpenSSL's SHA256_CTX as saved by chunksvc.hashstate, and the lease of whoever carries it
-- on (one worker at a time, on any host; a holder killed mid-hash is taken over when the lease
-- runs out, from its last saved state).
ALTER TABLE upload_sessions
    ADD COLUMN frontier_parts integer NOT NULL DEFAULT 0,
    ADD COLUMN frontier_bytes bigint NOT NULL DEFAULT 0,
    ADD COLUMN frontier_state bytea,
    ADD COLUMN frontier_owner uuid,
    ADD COLUMN frontier_lease_until timestamptz,
    ADD CONSTRAINT frontier_in_range CHECK (frontier_parts BETWEEN 0 AND total_parts AND frontier_bytes BETWEEN 0 AND size),
    ADD CONSTRAINT frontier_state_iff_started CHECK ((frontier_parts = 0) = (frontier_state IS NULL));
