-- batchd's schema, version 13: the daemons running on this database, each as it says of itself.
--
-- An operator could not tell from the database which daemons were alive, on which host, nor that one of
-- them had its API key refused and was sending nothing. From here on each daemon keeps one row here:
--
-- * Its `instance_id` is the id of one start of `batchd run` (context.new_instance_id), the `owner` of the
--   batches it leases and the `sync_owner` of the jobs it sends: `batchd status` counts its leases by it.
-- * It is upserted at start and again with every renewal of the daemon's leases (its heartbeat, every
--   `heartbeat_s`: a third of `daemon.lease_s`), one statement, which also carries the API's state as the
--   daemon last found it: `unchecked` (starting), `ok`, `refused` (the key: 401 or 403) or `unreachable`
--   (the last check got no answer), when it was checked, and why.
-- * A daemon that stops deletes its row. One that died leaves it: `batchd status` shows it silent, and the
--   pruner deletes rows without a heartbeat for a day, so the table holds the daemons alive, not a history.
--
-- Privileges: the daemon role writes it, by deploy/sql/roles.sql's default privileges (DML on every table
-- the owner creates) until roles.sql runs again, and by roles.sql's grants after; a producer has none.

CREATE TABLE batchd.instances (
    instance_id     text PRIMARY KEY CHECK (length(instance_id) BETWEEN 1 AND 200),
    host            text NOT NULL,
    pid             integer NOT NULL,
    version         text NOT NULL,
    started_at      timestamptz NOT NULL,
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_s     double precision NOT NULL CHECK (heartbeat_s > 0),
    api_url         text NOT NULL,
    api_state       text NOT NULL CHECK (api_state IN ('unchecked', 'ok', 'refused', 'unreachable')),
    api_checked_at  timestamptz,
    api_reason      text
);

-- Jobs per tenant and status, for all time: those in flight counted on jobs_live (which holds only them),
-- finished ones from the rollups and the tallies (batchd.totals_since): `batchd status`, `batchd tenant
-- list` and /metrics count them so, at a cost that follows the work in flight, not the history. Inlined.
CREATE FUNCTION batchd.job_counts()
RETURNS TABLE (tenant_id text, status text, jobs bigint)
LANGUAGE sql STABLE AS $$
    SELECT counted.tenant_id, counted.status, sum(counted.jobs)::bigint
      FROM (SELECT j.tenant_id, j.status, count(*) AS jobs
              FROM batchd.jobs AS j
             WHERE j.status IN ('queued', 'submitting', 'submitted', 'sending')
             GROUP BY j.tenant_id, j.status
            UNION ALL
            SELECT t.tenant_id, t.status, t.jobs FROM batchd.totals_since(NULL, NULL) AS t) AS counted
     GROUP BY counted.tenant_id, counted.status
$$;
