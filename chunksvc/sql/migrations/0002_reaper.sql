-- The reaper's bookkeeping: when an ended session's stored bytes were removed, so the reaper
-- scans each COMPLETED, ABORTED, EXPIRED or FAILED session once rather than on every run.

ALTER TABLE upload_sessions ADD COLUMN purged_at timestamptz;

-- Ended sessions whose bytes still have to go, in the order the reaper takes them.
CREATE INDEX upload_sessions_unpurged_idx ON upload_sessions (updated_at, id)
    WHERE purged_at IS NULL AND status IN ('COMPLETED', 'ABORTED', 'EXPIRED', 'FAILED');
