-- Leases instead of session-level advisory locks, so that chunksvc is correct behind a PgBouncer
-- in transaction pooling mode. There, each transaction of a client may run on a different server
-- connection, and a server connection serves other clients between transactions: a lock held by
-- a "session" would be held by whichever server connection ran the statement that took it, given
-- back (or not) from another, and shared with every client that connection serves next. A lease
-- is a row with an owner and an expiry: it means the same on any connection, and one whose
-- holder died runs out instead of vanishing with a connection.

-- Who assembles a COMPLETING session, and until when (the database's clock). Taken under the
-- session's row lock, renewed while the assembly runs, cleared by the outcome (or given back).
-- NOT VALID: every existing row satisfies it (both NULL), so the table is not scanned under lock.
ALTER TABLE upload_sessions
    ADD COLUMN completion_owner uuid,
    ADD COLUMN completion_lease_until timestamptz,
    ADD CONSTRAINT completion_lease_whole
        CHECK ((completion_owner IS NULL) = (completion_lease_until IS NULL)) NOT VALID;

-- The reaper's whole-phase claims (the orphan and unfinished-write sweeps) and the periodic run's:
-- one row per name while someone holds it (or held it and died: until has passed).
CREATE TABLE reaper_leases (
    name  text PRIMARY KEY,
    owner uuid NOT NULL,
    until timestamptz NOT NULL
);
