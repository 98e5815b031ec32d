-- What /tus/ reads of a session beyond its own row, defined once: tus_state reads it, and
-- lock_tus_state reads it under the session's row lock (the two statements differ only in that).
-- The session's own columns stay `s.*` in those statements, so a column a later migration adds
-- to upload_sessions is read without redefining this.
--
-- The session's tus row (none for a session the native API created), its part in the making,
-- and how far its parts reach without a gap (the parts numbered 1..n all present: a row
-- numbered as its rank; once one is missing, every later row is numbered above its rank).
-- Upload-Offset is `contiguous_bytes` + `held_bytes`. A plain SQL function of one SELECT: the
-- planner inlines it into the statement that calls it.
CREATE FUNCTION chunksvc_tus_state(p_session_id uuid)
    RETURNS TABLE (
        tus_created      boolean,
        tus_metadata     text,
        concat           text,
        final_id         uuid,
        contiguous_parts integer,
        contiguous_bytes bigint,
        held_bytes       bigint,
        held_keys        text[],
        held_sizes       bigint[]
    )
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
