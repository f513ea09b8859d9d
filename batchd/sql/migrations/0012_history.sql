-- batchd's schema, version 12: months of history cost nothing to read.
--
-- Every totals-reading query (the dashboard's overview, /metrics, `batchd status`, `batchd report`) scanned
-- the whole history of batchd.jobs or batchd.costs, and nothing ever deleted a finished job. From here on:
--
-- * Each statement that finishes jobs (apply, fail, cancel, a budget's fail, a set-aside, a lost sync
--   sender) appends what it did, grouped, to batchd.tallies, in the same statement: exact under crashes and
--   retries, because the tally commits or rolls back with the jobs it counts, and a chunk applied twice
--   changes no job the second time, so it tallies nothing. Tallies are only ever inserted: no writer waits
--   for another on a counter row.
-- * The daemon's fold (rollups.py) moves tallies into batchd.rollups, per UTC hour, per UTC day, and for all
--   time, in one statement (the DELETE ... RETURNING and the upsert commit together, so a tally is counted
--   in exactly one of the two tables at every snapshot). Readers add rollups and the few tallies not yet
--   folded: exact, and bounded by the rollups' rows, never by the history.
-- * Budgets read each tenant's spend from the rollups too (one row per tenant per UTC day), so batchd.spend,
--   which held one row per tenant per applied chunk and was read a month at a time, goes.
-- * The pruner deletes finished jobs, old batches, and the ledger past their retention (pruner.py); the
--   rollups keep what they counted.

-- What statements that finish jobs add to the rollups: one row per group per statement. `path` is the
-- path the job took ('' when it never went: failed before a claim, canceled while queued), `model` the
-- billed model ('' for a job not billed). `jobs` counts jobs, `billed` ledger rows (batchd.costs), whose
-- tokens and USD the other columns sum; `unpriced` counts billed rows without a price.
CREATE TABLE batchd.tallies (
    at                      timestamptz NOT NULL DEFAULT now(),
    tenant_id               text NOT NULL,
    status                  text NOT NULL CHECK (status IN ('succeeded', 'failed', 'canceled')),
    path                    text NOT NULL DEFAULT '',
    job_type                text NOT NULL DEFAULT '',
    model                   text NOT NULL DEFAULT '',
    jobs                    bigint NOT NULL DEFAULT 0,
    billed                  bigint NOT NULL DEFAULT 0,
    input_tokens            bigint NOT NULL DEFAULT 0,
    output_tokens           bigint NOT NULL DEFAULT 0,
    cache_write_5m_tokens   bigint NOT NULL DEFAULT 0,
    cache_write_1h_tokens   bigint NOT NULL DEFAULT 0,
    cache_read_tokens       bigint NOT NULL DEFAULT 0,
    cost_usd                numeric NOT NULL DEFAULT 0,
    sync_cost_usd           numeric NOT NULL DEFAULT 0,
    unpriced                bigint NOT NULL DEFAULT 0
);

-- The tallies folded: per UTC hour ('hour'), per UTC day ('day'), per week from Monday, UTC ('week'), for
-- all time ('all', start '-infinity'), and per tenant and UTC day with the rest of the key folded
-- ('tenant_day': status, path, job_type and model ''), which budgets read. Hour rows go with the ledger's
-- retention; the rest are kept.
CREATE TABLE batchd.rollups (
    span                    text NOT NULL CHECK (span IN ('hour', 'day', 'week', 'all', 'tenant_day')),
    start                   timestamptz NOT NULL,
    tenant_id               text NOT NULL,
    status                  text NOT NULL,
    path                    text NOT NULL,
    job_type                text NOT NULL,
    model                   text NOT NULL,
    jobs                    bigint NOT NULL,
    billed                  bigint NOT NULL,
    input_tokens            bigint NOT NULL,
    output_tokens           bigint NOT NULL,
    cache_write_5m_tokens   bigint NOT NULL,
    cache_write_1h_tokens   bigint NOT NULL,
    cache_read_tokens       bigint NOT NULL,
    cost_usd                numeric NOT NULL,
    sync_cost_usd           numeric NOT NULL,
    unpriced                bigint NOT NULL,
    PRIMARY KEY (span, start, tenant_id, status, path, job_type, model)
);

-- The pruner reads finished jobs oldest first, per status (each has its own retention).
CREATE INDEX jobs_finished ON batchd.jobs (status, completed_at)
    WHERE status IN ('succeeded', 'failed', 'canceled');
-- Jobs per tenant and status were read on (tenant_id, status) over every job ever kept; the readings that
-- still count jobs count only those not finished (finished ones come from the rollups), so the index holds
-- only those: it stays as small as the work in flight.
DROP INDEX batchd.jobs_tenant_status;
CREATE INDEX jobs_live ON batchd.jobs (tenant_id, status)
    WHERE status IN ('queued', 'submitting', 'submitted', 'sending');
-- Budgets read one tenant's days of a month.
CREATE INDEX rollups_tenant ON batchd.rollups (tenant_id, span, start);
-- What budgets are checked against, now read from the rollups: each tenant's cost per UTC day, and what the
-- tallies not yet folded add. Budgets' windows are whole UTC days and months, so a day row is in a window
-- or out of it, whole: exact. A view of the old table's name and columns, so a query of it still reads.
DROP TABLE batchd.spend;
CREATE VIEW batchd.spend AS
SELECT tenant_id, start AS at, cost_usd FROM batchd.rollups WHERE span = 'tenant_day'
UNION ALL
SELECT tenant_id, at, cost_usd FROM batchd.tallies;
-- Old batches go when their jobs have gone.
CREATE INDEX batches_finished ON batchd.batches (created_at) WHERE status IN ('applied', 'abandoned');

-- A job's id is time-ordered (a UUID version 7) instead of random. Claimed and applied jobs are the newest:
-- with random ids each of them sat on a random page of the primary key (and of the ledger's), so the claim
-- and the apply read and dirtied pages at random across indexes as large as the history, 30% to 50% slower
-- on 10 million finished jobs with PostgreSQL's default shared_buffers (docs/benchmarks.md, Months of
-- history). With time-ordered ids the work in flight sits together at the end of those indexes.
CREATE FUNCTION batchd.time_ordered_uuid() RETURNS uuid LANGUAGE sql VOLATILE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp AS $$
    -- A UUID version 7 (RFC 9562): 48 bits of Unix time in milliseconds, then 74 random bits (with the
    -- version and variant bits set).
    SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                                          PLACING substring(int8send((extract(epoch FROM clock_timestamp())
                                                                      * 1000)::bigint) FROM 3)
                                          FROM 1 FOR 6),
                                  52, 1),
                          53, 1),
                  'hex')::uuid
