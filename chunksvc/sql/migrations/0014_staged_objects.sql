-- Objects staged while their parts arrive (issue "time to a verified object"), on a store that
-- builds an object from stored keys (S3: one multipart upload per session, each part a server-side
-- copy of a part's own key, UploadPartCopy). The hash frontier copies each part in as it passes
-- it, so completing copies only what is left (the last part or two), then completes the upload.
-- Before this, completion copied every part (1 GiB on radosgw: about 5 s after the last part).

-- The session's staging (its multipart upload id), begun by the frontier's holder at the first
-- part it passes. Kept after the session ends: the reaper's sweep of unfinished uploads leaves a
-- staging alone while its session is not purged, and aborts it once the session is.
ALTER TABLE upload_sessions ADD COLUMN staged_id text;

-- The token (ETag) the store gave when this part's bytes were copied in as the staging's piece
-- of the same number; NULL: not copied in (yet), or copied into a staging since dropped. A part
-- dropped as lost and sent again is a new row, so it starts NULL, never with the old bytes'
-- token. Completion compares each token with what the store holds now, and copies again any part
-- whose piece differs (a copier that outlived its lease may have replaced it).
ALTER TABLE upload_parts ADD COLUMN staged_token text;

-- live_stagings' scan: only the sessions with a staging and bytes not yet purged.
CREATE INDEX upload_sessions_live_staging_idx ON upload_sessions (id)
    WHERE staged_id IS NOT NULL AND purged_at IS NULL;
