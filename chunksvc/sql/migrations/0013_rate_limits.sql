-- Request-rate limits (contract v1.2, "Sharing one service"): CHUNKSVC_RATE_LIMIT requests a
-- second per client with bursts of CHUNKSVC_RATE_BURST, held across every worker and host.

-- An operator's per-client overrides, beside the quota overrides (NULL: the configured default).
ALTER TABLE client_limits
    ADD COLUMN rate_limit double precision CHECK (rate_limit >= 0),
    ADD COLUMN rate_burst integer CHECK (rate_burst >= 0);

-- One token bucket per client, shared by every process: `tokens` as of `refilled_at` (the
-- database's clock, the one clock every host shares), and how many tokens the last statement took
-- from it (take_rate_token returns that: 0 refused the request).
-- UNLOGGED: requests update their client's row, and a logged table would flush WAL to disk for
-- every one of them. After a crash PostgreSQL empties the table, and every bucket starts full
-- again: at most one burst more for each client, once.
CREATE UNLOGGED TABLE client_rate_buckets (
    client_id   bigint PRIMARY KEY REFERENCES clients (id) ON DELETE CASCADE,
    tokens      double precision NOT NULL,
    refilled_at timestamptz NOT NULL,
    taken       integer NOT NULL
);

-- A bucket's level at the statement's time: `tokens` as of `refilled_at`, plus `rate` a second
-- since, at most `burst` (a statement that waited for the row's lock may start before
-- `refilled_at`: no time has passed then). STABLE, for now(); a plain SQL function, so the
-- planner inlines it into take_rate_token.
CREATE FUNCTION chunksvc_refilled(tokens double precision, refilled_at timestamptz,
                                  rate double precision, burst double precision)
RETURNS double precision
LANGUAGE sql STABLE
AS $$
    SELECT least(burst, tokens + rate * greatest(0, extract(epoch FROM now() - refilled_at))::double precision)
$$;
