-- How far an assembly has got: bytes of the object written so far, reported as the session
-- object's `assembled_bytes` while it is COMPLETING (NULL before and after).
ALTER TABLE upload_sessions ADD COLUMN assembled_bytes bigint;
