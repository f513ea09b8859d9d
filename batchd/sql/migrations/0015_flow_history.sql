-- batchd's schema, version 15: the queue and the batch turnaround over time, for the dashboard's charts.
--
-- The dashboard showed the queue's depth and oldest wait from its own last snapshots, and batch turnaround
-- as numbers of the last applied batches: nothing kept how they were an hour, a day or a month ago. From
-- here on:
--
-- * Queue depth and oldest wait per tenant, with the routing p90 in use (batchd.batch_turnaround), are
--   sampled by one daemon every `flow.sample_interval_s` (flow.py; batchd.flow_clock makes it one daemon per
--   interval, whichever gets there first) and folded at once into batchd.flow per UTC minute, hour and day:
--   samples, the queue summed (for its average) and its maximum, the oldest wait's maximum. The sample
--   reads the queued jobs (jobs_live), never the history, and writes three rows per tenant with queued jobs
--   and three for every tenant together (tenant_id '', a name no tenant can have).
-- * Each job a batch finishes (apply_results with a batch) adds its turnaround, created to finished, to a
--   log-scale histogram: one row of batchd.turnaround_tallies per tenant and bucket per applied chunk,
--   folded (rollups.py, with the tallies) into batchd.turnarounds per UTC minute, hour and day. Bucket b
--   holds turnarounds from 2^(b/4) seconds up to 2^((b+1)/4) (bucket 0 everything under 2^(1/4) s, bucket
--   79 everything from 2^(79/4) s, 13 days, on): a percentile read from it is within 9% of the true one.
-- * GET /v1/series reads the window's rows of both (a range of their primary keys): 60 minutes, 24 hours
--   or 30 days per tenant, whatever the history. Minute rows go after `retention.flow_minutes_s`, hour rows
--   with the hourly rollups (`retention.ledger_s`); day rows are kept.
--
-- Privileges: the daemon role writes them, by deploy/sql/roles.sql's default privileges; a producer has
-- none.

CREATE TABLE batchd.flow (
    span                text NOT NULL CHECK (span IN ('minute', 'hour', 'day')),
    start               timestamptz NOT NULL,
    tenant_id           text NOT NULL,
    samples             integer NOT NULL,
    queued_sum          bigint NOT NULL,
    queued_max          bigint NOT NULL,
    oldest_max_s        double precision NOT NULL,
    routing_p90_sum_s   double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (span, start, tenant_id)
);

-- When the queue was last sampled: one row, the sampler's gate.
CREATE TABLE batchd.flow_clock (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    sampled_at  timestamptz NOT NULL
);
INSERT INTO batchd.flow_clock (one, sampled_at) VALUES (true, '-infinity');

CREATE TABLE batchd.turnaround_tallies (
    at          timestamptz NOT NULL DEFAULT now(),
    tenant_id   text NOT NULL,
    bucket      smallint NOT NULL CHECK (bucket BETWEEN 0 AND 79),
    jobs        bigint NOT NULL
);

CREATE TABLE batchd.turnarounds (
    span        text NOT NULL CHECK (span IN ('minute', 'hour', 'day')),
    start       timestamptz NOT NULL,
    tenant_id   text NOT NULL,
    bucket      smallint NOT NULL CHECK (bucket BETWEEN 0 AND 79),
    jobs        bigint NOT NULL,
    PRIMARY KEY (span, start, tenant_id, bucket)
);

-- A turnaround's bucket (above); flow.py computes the percentiles from the buckets' bounds.
CREATE FUNCTION batchd.turnaround_bucket(seconds double precision) RETURNS smallint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- 4 / ln 2: quarter powers of two.
    SELECT least(79, greatest(0, floor(ln(greatest(seconds, 1)) * 5.770780163555854)))::smallint
$$;
