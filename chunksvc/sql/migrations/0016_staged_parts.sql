-- Parts sent straight into the session's staging (issue "time to a verified object"): on S3, a
-- part's body goes up once, as an UploadPart of the session's one multipart upload, rather than as
-- an object of its own that is then read back and copied in (UploadPartCopy). That was three
-- passes of every byte through the store, about 16 s of radosgw CPU per GiB against 5 s for a
-- direct upload.
--
-- Every request for a part writes a piece number of its own, never one another request may have
-- written: a writer killed mid-request may still have its UploadPart land later, and it must not
-- replace accepted bytes. So each part owns a range of piece numbers (10,000 / total_parts of
-- them, services.staging), and each request takes the next one. This counts them per part, across
-- every request ever made for it; it only grows.
CREATE TABLE staged_part_attempts (
    session_id uuid NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    part_number integer NOT NULL CHECK (part_number >= 1),
    attempts integer NOT NULL CHECK (attempts >= 1),
    PRIMARY KEY (session_id, part_number)
);