$$;

CREATE OR REPLACE FUNCTION batchd.jobs_guard_insert() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    forged text;
BEGIN
    IF NEW.id IS NULL THEN
        NEW.id := batchd.time_ordered_uuid();
    ELSE
        forged := 'id';
    END IF;
    IF NEW.seq IS NULL THEN
        NEW.seq := nextval('batchd.jobs_seq_seq');
    ELSE
        forged := coalesce(forged, 'seq');
    END IF;
    forged := coalesce(forged, CASE
        WHEN NEW.status IS DISTINCT FROM 'queued' THEN 'status'
        WHEN NEW.attempts IS DISTINCT FROM 0 THEN 'attempts'
        WHEN NEW.batch_id IS NOT NULL THEN 'batch_id'
        WHEN NEW.params IS NOT NULL THEN 'params'
        WHEN NEW.result IS NOT NULL THEN 'result'
        WHEN NEW.error IS NOT NULL THEN 'error'
        WHEN NEW.usage IS NOT NULL THEN 'usage'
        WHEN NEW.created_at IS DISTINCT FROM now() THEN 'created_at'
        WHEN NEW.updated_at IS DISTINCT FROM now() THEN 'updated_at'
        WHEN NEW.submitted_at IS NOT NULL THEN 'submitted_at'
        WHEN NEW.completed_at IS NOT NULL THEN 'completed_at'
        WHEN NEW.path IS NOT NULL THEN 'path'
        WHEN NEW.path_reason IS NOT NULL THEN 'path_reason'
        WHEN NEW.sync_owner IS NOT NULL THEN 'sync_owner'
        WHEN NEW.sync_lease_until IS NOT NULL THEN 'sync_lease_until'
        WHEN NEW.not_before IS NOT NULL THEN 'not_before'
    END);
    IF forged IS NOT NULL AND NOT batchd.trusted_writer(current_user) THEN
        RAISE EXCEPTION 'a producer may not set batchd.jobs.% (role %)', forged, current_user
            USING ERRCODE = 'insufficient_privilege', COLUMN = forged, TABLE = 'jobs', SCHEMA = 'batchd',
                  DETAIL = 'batchd alone writes ' || forged || '. No row of this INSERT was added.',
                  HINT = 'A producer''s INSERT names only tenant_id, request, job_type, input, metadata, '
                         'idempotency_key, deadline and route; leave ' || forged || ' out.';
    END IF;
    RETURN NEW;
END
$$;

-- jobs_guard_insert runs as whoever inserts: producers too.
GRANT EXECUTE ON FUNCTION batchd.time_ordered_uuid() TO PUBLIC;

-- A cancel is counted by the trigger that writes its event. [0004]
CREATE OR REPLACE FUNCTION batchd.jobs_canceled() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO batchd.events (type, tenant_id, job_id, data)
    VALUES ('job.canceled', NEW.tenant_id, NEW.id,
            jsonb_build_object('status', 'canceled', 'metadata', NEW.metadata));
    INSERT INTO batchd.tallies (tenant_id, status, path, job_type, jobs)
    VALUES (NEW.tenant_id, 'canceled', coalesce(NEW.path, ''), coalesce(NEW.job_type, ''), 1);
    PERFORM pg_notify('batchd_events', '');
    RETURN NULL;
END
$$;

-- The history so far, tallied once, per hour: the daemon's fold moves it into the rollups. A succeeded job
-- and its ledger row are one tally (joined on the ledger's key); a ledger row without its job (removed by
-- hand) is billed without a job.
INSERT INTO batchd.tallies (at, tenant_id, status, path, job_type, model, jobs, billed, input_tokens,
                            output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens,
                            cost_usd, sync_cost_usd, unpriced)
SELECT date_trunc('hour', f.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', f.tenant_id, f.status, f.path,
       f.job_type, f.model, sum(f.jobs), sum(f.billed), sum(f.input_tokens), sum(f.output_tokens),
       sum(f.cache_write_5m_tokens), sum(f.cache_write_1h_tokens), sum(f.cache_read_tokens),
       sum(f.cost_usd), sum(f.sync_cost_usd), sum(f.unpriced)
  FROM (SELECT coalesce(j.completed_at, j.updated_at) AS at, j.tenant_id, j.status, coalesce(j.path, '') AS path,
               coalesce(j.job_type, '') AS job_type, coalesce(c.model, '') AS model, 1 AS jobs,
               (c.job_id IS NOT NULL)::integer AS billed, coalesce(c.input_tokens, 0) AS input_tokens,
               coalesce(c.output_tokens, 0) AS output_tokens,
               coalesce(c.cache_write_5m_tokens, 0) AS cache_write_5m_tokens,
               coalesce(c.cache_write_1h_tokens, 0) AS cache_write_1h_tokens,
               coalesce(c.cache_read_tokens, 0) AS cache_read_tokens, coalesce(c.cost_usd, 0) AS cost_usd,
               coalesce(c.sync_cost_usd, 0) AS sync_cost_usd,
               (c.job_id IS NOT NULL AND c.cost_usd IS NULL)::integer AS unpriced
          FROM batchd.jobs AS j
          LEFT JOIN batchd.costs AS c ON c.job_id = j.id AND c.attempt = j.attempts AND j.status = 'succeeded'
         WHERE j.status IN ('succeeded', 'failed', 'canceled')
        UNION ALL
        SELECT c.at, c.tenant_id, 'succeeded', c.via, coalesce(c.job_type, ''), c.model, 0, 1, c.input_tokens,
               c.output_tokens, c.cache_write_5m_tokens, c.cache_write_1h_tokens, c.cache_read_tokens,
               coalesce(c.cost_usd, 0), coalesce(c.sync_cost_usd, 0), (c.cost_usd IS NULL)::integer
          FROM batchd.costs AS c
         WHERE NOT EXISTS (SELECT 1 FROM batchd.jobs AS j
                            WHERE j.id = c.job_id AND j.attempts = c.attempt AND j.status = 'succeeded')
       ) AS f
 GROUP BY 1, 2, 3, 4, 5, 6;

-- What the rollups and the tallies not yet folded say, from the UTC hour of `since` on (null: all time), for
-- one tenant (null: every tenant): the rollup rows that cover it (whole days as day rows, the hours before
-- the first whole day as hour rows) and the tallies since that hour, unsummed. Every reader of totals
-- reads this, so its cost is the rollups' rows, whatever the history's size. A plain SQL function, inlined
-- into the query that calls it.
CREATE FUNCTION batchd.totals_since(since timestamptz, tenant text)
RETURNS TABLE (tenant_id text, status text, path text, job_type text, model text, jobs bigint, billed bigint,
               input_tokens bigint, output_tokens bigint, cache_write_5m_tokens bigint,
               cache_write_1h_tokens bigint, cache_read_tokens bigint, cost_usd numeric, sync_cost_usd numeric,
               unpriced bigint)
LANGUAGE sql STABLE AS $$
    -- Since the UTC hour of `since`: hour rows up to its first whole day, day rows up to its first whole week
    -- (Monday), week rows from there on (the current week's row holds the week so far). Each branch is one
    -- range of an index; a branch whose condition on `since` is false is skipped whole (a one-time filter),
    -- however the plan was made.
    WITH hours AS MATERIALIZED (
        SELECT h.hour, CASE WHEN h.day = h.hour THEN h.day ELSE h.day + interval '1 day' END AS whole_days
          FROM (SELECT date_trunc('hour', since AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
                       date_trunc('day', since AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS day) AS h
    ), bounds AS MATERIALIZED (
        SELECT hours.hour, hours.whole_days,
               CASE WHEN w.week = hours.whole_days THEN w.week ELSE w.week + interval '7 days' END AS whole_weeks
          FROM hours
         CROSS JOIN LATERAL (
            SELECT date_trunc('week', hours.whole_days AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS week
         ) AS w
    ), rows AS (
        SELECT r.* FROM batchd.rollups AS r
         WHERE since IS NULL AND r.span = 'all' AND r.start = '-infinity'
           AND (tenant IS NULL OR r.tenant_id = tenant)
        UNION ALL
        SELECT r.* FROM batchd.rollups AS r
         WHERE since IS NOT NULL AND r.span = 'week' AND r.start >= (SELECT whole_weeks FROM bounds)
           AND (tenant IS NULL OR r.tenant_id = tenant)
        UNION ALL
        SELECT r.* FROM batchd.rollups AS r
         WHERE since IS NOT NULL AND r.span = 'day' AND r.start >= (SELECT whole_days FROM bounds)
           AND r.start < (SELECT whole_weeks FROM bounds) AND (tenant IS NULL OR r.tenant_id = tenant)
        UNION ALL
        SELECT r.* FROM batchd.rollups AS r
         WHERE since IS NOT NULL AND r.span = 'hour' AND r.start >= (SELECT hour FROM bounds)
           AND r.start < (SELECT whole_days FROM bounds) AND (tenant IS NULL OR r.tenant_id = tenant)
    )
    SELECT r.tenant_id, r.status, r.path, r.job_type, r.model, r.jobs, r.billed, r.input_tokens, r.output_tokens,
           r.cache_write_5m_tokens, r.cache_write_1h_tokens, r.cache_read_tokens, r.cost_usd, r.sync_cost_usd,
           r.unpriced
      FROM rows AS r
    UNION ALL
    SELECT t.tenant_id, t.status, t.path, t.job_type, t.model, t.jobs, t.billed, t.input_tokens, t.output_tokens,
           t.cache_write_5m_tokens, t.cache_write_1h_tokens, t.cache_read_tokens, t.cost_usd, t.sync_cost_usd,
           t.unpriced
      FROM batchd.tallies AS t
     WHERE (tenant IS NULL OR t.tenant_id = tenant)
       AND (since IS NULL OR t.at >= (SELECT hour FROM bounds))
$$;
