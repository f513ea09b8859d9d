-- Every query batchd runs, each under a name that store.py calls it by. Parameters are $1, $2, ...

-- name: create_migrations_table
CREATE SCHEMA IF NOT EXISTS batchd;
CREATE TABLE IF NOT EXISTS batchd.migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: lock_migrations
-- Two `batchd migrate` at once: the second waits, then finds nothing left to do.
SELECT pg_advisory_xact_lock(hashtext('batchd.migrate'));

-- name: migrations_table_exists
SELECT to_regclass('batchd.migrations') IS NOT NULL;

-- name: applied_migrations
SELECT version, name, checksum FROM batchd.migrations ORDER BY version;

-- name: record_migration
INSERT INTO batchd.migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: queue_head
-- What the flusher decides on: the head of the queue, up to the most one batch may take. Bounded, so the
-- cost stays flat however deep the queue is. Only jobs that may go in a batch now count: the routing rule,
-- batchd.batch_bound, with the batch p90 (window $2, min_samples $3, prior $4) plus the margin $5.
SELECT count(*) AS jobs,
       coalesce(sum(size), 0) AS bytes,
       min(created_at) AS oldest,
       max(seq) AS last_seq,
       now() AS now
  FROM (SELECT seq, created_at, pg_column_size(coalesce(request, input)) AS size
          FROM batchd.jobs
         WHERE status = 'queued'
           AND tenant_id NOT IN (SELECT tenant_id FROM batchd.held_tenants)  -- over budget: wait (budgets.py)
           AND batchd.batch_bound(route, path, deadline,
                                  (SELECT p90_s FROM batchd.batch_turnaround($2, $3, $4)) + $5)
         ORDER BY seq
         LIMIT $1) AS head;

-- name: earliest_deadline
-- Clamped to a century either side of now: a producer may write any timestamptz ('infinity', '-infinity',
-- 4713 BC, year 294276), which Python's datetime cannot hold (asyncpg returns the infinities as naive
-- datetimes, and the rest overflow): unclamped, one such job stopped the flusher, and every restart.
SELECT least(greatest(min(deadline), now() - interval '100 years'), now() + interval '100 years')
  FROM batchd.jobs WHERE status = 'queued' AND deadline IS NOT NULL
   AND tenant_id NOT IN (SELECT tenant_id FROM batchd.held_tenants)  -- over budget: wait (budgets.py)
   -- A job the sync path will take is not the flusher's to hurry (routing: $1..$4 as queue_head's $2..$5).
   AND batchd.batch_bound(route, path, deadline, (SELECT p90_s FROM batchd.batch_turnaround($1, $2, $3)) + $4)
HAVING min(deadline) IS NOT NULL;

-- name: db_now
SELECT now();

-- name: set_wakeup
UPDATE batchd.wakeup SET armed = $1, wake_seq = $2 WHERE armed IS DISTINCT FROM $1 OR wake_seq IS DISTINCT FROM $2;

-- name: lock_flush
-- One flush at a time across every daemon on the database: the in-flight budget is read and spent whole.
SELECT pg_advisory_xact_lock(hashtext('batchd.flush'));

-- name: claim_settings
-- For the rest of a claim's transaction (store.claim): the claims' plans must not hang on statistics, often
-- taken when the queue looked nothing like it does at a flush.
-- * jit off: planned for a batch's worth of rows, the fair claim's cost passed jit_above_cost, and compiling
--   it took 2.2 s of 6.7 s for 100,000 jobs.
-- * random_page_cost 1.1 and no incremental sort: each tenant's queue is read from jobs_queued_tenant, in seq
--   order, as far as needed. The planner, seeing tenants interleaved through the table, costed that walk as
--   random reads (it reads the queue's newest pages, in cache, in the order they were written), and read the
--   tenant's whole queue from jobs_live and sorted it, or walked the whole queue in seq order (jobs_queued) to
--   find a small tenant's jobs.
-- * work_mem: the fair claim sorts up to a batch's worth of turns (about 16 MB for 100,000), which spilled to
--   disk at the default 4 MB. Claims run one at a time (lock_flush).
SET LOCAL jit = off;
SET LOCAL random_page_cost = 1.1;
SET LOCAL enable_incremental_sort = off;
SET LOCAL work_mem = '64MB';

-- name: in_flight_requests
SELECT coalesce(sum(request_count), 0) FROM batchd.batches WHERE status IN ('pending', 'in_progress', 'ended');

-- name: claim_urgent
-- Jobs whose deadline is near go first, whatever their place in the queue. Never a job the sync path should
-- take: the routing rule (batchd.batch_bound) is checked on each row as it is locked, with the batch p90
-- (window $3, min_samples $4, prior $5) plus the margin $6; path_reason says why each goes in a batch.
WITH t AS (SELECT * FROM batchd.batch_turnaround($3, $4, $5))
SELECT id, tenant_id, request::text AS request, job_type, input::text AS input, attempts,
       batchd.request_problem(request) AS problem,
       batchd.route_reason(route, deadline, 0, (SELECT p90_s FROM t), (SELECT samples FROM t),
                           (SELECT measured FROM t), $6, $4) AS path_reason
  FROM batchd.jobs
 WHERE status = 'queued' AND deadline IS NOT NULL AND deadline <= $2
   AND tenant_id NOT IN (SELECT tenant_id FROM batchd.held_tenants)  -- over budget: wait (budgets.py)
   AND batchd.batch_bound(route, path, deadline, (SELECT p90_s FROM t) + $6)
 ORDER BY deadline
 LIMIT $1
   FOR UPDATE SKIP LOCKED;

-- name: claim_all
-- Every queued job that may go in a batch now, when they all fit in this one (the common case, and a burst's):
-- fairness has nothing to decide, so they are taken in one pass, in seq order, as they are locked. One job
-- more than $1 (the room left in the batch) is read: when it is there they do not all fit, and the caller
-- claims fairly instead (claim_fair; what this locked stays queued). Nothing is taken while any tenant has a
-- max_in_flight, whose room is claim_fair's to weigh. $2: jobs already claimed (claim_urgent); the routing
-- rule as in claim_urgent, with the batch p90 (window $3, min_samples $4, prior $5) plus the margin $6. A
-- batch-routed job's reason does not depend on its deadline: it is asked once.
WITH routing AS MATERIALIZED (SELECT * FROM batchd.batch_turnaround($3, $4, $5)),
batch_reason AS MATERIALIZED (
    SELECT batchd.route_reason('batch', NULL, 0, p90_s, samples, measured, $6, $4) AS reason FROM routing
)
SELECT j.id, j.tenant_id, j.request::text AS request, j.job_type, j.input::text AS input, j.attempts,
       batchd.request_problem(j.request) AS problem,
       CASE WHEN j.route = 'batch' THEN (SELECT reason FROM batch_reason)
            ELSE batchd.route_reason(j.route, j.deadline, 0, (SELECT p90_s FROM routing),
                                     (SELECT samples FROM routing), (SELECT measured FROM routing), $6, $4)
       END AS path_reason
  FROM batchd.jobs AS j
 WHERE j.status = 'queued' AND j.id <> ALL($2::uuid[])
   AND j.tenant_id NOT IN (SELECT tenant_id FROM batchd.held_tenants)  -- over budget: wait (budgets.py)
   AND batchd.batch_bound(j.route, j.path, j.deadline, (SELECT p90_s FROM routing) + $6)
   AND NOT EXISTS (SELECT 1 FROM batchd.configured_limits WHERE max_in_flight IS NOT NULL)
   AND NOT EXISTS (SELECT 1 FROM batchd.tenants WHERE max_in_flight IS NOT NULL)
 ORDER BY j.seq
 LIMIT $1 + 1
   FOR UPDATE OF j SKIP LOCKED;

-- name: claim_fair
-- One batch's worth of queued jobs shared fairly between tenants (fairness.py): each tenant's queue head, in
-- turns of weighted round robin — the n-th job of a tenant of weight w has its turn at (n - 1/2) / w, ties
-- to the older job — so a tenant with 10 jobs is not put behind another's 200,000. A tenant takes no more
-- than its room under max_in_flight, and none of a held tenant's (over budget: budgets.py). Within a tenant,
-- jobs that share a cacheable prefix (one job type; or raw requests whose tools or system prompt carry
-- cache_control, with the same model, tools and system) are taken together, from the first of them on, so
-- that the provider's prompt cache serves the rest: the window looked at per tenant ($3) is longer than a
-- batch, but its oldest job's group always comes first, so no job waits more than a batch longer for it.
-- Never a job the sync path should take: the routing rule (batchd.batch_bound) as in claim_urgent, with the
-- batch p90 (window $4, min_samples $5, prior $6) plus the margin $7, checked as each tenant's queue is read
-- and again on each row as it is locked; path_reason says why each goes in a batch. Each job comes with its
-- seq and its turn (float8: equal turns are equal, as numeric's rounding did not always make them), or with
-- none when its tenant's jobs were locked in one scan: then its turn is (n - 1/2) / weight for the n-th of
-- them in seq order (store.claim puts them all in turn order).
-- $1: how many, $2: jobs already claimed (claim_urgent), $3: the window per tenant.
--
-- The pick reads little more of each queue than it takes from it:
-- 1. Heads. Each tenant's first jobs in seq order: its weight's part of $1 were every tenant to have enough,
--    and one more; and where the first of them with a cacheable prefix is. Up to and including that job, a
--    tenant's turn order is its seq order (the jobs before it are each a group of their own; it heads its
--    group, whose later jobs may then come before the tenant's others). Reading more of any queue can only
--    lower the last turn picked, so a tenant then gets no more than it got from the heads, or one more at a
--    tie. So the pick on the heads stands for a tenant that did not get all its head read (or gave all it may:
--    its window, or $1) and got none from its first such job on: its picks and the one more are in what was
--    read, in their places.
-- 2. More. A tenant whose head was too short, with no such job in it, reads on in seq order as far as it may
--    give, and the pick is made again.
-- 3. Windows. A tenant whose pick reaches a job with a cacheable prefix is read whole, its jobs grouped.
-- Its picked jobs are then locked: those of a tenant whose pick is its first jobs in seq order by one scan of
-- its queue, any others by primary key, one probe each.
WITH RECURSIVE routing AS MATERIALIZED (SELECT * FROM batchd.batch_turnaround($4, $5, $6)),
batch_reason AS MATERIALIZED (
    -- A batch-routed job's reason does not depend on its deadline: asked once.
    SELECT batchd.route_reason('batch', NULL, 0, p90_s, samples, measured, $7, $5) AS reason FROM routing
),
queued_tenants (tenant_id) AS (
    -- A skip scan of jobs_queued_tenant: one probe per tenant with queued jobs.
    (SELECT tenant_id FROM batchd.jobs WHERE status = 'queued' ORDER BY tenant_id LIMIT 1)
    UNION ALL
    SELECT (SELECT j.tenant_id FROM batchd.jobs AS j
             WHERE j.status = 'queued' AND j.tenant_id > q.tenant_id
             ORDER BY j.tenant_id LIMIT 1)
      FROM queued_tenants AS q
     WHERE q.tenant_id IS NOT NULL
), windows AS (
    -- How far into its queue each tenant is looked at: $3, or its room under max_in_flight if less.
    SELECT q.tenant_id, l.weight,
           CASE WHEN l.max_in_flight IS NULL THEN $3::bigint
                ELSE least($3::bigint,
                           greatest(0, l.max_in_flight
                                       - (SELECT count(*) FROM batchd.jobs AS f
                                           WHERE f.tenant_id = q.tenant_id
                                             AND f.status IN ('submitting', 'submitted'))
                                       - (SELECT count(*) FROM batchd.jobs AS u
                                           WHERE u.id = ANY($2::uuid[]) AND u.tenant_id = q.tenant_id)))
           END AS size
      FROM queued_tenants AS q
     CROSS JOIN LATERAL batchd.tenant_limits(q.tenant_id) AS l
     WHERE q.tenant_id IS NOT NULL
       AND q.tenant_id NOT IN (SELECT tenant_id FROM batchd.held_tenants)
), shares AS (
    SELECT tenant_id, weight, size, least(size, $1::bigint) AS most,
           least(size, $1::bigint, ceil($1::numeric * weight / sum(weight) OVER ())::bigint + 1) AS head_size
      FROM windows
     WHERE size > 0
), heads AS MATERIALIZED (
    SELECT s.tenant_id, s.weight, h.id, h.seq, h.n, (h.n - 0.5::float8) / s.weight AS turn, h.prefixed
      FROM shares AS s
     CROSS JOIN LATERAL (
        SELECT x.id, x.seq, x.prefixed, row_number() OVER (ORDER BY x.tenant_id, x.seq) AS n
          FROM (SELECT j.tenant_id, j.id, j.seq,
                       j.job_type IS NOT NULL
                       OR concat((j.request -> 'tools')::text, (j.request -> 'system')::text)
                          LIKE '%"cache_control"%' AS prefixed
                  FROM batchd.jobs AS j
                 -- A tenant's queue as a range of jobs_queued_tenant, which no other index serves: given
                 -- `tenant_id =`, the planner may walk the whole queue in seq order (jobs_queued) to find a
                 -- small tenant's few jobs behind a big one's.
                 WHERE (j.tenant_id, j.seq) >= (s.tenant_id, 0) AND j.tenant_id <= s.tenant_id
                   AND j.status = 'queued' AND j.id <> ALL($2::uuid[])
                   AND batchd.batch_bound(j.route, j.path, j.deadline, (SELECT p90_s FROM routing) + $7)
                 ORDER BY j.tenant_id, j.seq
                 LIMIT s.head_size) AS x
     ) AS h
), first_pick AS (
    -- The heads' first $1 turns; all of them when they are no more (no sort).
    SELECT tenant_id FROM heads WHERE (SELECT count(*) FROM heads) <= $1
    UNION ALL
    (SELECT tenant_id FROM heads WHERE (SELECT count(*) FROM heads) > $1 ORDER BY turn, seq LIMIT $1)
), first_verdicts AS MATERIALIZED (
    SELECT s.tenant_id, s.weight, s.size, s.most, r.read, r.last_seq, r.first_prefixed,
           -- Settled: its picks, and the one more a tie may give it, are read, in their places.
           (r.first_prefixed IS NULL OR coalesce(p.picked, 0) < r.first_prefixed)
           AND (r.read < s.head_size OR s.head_size = s.most OR coalesce(p.picked, 0) < r.read) AS settled
      FROM shares AS s
      JOIN (SELECT tenant_id, count(*) AS read, max(seq) AS last_seq,
                   min(n) FILTER (WHERE prefixed) AS first_prefixed
              FROM heads GROUP BY tenant_id) AS r USING (tenant_id)
      LEFT JOIN (SELECT tenant_id, count(*) AS picked FROM first_pick GROUP BY tenant_id) AS p USING (tenant_id)
), more AS MATERIALIZED (
    SELECT v.tenant_id, v.weight, m.id, m.seq, m.n, (m.n - 0.5::float8) / v.weight AS turn, m.prefixed
      FROM first_verdicts AS v
     CROSS JOIN LATERAL (
        SELECT x.id, x.seq, x.prefixed, v.read + row_number() OVER (ORDER BY x.tenant_id, x.seq) AS n
          FROM (SELECT j.tenant_id, j.id, j.seq,
                       j.job_type IS NOT NULL
                       OR concat((j.request -> 'tools')::text, (j.request -> 'system')::text)
                          LIKE '%"cache_control"%' AS prefixed
                  FROM batchd.jobs AS j
                 WHERE (j.tenant_id, j.seq) > (v.tenant_id, v.last_seq) AND j.tenant_id <= v.tenant_id
                   AND j.status = 'queued' AND j.id <> ALL($2::uuid[])
                   AND batchd.batch_bound(j.route, j.path, j.deadline, (SELECT p90_s FROM routing) + $7)
                 ORDER BY j.tenant_id, j.seq
                 LIMIT v.most - v.read) AS x
     ) AS m
     WHERE NOT v.settled AND v.first_prefixed IS NULL
), second_pick AS (
    -- Made again only if some tenant read more.
    SELECT tenant_id
      FROM (SELECT tenant_id, turn, seq FROM heads UNION ALL SELECT tenant_id, turn, seq FROM more) AS c
     WHERE EXISTS (SELECT 1 FROM more)
     ORDER BY turn, seq
     LIMIT $1
), verdicts AS MATERIALIZED (
    -- A tenant that read more has read as far as it may give: settled unless it got its first job with a
    -- cacheable prefix or one after it.
    SELECT v.tenant_id, v.weight, v.size,
           v.settled OR (v.first_prefixed IS NULL
                         AND (m.first_prefixed IS NULL
                              OR coalesce(p.picked, 0) < m.first_prefixed)) AS settled,
           coalesce(v.first_prefixed, m.first_prefixed) AS first_prefixed
      FROM first_verdicts AS v
      LEFT JOIN (SELECT tenant_id, min(n) FILTER (WHERE prefixed) AS first_prefixed FROM more GROUP BY tenant_id)
           AS m USING (tenant_id)
      LEFT JOIN (SELECT tenant_id, count(*) AS picked FROM second_pick GROUP BY tenant_id) AS p USING (tenant_id)
), grouped AS (
    SELECT v.tenant_id, v.weight, g.id, g.seq, g.r,
           row_number() OVER (PARTITION BY v.tenant_id ORDER BY g.group_seq, g.seq) AS n
      FROM verdicts AS v
     CROSS JOIN LATERAL (
        SELECT x.id, x.seq, row_number() OVER (ORDER BY x.tenant_id, x.seq) AS r,
               CASE WHEN x.prefix IS NULL THEN x.seq
                    ELSE min(x.seq) OVER (PARTITION BY x.prefix) END AS group_seq
          FROM (SELECT j.tenant_id, j.id, j.seq,
                       CASE WHEN j.job_type IS NOT NULL THEN 'type:' || j.job_type
                            -- Only the system prompt and tools are looked at (a whole request's text costs 4x
                            -- more).
                            WHEN concat((j.request -> 'tools')::text, (j.request -> 'system')::text)
                                 LIKE '%"cache_control"%'
                            THEN md5(concat_ws('|', j.request ->> 'model', (j.request -> 'tools')::text,
                                               (j.request -> 'system')::text))
                       END AS prefix
                  FROM batchd.jobs AS j
                 WHERE (j.tenant_id, j.seq) >= (v.tenant_id, 0) AND j.tenant_id <= v.tenant_id
                   AND j.status = 'queued' AND j.id <> ALL($2::uuid[])
                   AND batchd.batch_bound(j.route, j.path, j.deadline, (SELECT p90_s FROM routing) + $7)
                 ORDER BY j.tenant_id, j.seq
                 LIMIT v.size) AS x
     ) AS g
     WHERE NOT v.settled
), candidates AS MATERIALIZED (
    -- Each settled tenant's jobs whose place in its turn order is known (r: its place in seq order, the same),
    -- and the others' grouped.
    SELECT c.tenant_id, c.weight, c.id, c.seq, c.n AS r, c.n, c.turn
      FROM (SELECT tenant_id, weight, id, seq, n, turn FROM heads
            UNION ALL
            SELECT tenant_id, weight, id, seq, n, turn FROM more) AS c
      JOIN verdicts AS v USING (tenant_id)
     WHERE v.settled AND c.n <= coalesce(v.first_prefixed, c.n)
    UNION ALL
    SELECT tenant_id, weight, id, seq, r, n, (n - 0.5::float8) / weight FROM grouped
), picked AS MATERIALIZED (
    SELECT tenant_id, weight, id, seq, r, n, turn FROM candidates WHERE (SELECT count(*) FROM candidates) <= $1
    UNION ALL
    (SELECT tenant_id, weight, id, seq, r, n, turn FROM candidates WHERE (SELECT count(*) FROM candidates) > $1
      ORDER BY turn, seq LIMIT $1)
), spans AS MATERIALIZED (
    -- Tenants whose picked jobs are their first in seq order, and in turn order too (a tenant's pick is its
    -- first in turn order: each at its place in seq order), up to the last of them.
    SELECT tenant_id, max(weight) AS weight, max(seq) AS last_seq, count(*) AS picked
      FROM picked GROUP BY tenant_id HAVING bool_and(n = r)
)
SELECT * FROM (
    SELECT j.id, j.tenant_id, j.request::text AS request, j.job_type, j.input::text AS input, j.attempts,
           batchd.request_problem(j.request) AS problem,
           CASE WHEN j.route = 'batch' THEN (SELECT reason FROM batch_reason)
                ELSE batchd.route_reason(j.route, j.deadline, 0, (SELECT p90_s FROM routing),
                                         (SELECT samples FROM routing), (SELECT measured FROM routing), $7, $5)
           END AS path_reason,
           NULL::float8 AS turn, j.seq, s.weight
      FROM spans AS s
     CROSS JOIN LATERAL (
        SELECT * FROM batchd.jobs AS k
         WHERE (k.tenant_id, k.seq) BETWEEN (s.tenant_id, 0) AND (s.tenant_id, s.last_seq)
           AND k.status = 'queued' AND k.id <> ALL($2::uuid[])
           AND batchd.batch_bound(k.route, k.path, k.deadline, (SELECT p90_s FROM routing) + $7)
         ORDER BY k.tenant_id, k.seq
         LIMIT s.picked
           FOR UPDATE SKIP LOCKED
     ) AS j
) AS scanned
UNION ALL
SELECT * FROM (
    SELECT j.id, j.tenant_id, j.request::text AS request, j.job_type, j.input::text AS input, j.attempts,
           batchd.request_problem(j.request) AS problem,
           CASE WHEN j.route = 'batch' THEN (SELECT reason FROM batch_reason)
                ELSE batchd.route_reason(j.route, j.deadline, 0, (SELECT p90_s FROM routing),
                                         (SELECT samples FROM routing), (SELECT measured FROM routing), $7, $5)
           END AS path_reason,
           p.turn, p.seq, p.weight
      FROM picked AS p
     -- By primary key, one probe per picked job, whatever the statistics say. Joined plainly, a planner whose
     -- statistics say almost nothing is queued (taken before a burst) rescanned the whole queue for each job:
     -- 19 s for 10,000 (docs/benchmarks.md). OFFSET 0 keeps the status test out of the lookup; the lock
     -- applies inside it, and the status is tested on the row as locked.
     CROSS JOIN LATERAL (SELECT * FROM batchd.jobs AS k WHERE k.id = p.id OFFSET 0) AS j
     WHERE p.tenant_id NOT IN (SELECT tenant_id FROM spans)
       AND j.status = 'queued'
       AND batchd.batch_bound(j.route, j.path, j.deadline, (SELECT p90_s FROM routing) + $7)
       FOR UPDATE OF j SKIP LOCKED
) AS probed;

-- name: fail_jobs
-- Jobs that can never be sent: failed at once, with the reason, and an event each.
WITH failed AS (
    UPDATE batchd.jobs AS j
       SET status = 'failed', completed_at = now(),
           error = jsonb_build_object('type', 'invalid_request', 'message', f.message)
      FROM unnest($1::uuid[], $2::text[]) AS f (id, message)
     WHERE j.id = f.id
    RETURNING j.id, j.tenant_id, j.metadata, j.error, j.attempts, j.path, j.job_type
), tallied AS (
    INSERT INTO batchd.tallies (tenant_id, status, path, job_type, jobs)
    SELECT tenant_id, 'failed', coalesce(path, ''), coalesce(job_type, ''), count(*) FROM failed GROUP BY 1, 2, 3, 4
)
INSERT INTO batchd.events (type, tenant_id, job_id, data)
SELECT 'job.failed', tenant_id, id,
       jsonb_build_object('status', 'failed', 'error', error, 'metadata', metadata, 'attempts', attempts)
  FROM failed;

-- name: insert_batch
INSERT INTO batchd.batches (tag, request_count, bytes, owner, lease_until)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
RETURNING id;

-- name: assign_raw_jobs
-- The path is recorded with the claim: each job's reason ($3) as the claim judged it.
UPDATE batchd.jobs AS j
   SET status = 'submitting', batch_id = $1, params = NULL, path = 'batch', path_reason = r.reason
  FROM unnest($2::uuid[], $3::text[]) AS r (id, reason)
 WHERE j.id = r.id;

-- name: assign_rendered_jobs
UPDATE batchd.jobs AS j
   SET status = 'submitting', batch_id = $1, params = r.params::jsonb, path = 'batch', path_reason = r.reason
  FROM unnest($2::uuid[], $3::text[], $4::text[]) AS r (id, params, reason)
 WHERE j.id = r.id;

-- name: batch_payload
-- What to send again when a batch must be rebuilt after a restart: the params exactly as first claimed.
SELECT id, coalesce(params, request)::text AS params
  FROM batchd.jobs
 WHERE batch_id = $1 AND status = 'submitting'
 ORDER BY seq;

-- name: take_batches
-- This process's share of the open batches: those it holds, and those whose owner's lease ran out.
UPDATE batchd.batches
   SET owner = $1, lease_until = now() + make_interval(secs => $2)
 WHERE status IN ('pending', 'in_progress', 'ended')
   AND (owner = $1 OR owner IS NULL OR lease_until < now())
RETURNING id, status;

-- name: release_batches
UPDATE batchd.batches SET lease_until = now() WHERE owner = $1 AND status IN ('pending', 'in_progress', 'ended');

-- name: get_batch
-- With how long until its next step, and since its last create was sent, by the database's clock (the one
-- that set next_attempt_at and create_attempted_at).
SELECT *, greatest(0, extract(epoch FROM next_attempt_at - now()))::float8 AS wait_s,
       extract(epoch FROM now() - create_attempted_at)::float8 AS attempt_age_s
  FROM batchd.batches WHERE id = $1;

-- name: hold_batch
-- First in a transaction of several statements on a leased batch: locks its row while this process still
-- owns it ($2), so that no other daemon can take it over until the transaction ends. No row: not ours.
SELECT 1 FROM batchd.batches WHERE id = $1 AND owner = $2 FOR UPDATE;

-- name: begin_create
-- Committed before the create call: from here on, a crash leaves "maybe created" on disk, and nothing
-- more happens to the batch until the provider has surely finished with the request ($3 seconds).
UPDATE batchd.batches
   SET create_attempted_at = now(), create_attempts = create_attempts + 1,
       next_attempt_at = now() + make_interval(secs => $3)
 WHERE id = $1 AND owner = $2 AND status = 'pending'
RETURNING create_attempted_at;

-- Every write below on a leased batch (and its jobs) names the owner ($n = ctx.instance_id) and changes
-- nothing once another daemon has taken the batch over: a daemon that was paused past its lease (a stall,
-- a partition) cannot write over its successor's work when it wakes. A statement of several parts makes
-- the batch's own UPDATE the guard the rest depend on.

-- name: retry_later
-- $3 NULL keeps last_error: a reconciliation still looking keeps the create's own error, which decides
-- whether the batch is halved when it proves never made (submitter._not_made).
UPDATE batchd.batches SET next_attempt_at = now() + make_interval(secs => $2), last_error = COALESCE($3, last_error)
 WHERE id = $1 AND owner = $4;

-- name: shrink_batch
-- A job was taken out of a pending batch: count again, and send what is left afresh.
UPDATE batchd.batches
   SET request_count = (SELECT count(*) FROM batchd.jobs WHERE batch_id = $1 AND status = 'submitting'),
       create_attempted_at = NULL, next_attempt_at = now()
 WHERE id = $1 AND owner = $2;

-- name: create_refused
-- The provider answered with an error: no batch was made. Try again later with the same jobs.
UPDATE batchd.batches
   SET create_attempted_at = NULL, next_attempt_at = now() + make_interval(secs => $2), last_error = $3
 WHERE id = $1 AND owner = $4;

-- name: batch_last_error
SELECT last_error FROM batchd.batches WHERE id = $1;

-- name: set_create_attempts
UPDATE batchd.batches SET create_attempts = $2 WHERE id = ANY($1::uuid[]) AND owner = $3;

-- name: batch_created
-- The provider's answer to a create: its batch id, committed the moment it comes, before the jobs are recorded
-- (batch_submitted: seconds for 100,000). Until then the batch stays pending; a daemon that died in between
-- leaves it so, and the next owner records its jobs without reconciling (supervisor.py).
UPDATE batchd.batches SET provider_batch_id = $2
 WHERE id = $1 AND status = 'pending' AND owner = $3 AND provider_batch_id IS NULL;

-- name: batch_submitted
-- The batch, its jobs, and the events saying so, at once; each tenant hears of its own share of the batch.
-- Its provider id may be recorded already (batch_created).
WITH batch AS (
    UPDATE batchd.batches
       SET provider_batch_id = $2, status = 'in_progress', submitted_at = now(), last_error = NULL,
           next_attempt_at = now()
     WHERE id = $1 AND status = 'pending' AND owner = $4
    RETURNING id, provider_batch_id, request_count
), jobs AS (
    UPDATE batchd.jobs AS j
       SET status = 'submitted', submitted_at = now()
      FROM batch
     WHERE j.batch_id = batch.id AND j.status = 'submitting'
    RETURNING j.id, j.tenant_id, j.metadata, j.batch_id
), job_events AS (
    INSERT INTO batchd.events (type, tenant_id, job_id, batch_id, data)
    SELECT 'job.submitted', tenant_id, id, batch_id, jsonb_build_object('status', 'submitted', 'metadata', metadata)
      FROM jobs
), shares AS (
    INSERT INTO batchd.batch_tenants (batch_id, tenant_id, requests)
    SELECT batch_id, tenant_id, count(*) FROM jobs GROUP BY batch_id, tenant_id
    ON CONFLICT (batch_id, tenant_id) DO UPDATE SET requests = excluded.requests
    RETURNING batch_id, tenant_id, requests
)
INSERT INTO batchd.events (type, tenant_id, batch_id, data)
SELECT 'batch.submitted', shares.tenant_id, batch.id,
       jsonb_build_object('status', 'in_progress', 'provider_batch_id', batch.provider_batch_id,
                          'requests', shares.requests, 'adopted', $3::boolean)
  FROM shares JOIN batch ON batch.id = shares.batch_id;

-- name: split_batch
-- A 413: half the jobs move to a new pending batch; each half is tried on its own. Run after hold_batch
-- (the new batch is inserted in the same transaction).
WITH moved AS (
    UPDATE batchd.jobs SET batch_id = $2 WHERE id = ANY($3::uuid[]) AND batch_id = $1 RETURNING 1
)
UPDATE batchd.batches
   SET request_count = request_count - (SELECT count(*) FROM moved), bytes = $4,
       create_attempted_at = NULL, next_attempt_at = now(), last_error = $5
 WHERE id = $1 AND owner = $6;

-- name: abandon_batch
-- The provider provably never made this batch: its jobs go back to the queue, untouched.
WITH batch AS (
    UPDATE batchd.batches SET status = 'abandoned', last_error = $2, lease_until = NULL
     WHERE id = $1 AND owner = $3 AND status = 'pending'
    RETURNING id
), requeued AS (
    UPDATE batchd.jobs AS j SET status = 'queued', batch_id = NULL, params = NULL
      FROM batch
     WHERE j.batch_id = batch.id AND j.status = 'submitting'
    RETURNING 1
)
SELECT count(*) AS requeued FROM requeued;

-- name: known_provider_ids
SELECT provider_batch_id FROM batchd.batches WHERE provider_batch_id = ANY($1::text[]);

-- name: batch_polled
-- UPDATE 0: the batch is no longer this process's (or no longer in progress): the poller stops.
UPDATE batchd.batches
   SET request_counts = $2::jsonb, next_attempt_at = now() + make_interval(secs => $3), last_error = NULL
 WHERE id = $1 AND owner = $4 AND status = 'in_progress';

-- name: batch_ended
-- Returns the poll lag: from the provider's ended_at to now, by the database's clock.
UPDATE batchd.batches
   SET status = 'ended', request_counts = $2::jsonb, provider_ended_at = $3, ended_at = now()
 WHERE id = $1 AND status = 'in_progress' AND owner = $4
RETURNING extract(epoch FROM ended_at - provider_ended_at)::float8 AS poll_lag_s;

-- name: batch_gone
-- The provider no longer has this batch (retrieve or results answered 404: deleted behind batchd's back,
-- or its results expired) and its results were not all applied: it ends, marked vanished, with the reason;
-- applying it (results.py) then downloads nothing and retries every job still `submitted` in it.
UPDATE batchd.batches
   SET status = 'ended', ended_at = coalesce(ended_at, now()), last_error = $3,
       request_counts = coalesce(request_counts, '{}'::jsonb) || '{"vanished": true}'::jsonb
 WHERE id = $1 AND status IN ('in_progress', 'ended') AND owner = $2;

-- name: create_results_table
-- JSON arrives as text (COPY's fastest path) and is cast once, in the UPDATE.
CREATE TEMPORARY TABLE batchd_results (
    job_id      uuid NOT NULL,
    outcome     text NOT NULL,
    result      text,
    error       text,
    retry_in_s  float8  -- sync results only: a retried job is not sent again before this many seconds
) ON COMMIT DROP;

-- name: apply_results
-- One statement for a whole chunk of results. Only jobs still `submitted` in this batch change, so a
-- chunk applied twice (a crash between chunks, a restart) changes nothing the second time. A succeeded
-- job's cost goes into the ledger (batchd.costs, keyed by job and attempt: never counted twice) and the
-- tallies (the rollups, which budgets read), in this same statement, priced by the applying daemon's price set $3 (batchd.prices,
-- which results.publish_prices writes: one row per model, with its long-prompt tier if it has one, and the set's
-- batch factor). Returns how many jobs changed, the models billed without a price, and whether set $3 was
-- there: when it is not (a database this process has not published to, or rows removed by hand) nothing
-- changes, and the caller publishes it and applies again.
-- The sync path applies its outcomes with this same statement ($1 null: `via` 'sync', priced at the
-- factor 1, the full price), so events, the ledger and tallies are the same whichever way a job went: there,
-- only jobs still `sending` under this process's lease ($4) change, and a retried job waits retry_in_s
-- before it is sent again. For batches `via` is 'batch' and $4 is the batch's lease owner, this process.
-- A job's attempts + 1 is least(attempts, 2147483646) + 1: a row holding the integer's top (written by a
-- producer before 0008, or by hand) fails at max_attempts like any other instead of overflowing, which
-- failed the whole statement, and with it the batch's apply and every job in it, forever.
WITH applied AS (
    UPDATE batchd.jobs AS j
       SET status = CASE
               WHEN r.outcome = 'succeeded' THEN 'succeeded'
               WHEN r.outcome = 'failed' OR least(j.attempts, 2147483646) + 1 >= $2 THEN 'failed'
               ELSE 'queued'
           END,
           attempts = CASE WHEN r.outcome = 'retry' THEN least(j.attempts, 2147483646) + 1 ELSE j.attempts END,
           batch_id = CASE WHEN r.outcome = 'retry' AND least(j.attempts, 2147483646) + 1 < $2 THEN NULL
                           ELSE j.batch_id END,
           params = CASE WHEN r.outcome = 'retry' AND least(j.attempts, 2147483646) + 1 < $2 THEN NULL
                         ELSE j.params END,
           result = r.result,
           error = r.error,
           usage = r.result -> 'usage',
           completed_at = CASE WHEN r.outcome = 'retry' AND least(j.attempts, 2147483646) + 1 < $2 THEN NULL
                               ELSE now() END,
           sync_owner = NULL,
           sync_lease_until = NULL,
           not_before = CASE WHEN r.outcome = 'retry' AND r.retry_in_s IS NOT NULL
                             THEN now() + make_interval(secs => r.retry_in_s) END
      FROM (SELECT job_id, outcome, result::jsonb AS result, error::jsonb AS error, retry_in_s
              FROM batchd_results) AS r
     -- Written as an OR that the planner folds away once it knows $1: a batch's jobs are found on
     -- jobs_batch as before (an IS NOT DISTINCT FROM read every submitted job of every open batch), a sync
     -- job on jobs_sending.
     -- $4 is who applies: a batch's jobs change only while this process holds the batch's lease.
     WHERE j.id = r.job_id
       AND (j.batch_id = $1 AND j.status = 'submitted'
            AND EXISTS (SELECT 1 FROM batchd.batches AS b WHERE b.id = $1 AND b.owner = $4::text)
            OR $1 IS NULL AND j.batch_id IS NULL AND j.status = 'sending' AND j.sync_owner = $4::text)
       AND EXISTS (SELECT 1 FROM batchd.prices AS p WHERE p.price_set = $3::text)
    RETURNING j.id, j.tenant_id, j.status, j.metadata, j.usage, j.error, j.attempts, j.job_type, j.path,
              j.created_at, r.result ->> 'model' AS model
), billed AS MATERIALIZED (
    -- Errored, expired and canceled requests are not billed: only succeeded ones are. Cache writes are
    -- split by TTL when the usage says how (cache_creation), else all counted at the 5-minute rate. Plain
    -- casts, the fastest: a usage whose counts are not integers fails the chunk, which is then parsed line
    -- by line, where results.py sets such counts to 0 (classify_parsed).
    SELECT a.id, a.tenant_id, a.attempts, a.job_type, coalesce(a.model, 'unknown') AS model,
           coalesce((a.usage ->> 'input_tokens')::bigint, 0) AS input_tokens,
           coalesce((a.usage ->> 'output_tokens')::bigint, 0) AS output_tokens,
           CASE WHEN jsonb_typeof(a.usage -> 'cache_creation') = 'object'
                THEN coalesce((a.usage -> 'cache_creation' ->> 'ephemeral_5m_input_tokens')::bigint, 0)
                ELSE coalesce((a.usage ->> 'cache_creation_input_tokens')::bigint, 0)
           END AS write_5m,
           coalesce((a.usage -> 'cache_creation' ->> 'ephemeral_1h_input_tokens')::bigint, 0) AS write_1h,
           coalesce((a.usage ->> 'cache_read_input_tokens')::bigint, 0) AS read
      FROM applied AS a
     WHERE a.status = 'succeeded'
), rates AS MATERIALIZED (
    -- Each model of the chunk (a handful) looked up once: by its name, else without its date suffix.
    SELECT m.model, p.*
      FROM (SELECT DISTINCT model FROM billed) AS m
      LEFT JOIN LATERAL (
        SELECT p.input, p.output, p.write_5m, p.write_1h, p.read, p.long_above, p.long_input, p.long_output,
               p.long_write_5m, p.long_write_1h, p.long_read
          FROM batchd.prices AS p
         WHERE p.price_set = $3::text AND p.model IN (m.model, regexp_replace(m.model, '-[0-9]{8}$', ''))
         ORDER BY p.model = m.model DESC
         LIMIT 1
      ) AS p ON true
), factor AS (
    -- Batch price / synchronous price: the set's for a batch, 1 on the sync path (no discount there).
    SELECT CASE WHEN $1 IS NULL THEN 1::numeric ELSE s.batch_factor END AS factor
      FROM batchd.price_sets AS s
     WHERE s.id = $3::text
), ledger AS (
    INSERT INTO batchd.costs (job_id, attempt, tenant_id, model, job_type, batch_id, via, input_tokens,
                              output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens,
                              cost_usd, sync_cost_usd)
    SELECT b.id, b.attempts, b.tenant_id, b.model, b.job_type, $1,
           CASE WHEN $1 IS NULL THEN 'sync' ELSE 'batch' END, b.input_tokens, b.output_tokens,
           b.write_5m, b.write_1h, b.read, s.usd * f.factor, s.usd
      FROM billed AS b
      JOIN rates AS r ON r.model = b.model
     CROSS JOIN factor AS f
     CROSS JOIN LATERAL (
        -- A prompt (input, cache writes and reads) longer than the model's long_above is billed, every
        -- token of it, at the long-prompt rates.
        SELECT CASE WHEN b.input_tokens + b.write_5m + b.write_1h + b.read > r.long_above
                    THEN b.input_tokens * r.long_input + b.output_tokens * r.long_output
                         + b.write_5m * r.long_write_5m + b.write_1h * r.long_write_1h + b.read * r.long_read
                    ELSE b.input_tokens * r.input + b.output_tokens * r.output + b.write_5m * r.write_5m
                         + b.write_1h * r.write_1h + b.read * r.read
               END * 0.000001 AS usd
     ) AS s
    ON CONFLICT (job_id, attempt) DO NOTHING
    RETURNING job_id, tenant_id, model, cost_usd, sync_cost_usd, input_tokens, output_tokens,
              cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens
), tallied AS (
    -- The jobs this chunk finished, and what the ledger billed for them, for the rollups (0012).
    INSERT INTO batchd.tallies (tenant_id, status, path, job_type, model, jobs, billed, input_tokens,
                                output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens,
                                cost_usd, sync_cost_usd, unpriced)
    SELECT a.tenant_id, a.status, coalesce(a.path, ''), coalesce(a.job_type, ''), coalesce(l.model, ''),
           count(*), count(l.job_id), coalesce(sum(l.input_tokens), 0), coalesce(sum(l.output_tokens), 0),
           coalesce(sum(l.cache_write_5m_tokens), 0), coalesce(sum(l.cache_write_1h_tokens), 0),
           coalesce(sum(l.cache_read_tokens), 0), coalesce(sum(l.cost_usd), 0), coalesce(sum(l.sync_cost_usd), 0),
           count(l.job_id) FILTER (WHERE l.cost_usd IS NULL)
      FROM applied AS a
      LEFT JOIN ledger AS l ON l.job_id = a.id
     WHERE a.status IN ('succeeded', 'failed')
     GROUP BY 1, 2, 3, 4, 5
), turned AS (
    -- The batch turnaround (created to finished) of the jobs a batch finished, per tenant and log-scale
    -- bucket, for the dashboard's percentiles over time (0015; folded by rollups.py).
    INSERT INTO batchd.turnaround_tallies (tenant_id, bucket, jobs)
    SELECT a.tenant_id, batchd.turnaround_bucket(extract(epoch FROM now() - a.created_at)::float8), count(*)
      FROM applied AS a
     WHERE $1 IS NOT NULL AND a.status IN ('succeeded', 'failed')
     GROUP BY 1, 2
), job_events AS (
    INSERT INTO batchd.events (type, tenant_id, job_id, batch_id, data)
    SELECT CASE status WHEN 'queued' THEN 'job.retrying' ELSE 'job.' || status END,
           tenant_id, id, $1,
           jsonb_strip_nulls(jsonb_build_object('status', status, 'metadata', metadata, 'usage', usage,
                                                'error', error, 'attempts', attempts))
      FROM applied
)
SELECT (SELECT count(*) FROM applied) AS changed,
       (SELECT array_agg(DISTINCT model) FROM ledger WHERE cost_usd IS NULL) AS unpriced,
       EXISTS (SELECT 1 FROM batchd.prices AS p WHERE p.price_set = $3::text) AS priced;

-- name: set_aside_job
-- A job whose own row made apply_results fail (results.py): failed with the database's reason ($3) if it
-- is still `submitted` in batch $1 and this process ($4) holds that batch's lease, so that its batch's other
-- results are applied and the batch ends; on the sync path ($1 null), if it is still `sending` under this
-- process's lease, so that it is not sent again and again. Its event carries no metadata, which may be what failed. Returns how many jobs
-- changed (0 or 1).
WITH failed AS (
    UPDATE batchd.jobs
       SET status = 'failed', completed_at = now(), sync_owner = NULL, sync_lease_until = NULL,
           error = jsonb_build_object('type', 'set_aside', 'message', $3::text)
     WHERE id = $2
       AND (batch_id = $1 AND status = 'submitted'
            AND EXISTS (SELECT FROM batchd.batches WHERE id = $1 AND owner = $4::text)
            OR $1 IS NULL AND batch_id IS NULL AND status = 'sending' AND sync_owner = $4::text)
    RETURNING id, tenant_id, error, attempts, path, job_type
), tallied AS (
    INSERT INTO batchd.tallies (tenant_id, status, path, job_type, jobs)
    SELECT tenant_id, 'failed', coalesce(path, ''), coalesce(job_type, ''), count(*) FROM failed GROUP BY 1, 2, 3, 4
), failed_events AS (
    INSERT INTO batchd.events (type, tenant_id, job_id, batch_id, data)
    SELECT 'job.failed', tenant_id, id, $1,
           jsonb_build_object('status', 'failed', 'error', error, 'attempts', attempts)
      FROM failed
)
SELECT count(*) FROM failed;

-- name: route_sync
-- The sync sender's decision, made again every time it looks while jobs wait: queued jobs that must not
-- wait for a batch get path 'sync', and the reason. `sync` jobs always; `auto` jobs whose deadline is
-- nearer than the time until they would be flushed (what is left of max_wait_s $6 since they were queued)
-- + the batch p90 (window $2, min_samples $3, prior $4) + the margin $5. Rows are locked as the flusher's
-- claims lock them: a job the flusher holds is skipped (it is going into a batch now, which batch_bound
-- allowed at its flush), and one routed here is never claimed by the flusher (batch_bound: path 'sync').
-- At most $1 at once.
WITH t AS (SELECT * FROM batchd.batch_turnaround($2, $3, $4)),
due AS (
    SELECT id, least($6::float8, greatest(0::float8, $6 - extract(epoch FROM now() - created_at)::float8))
               AS flush_in_s
      FROM batchd.jobs
     WHERE status = 'queued' AND route <> 'batch' AND path IS DISTINCT FROM 'sync'
       AND (route = 'sync'
            OR (route = 'auto' AND deadline IS NOT NULL
                AND deadline < now() + make_interval(secs =>
                        least($6::float8, greatest(0::float8, $6 - extract(epoch FROM now() - created_at)::float8))
                        + (SELECT p90_s FROM t) + $5)))
     ORDER BY deadline, seq
     LIMIT $1
       FOR UPDATE SKIP LOCKED
)
UPDATE batchd.jobs AS j
   SET path = 'sync',
       path_reason = batchd.route_reason(j.route, j.deadline, due.flush_in_s, (SELECT p90_s FROM t),
                                         (SELECT samples FROM t), (SELECT measured FROM t), $5, $3)
  FROM due
 WHERE j.id = due.id
RETURNING j.id, j.tenant_id, j.path_reason;

-- name: sync_next_wake
-- Seconds until the sync sender has something to do without being woken (null: nothing): the next queued
-- `auto` job whose deadline comes within the batch p90 + margin ($1..$4 as route_sync's $2..$5), the next
-- retried sync job's not_before, the next lease of a job being sent to run out (its daemon may be dead).
-- Only what lies ahead: what is due now was done by this look (or waits for a held tenant: no spinning).
SELECT least(
    (SELECT extract(epoch FROM least(greatest(min(deadline), now() - interval '100 years'),
                                     now() + interval '100 years') - now())::float8
            - (SELECT p90_s FROM batchd.batch_turnaround($1, $2, $3)) - $4
       FROM batchd.jobs
      WHERE status = 'queued' AND route = 'auto' AND path IS DISTINCT FROM 'sync' AND deadline IS NOT NULL
     HAVING count(*) > 0),  -- none: null (greatest() would make it 100 years ago, a look every 50 ms)
    (SELECT extract(epoch FROM min(not_before) - now())::float8
       FROM batchd.jobs
      WHERE status = 'queued' AND route <> 'batch' AND path = 'sync' AND not_before > now()),
    (SELECT extract(epoch FROM min(sync_lease_until) - now())::float8
       FROM batchd.jobs WHERE status = 'sending' AND sync_lease_until > now())
);

-- name: claim_sync
-- Up to $1 jobs routed sync, nearest deadline first, skipping what another daemon holds, those waiting out a
-- retry's backoff, and tenants over budget (budgets.py), exactly as the flusher's claim.
SELECT id, tenant_id, request::text AS request, job_type, input::text AS input, attempts,
       batchd.request_problem(request) AS problem, path_reason
  FROM batchd.jobs
 WHERE status = 'queued' AND route <> 'batch' AND path = 'sync'
   AND (not_before IS NULL OR not_before <= now())
   AND tenant_id NOT IN (SELECT tenant_id FROM batchd.held_tenants)  -- over budget: wait (budgets.py)
 ORDER BY deadline, seq
 LIMIT $1
   FOR UPDATE SKIP LOCKED;

-- name: start_sync
-- Claimed jobs become `sending` under this process's lease ($1, for $2 seconds), with the params as
-- rendered ($4: null for a raw request), and a job.submitted event each. Committed before the call.
WITH started AS (
    UPDATE batchd.jobs AS j
       SET status = 'sending', sync_owner = $1, sync_lease_until = now() + make_interval(secs => $2),
           submitted_at = now(), batch_id = NULL, not_before = NULL, params = r.params::jsonb
      FROM unnest($3::uuid[], $4::text[]) AS r (id, params)
     WHERE j.id = r.id AND j.status = 'queued'
    RETURNING j.id, j.tenant_id, j.metadata
)
INSERT INTO batchd.events (type, tenant_id, job_id, data)
SELECT 'job.submitted', tenant_id, id, jsonb_build_object('status', 'sending', 'path', 'sync', 'metadata', metadata)
  FROM started;

-- name: renew_sync_leases
UPDATE batchd.jobs SET sync_lease_until = now() + make_interval(secs => $2) WHERE status = 'sending' AND sync_owner = $1;

-- name: requeue_expired_sync
-- Jobs whose sender's lease ran out (it was killed mid-call): back to the queue, still routed sync, and sent
-- again. Their call may have reached the API (the Messages API takes no idempotency key), so it counts as an
-- attempt: a job whose call kills its daemon every time fails at max_attempts ($1), not paid for forever.
-- least(attempts, 2147483646) + 1, as in apply_results: a row at the integer's top fails with its reason
-- instead of overflowing, which failed this statement once a second and stopped the sync path for everyone.
WITH expired AS (
    UPDATE batchd.jobs
       SET status = CASE WHEN least(attempts, 2147483646) + 1 >= $1 THEN 'failed' ELSE 'queued' END,
           attempts = least(attempts, 2147483646) + 1, sync_owner = NULL, sync_lease_until = NULL,
           completed_at = CASE WHEN least(attempts, 2147483646) + 1 >= $1 THEN now() END,
           error = CASE WHEN least(attempts, 2147483646) + 1 >= $1
                        THEN jsonb_build_object('type', 'sender_lost', 'message', format(
                            'the daemon sending it stopped mid-call %s times (max_attempts)',
                            least(attempts, 2147483646) + 1))
                        ELSE error END
     WHERE status = 'sending' AND sync_lease_until < now()
    RETURNING id, tenant_id, status, metadata, error, attempts, path, job_type
), tallied AS (
    INSERT INTO batchd.tallies (tenant_id, status, path, job_type, jobs)
    SELECT tenant_id, 'failed', coalesce(path, ''), coalesce(job_type, ''), count(*)
      FROM expired WHERE status = 'failed' GROUP BY 1, 2, 3, 4
), failed AS (
    INSERT INTO batchd.events (type, tenant_id, job_id, data)
    SELECT 'job.failed', tenant_id, id,
           jsonb_build_object('status', 'failed', 'error', error, 'metadata', metadata, 'attempts', attempts)
      FROM expired
     WHERE status = 'failed'
)
SELECT id, status, attempts FROM expired;

-- name: release_sync
-- A stopping daemon hands back the jobs whose calls it cancelled: queued again at once, not after a lease.
UPDATE batchd.jobs SET status = 'queued', sync_owner = NULL, sync_lease_until = NULL
 WHERE status = 'sending' AND sync_owner = $1
RETURNING id;

-- name: batch_vanished
SELECT coalesce((request_counts ->> 'vanished')::boolean, false) FROM batchd.batches WHERE id = $1;

-- name: disown_batch
-- An adopted provider batch proved to be someone else's: forget it, and reconcile again without it.
WITH batch AS (
    UPDATE batchd.batches
       SET status = 'pending', provider_batch_id = NULL, submitted_at = NULL, ended_at = NULL,
           request_counts = NULL, rejected_provider_ids = array_append(rejected_provider_ids, provider_batch_id),
           next_attempt_at = now(), last_error = $2
     WHERE id = $1 AND owner = $3
    RETURNING id
)
UPDATE batchd.jobs AS j SET status = 'submitting', submitted_at = NULL
  FROM batch
 WHERE j.batch_id = batch.id AND j.status = 'submitted';

-- name: unreported_jobs
SELECT id FROM batchd.jobs WHERE batch_id = $1 AND status = 'submitted';

-- name: finish_batch
-- A batch the provider lost (batch_gone) ends like any other, its event saying so ("vanished": true).
WITH batch AS (
    UPDATE batchd.batches SET status = 'applied', applied_at = now(), lease_until = NULL
     WHERE id = $1 AND status = 'ended' AND owner = $2
    RETURNING id, provider_batch_id, coalesce((request_counts ->> 'vanished')::boolean, false) AS vanished
)
INSERT INTO batchd.events (type, tenant_id, batch_id, data)
SELECT 'batch.ended', shares.tenant_id, batch.id,
       jsonb_build_object('status', 'ended', 'provider_batch_id', batch.provider_batch_id,
                          'requests', shares.requests)
       || CASE WHEN batch.vanished THEN '{"vanished": true}'::jsonb ELSE '{}'::jsonb END
  FROM batch JOIN batchd.batch_tenants AS shares ON shares.batch_id = batch.id;

-- name: provider_copy_deleted
UPDATE batchd.batches SET provider_deleted_at = now() WHERE id = $1 AND owner = $2;

-- name: probe_listener
-- The listener's proof of life: it must hear its own notification.
NOTIFY batchd_probe;

-- name: prune_events
-- One bounded chunk of the oldest published events past retention. It deletes a prefix of seq only (it
-- stops at the first young event), so a resuming client is served in full or told to reset, never a hole.
WITH oldest AS (
    SELECT id, seq, published_at FROM batchd.events WHERE seq IS NOT NULL ORDER BY seq LIMIT $2
), young AS (
    SELECT min(seq) AS seq FROM oldest WHERE published_at >= now() - make_interval(secs => $1)
)
DELETE FROM batchd.events AS e
 USING oldest
 WHERE e.id = oldest.id AND oldest.seq < coalesce((SELECT seq FROM young), 9223372036854775807)
   -- Nor one the webhook enqueuer has not passed, while an endpoint is there to get it (webhooks.md).
   AND (oldest.seq <= (SELECT enqueued_seq FROM batchd.webhook_log)
        OR NOT EXISTS (SELECT FROM batchd.webhook_endpoints WHERE disabled_at IS NULL));

-- name: publish_events
SELECT batchd.publish_events($1);

-- name: event_log_head
SELECT published_seq FROM batchd.event_log;

-- name: oldest_event_seq
SELECT min(seq) FROM batchd.events;

-- name: published_events
-- What the SSE hub fans out: every tenant's events after the last it has, in seq order, as each is sent.
SELECT seq, tenant_seq, type, tenant_id, job_id, batch_id, data
  FROM batchd.event_envelopes
 WHERE seq > $1
 ORDER BY seq
 LIMIT $2;

-- name: replay_events
-- What a resuming admin missed, up to where the hub has got ($2), with its filters (null: any).
SELECT seq, tenant_seq, type, tenant_id, job_id, batch_id, data
  FROM batchd.event_envelopes
 WHERE seq > $1 AND seq <= $2
   AND ($3::uuid IS NULL OR job_id = $3)
   AND ($4::uuid IS NULL OR batch_id = $4)
   AND ($5::text[] IS NULL OR type = ANY ($5))
 ORDER BY seq
 LIMIT $6;

-- name: replay_tenant_events
-- What a resuming tenant missed: its events after its id $2 (and after seq $3, the same point), up to where
-- the hub has got ($4), with its filters (null: any). tenant_seq grows with seq within a tenant, so the two
-- bounds cut one range of the index on (tenant_id, tenant_seq).
SELECT seq, tenant_seq, type, tenant_id, job_id, batch_id, data
  FROM batchd.event_envelopes
 WHERE tenant_id = $1 AND tenant_seq > $2 AND seq > $3 AND seq <= $4
   AND ($5::uuid IS NULL OR job_id = $5)
   AND ($6::uuid IS NULL OR batch_id = $6)
   AND ($7::text[] IS NULL OR type = ANY ($7))
 ORDER BY tenant_seq
 LIMIT $8;

-- name: resume_point
-- Where a stream resuming after id $2 starts (see sse.py), all from one snapshot: the log's head and oldest
-- seq, and for a tenant ($1) its last id, the ids' base, and the seq of its event right after $2 ($2 is
-- capped so that the client's largest id cannot overflow the sum; such an id is above any tenant_head).
SELECT l.published_seq AS head,
       (SELECT min(seq) FROM batchd.events) AS oldest,
       l.tenant_seq_base AS base,
       coalesce(t.published_seq, l.tenant_seq_base) AS tenant_head,
       (SELECT seq FROM batchd.events
         WHERE tenant_id = $1 AND tenant_seq = least($2::bigint, 9223372036854775806) + 1) AS next_seq
  FROM batchd.event_log AS l
  LEFT JOIN batchd.tenant_event_log AS t ON t.tenant_id = $1::text;

-- name: tenant_event_position
-- A tenant's id at the log's seq $2: its last event's at or before $2. Without one still kept, the id just
-- before its oldest kept event (all of which are after $2), else its last id given out, else the base.
SELECT coalesce(
    (SELECT tenant_seq FROM batchd.events
      WHERE tenant_id = $1 AND tenant_seq IS NOT NULL AND seq <= $2
      ORDER BY tenant_seq DESC LIMIT 1),
    (SELECT min(tenant_seq) - 1 FROM batchd.events WHERE tenant_id = $1),
    (SELECT published_seq FROM batchd.tenant_event_log WHERE tenant_id = $1),
    (SELECT tenant_seq_base FROM batchd.event_log));

-- name: notify_events
SELECT pg_notify('batchd_events', '');

-- name: insert_jobs
-- `batchd enqueue`, a chunk of checked jobs at a time, in their order. Each job's JSON object ($1) is read
-- here, so request, input and metadata arrive as the producer wrote them (no number rounded through a
-- double); the other columns come checked. A row whose idempotency key is taken is skipped: RETURNING has
-- a row for each job added, in the order given.
INSERT INTO batchd.jobs (tenant_id, request, job_type, input, metadata, idempotency_key, deadline, route)
SELECT r.tenant_id, nullif(r.job -> 'request', 'null'), r.job_type, nullif(r.job -> 'input', 'null'),
       nullif(r.job -> 'metadata', 'null'), r.idempotency_key, r.deadline, r.route
  FROM (SELECT u.job::jsonb AS job, u.tenant_id, u.job_type, u.idempotency_key, u.deadline, u.route, u.n
          FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[])
               WITH ORDINALITY AS u (job, tenant_id, job_type, idempotency_key, deadline, route, n)) AS r
 ORDER BY r.n
ON CONFLICT DO NOTHING
RETURNING id, tenant_id, idempotency_key;

-- name: jobs_by_idempotency_key
-- `batchd enqueue --json`: the jobs holding the keys ($1 tenants, $2 keys) that made it skip a job.
SELECT j.id, j.tenant_id, j.idempotency_key
  FROM unnest($1::text[], $2::text[]) AS k (tenant_id, idempotency_key)
  JOIN batchd.jobs AS j ON j.tenant_id = k.tenant_id AND j.idempotency_key = k.idempotency_key;

-- name: cancel_job
SELECT batchd.cancel_job($1);

-- name: get_job
-- The jsonb columns as text, served as the database holds them: Python's json cannot read every jsonb a
-- producer may write (nesting past its recursion limit, integers past 4,300 digits: a 500), and rounds
-- numbers to doubles (metadata would not come back untouched).
SELECT id, tenant_id, status, attempts, batch_id, job_type, route, path, path_reason, metadata::text AS metadata,
       error::text AS error, usage::text AS usage, result::text AS result, created_at, submitted_at, completed_at,
       billed.cost_usd, billed.sync_cost_usd
  FROM batchd.jobs
  -- What the ledger billed for it (null when nothing was billed, or the model had no price): its primary key.
 CROSS JOIN LATERAL (SELECT sum(c.cost_usd) AS cost_usd, sum(c.sync_cost_usd) AS sync_cost_usd
                       FROM batchd.costs AS c WHERE c.job_id = jobs.id) AS billed
 WHERE id = $1;

-- name: scan_tenant_jobs
-- `GET /v1/jobs`, a tenant's: the next $3 of its jobs after the cursor $2, by id (time-ordered), from the
-- index jobs_tenant_id. Their status only: the page is filtered from these, then read (list_jobs).
SELECT id, status FROM batchd.jobs WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3;

-- name: scan_jobs
-- The same for the admin, every tenant's, from the primary key.
SELECT id, status FROM batchd.jobs WHERE id > $1 ORDER BY id LIMIT $2;

-- name: list_jobs
-- A page of `GET /v1/jobs`: what `GET /v1/jobs/{id}` shows of each job but its result (a page's size stays
-- bounded: read a job for its result). jsonb as the database's text, as get_job does.
SELECT id, tenant_id, status, attempts, batch_id, job_type, route, path, path_reason, metadata::text AS metadata,
       error::text AS error, usage::text AS usage, created_at, submitted_at, completed_at,
       billed.cost_usd, billed.sync_cost_usd
  FROM batchd.jobs
 CROSS JOIN LATERAL (SELECT sum(c.cost_usd) AS cost_usd, sum(c.sync_cost_usd) AS sync_cost_usd
                       FROM batchd.costs AS c WHERE c.job_id = jobs.id) AS billed
 WHERE id = ANY($1::uuid[]) ORDER BY id;

-- name: job_tenant
SELECT tenant_id FROM batchd.jobs WHERE id = $1;

-- name: create_database
-- For the demo, which makes a database of its own; {database} is a generated, quoted name.
CREATE DATABASE {database};

-- name: drop_database
DROP DATABASE IF EXISTS {database} WITH (FORCE);

-- name: demo_insert_job
-- What any producer does: a plain INSERT.
INSERT INTO batchd.jobs (tenant_id, job_type, input, metadata) VALUES ($1, $2, $3, $4);

-- name: usage_totals
-- The demo's last line: jobs finished, tokens billed (the rollups), batches applied.
SELECT coalesce(sum(jobs) FILTER (WHERE status = 'succeeded'), 0)::bigint AS succeeded,
       coalesce(sum(jobs) FILTER (WHERE status = 'failed'), 0)::bigint AS failed,
       coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
       coalesce(sum(output_tokens), 0)::bigint AS output_tokens,
       (SELECT count(*) FROM batchd.batches WHERE status = 'applied') AS batches
  FROM batchd.totals_since(NULL, NULL);

-- name: status_by_tenant
-- Jobs per tenant and status: those in flight counted (jobs_live), finished ones from the rollups.
SELECT tenant_id, status, jobs FROM batchd.job_counts() ORDER BY tenant_id, status;

-- name: open_batches
SELECT id, provider_batch_id, status, request_count, request_counts, created_at, submitted_at, owner, last_error
  FROM batchd.batches WHERE status IN ('pending', 'in_progress', 'ended') ORDER BY created_at;

-- name: batches_by_status
-- `batchd status`: open batches per status, and the finished ones made since $1 (on batches_open and
-- batches_finished: as many rows as the work in flight and the window hold, however long the history).
SELECT status, count(*) AS batches
  FROM batchd.batches WHERE status IN ('pending', 'in_progress', 'ended') GROUP BY status
UNION ALL
SELECT status, count(*)
  FROM batchd.batches WHERE status IN ('applied', 'abandoned') AND created_at >= $1 GROUP BY status;

-- name: recent_outcomes
-- `batchd status`: jobs finished per status since the start of the UTC hour $1 seconds ago, from the hour
-- rollups and the tallies (batchd.totals_since): a few rows however busy the hour was.
SELECT status, sum(jobs)::bigint AS jobs
  FROM batchd.totals_since(now() - make_interval(secs => $1), NULL)
 GROUP BY status
 ORDER BY status;

-- name: add_tenant
-- A tenant may be added again: it gets one more token.
INSERT INTO batchd.tenants (name) VALUES ($1) ON CONFLICT (name) DO NOTHING;

-- name: add_token
INSERT INTO batchd.tokens (tenant_id, token_sha256) VALUES ($1, $2) RETURNING id;

-- name: list_tenants
-- `batchd tenant list`: every tenant with a row in batchd.tenants (a token, a budget, a limit) or with jobs
-- (producers name tenants by writing jobs; those have no row), with its tokens and its jobs per status:
-- those in flight counted on jobs_live, finished ones from the rollups, as `batchd status` counts them.
WITH jobs AS (
    SELECT tenant_id, status, jobs FROM batchd.job_counts()
), tokens AS (
    SELECT tenant_id,
           count(*) FILTER (WHERE revoked_at IS NULL) AS active_tokens,
           count(*) FILTER (WHERE revoked_at IS NOT NULL) AS revoked_tokens
      FROM batchd.tokens
     GROUP BY tenant_id
)
SELECT n.name, t.created_at,
       coalesce(k.active_tokens, 0) AS active_tokens, coalesce(k.revoked_tokens, 0) AS revoked_tokens,
       coalesce((SELECT jsonb_object_agg(j.status, j.jobs) FROM jobs AS j WHERE j.tenant_id = n.name), '{}')
           AS jobs
  FROM (SELECT name FROM batchd.tenants UNION SELECT tenant_id FROM jobs) AS n
  LEFT JOIN batchd.tenants AS t ON t.name = n.name
  LEFT JOIN tokens AS k ON k.tenant_id = n.name
 ORDER BY n.name;

-- name: revoke_tokens
UPDATE batchd.tokens SET revoked_at = now() WHERE tenant_id = $1 AND revoked_at IS NULL RETURNING id;

-- name: token_tenant
SELECT id, tenant_id FROM batchd.tokens WHERE token_sha256 = $1 AND revoked_at IS NULL;

-- name: revoked_tokens
-- Which of the tokens of open streams ($1) no longer stand for anyone (revoked, or deleted).
SELECT id FROM unnest($1::bigint[]) AS open (id)
 WHERE NOT EXISTS (SELECT 1 FROM batchd.tokens AS t WHERE t.id = open.id AND t.revoked_at IS NULL);

-- name: reading_timeout
-- A reading's statement timeout, for its transaction only (SET LOCAL, which takes no parameter): the
-- database ends a statement stuck behind a lock or a slow plan, and the connection stays usable.
SELECT set_config('statement_timeout', $1::text, true);

-- name: overview_heads
-- The dashboard's shared snapshot starts here (read first, in the same REPEATABLE READ transaction as the
-- rest, for every asker at once): the log's head (the admin's id) with the id of a tenant that has no event
-- yet, then each tenant's last id.
SELECT NULL::text AS tenant_id, published_seq AS head, tenant_seq_base AS base FROM batchd.event_log
UNION ALL
SELECT tenant_id, published_seq, NULL FROM batchd.tenant_event_log;

-- name: overview_queued
SELECT tenant_id, count(*) AS jobs, extract(epoch FROM now() - min(created_at))::float8 AS oldest_s
  FROM batchd.jobs
 WHERE status = 'queued'
 GROUP BY tenant_id
 ORDER BY tenant_id;

-- name: overview_batches
-- Open batches with requests still in them, one row per tenant with requests in the batch (the admin's
-- view sums them; a tenant's shows its own row).
SELECT b.id, b.provider_batch_id, b.status, j.tenant_id, count(*) AS in_flight, b.request_count,
       extract(epoch FROM now() - b.created_at)::float8 AS age_s
  FROM batchd.batches AS b
  JOIN batchd.jobs AS j ON j.batch_id = b.id AND j.status IN ('submitting', 'submitted')
 WHERE b.status IN ('pending', 'in_progress', 'ended')
 GROUP BY b.id, j.tenant_id
 ORDER BY b.created_at, b.id, j.tenant_id;

-- name: overview_totals
-- Finished jobs, the tokens billed for them and their cost and savings, per tenant, for all time: from the
-- rollups (batchd.totals_since), so the history's size does not matter, less the jobs whose event is not yet
-- published (overview_unpublished): exact at overview_heads, as the page counts each event after it.
SELECT tenant_id,
       coalesce(sum(jobs) FILTER (WHERE status = 'succeeded'), 0)::bigint AS succeeded,
       coalesce(sum(jobs) FILTER (WHERE status = 'failed'), 0)::bigint AS failed,
       coalesce(sum(jobs) FILTER (WHERE status = 'canceled'), 0)::bigint AS canceled,
       sum(input_tokens)::bigint AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens,
       sum(cache_read_tokens)::bigint AS cache_read_input_tokens,
       sum(cache_write_5m_tokens + cache_write_1h_tokens)::bigint AS cache_creation_input_tokens,
       sum(cost_usd)::float8 AS cost_usd,
       sum(sync_cost_usd)::float8 AS sync_cost_usd,
       sum(sync_cost_usd - cost_usd)::float8 AS saved_usd
  FROM batchd.totals_since(NULL, NULL)
 GROUP BY tenant_id
 ORDER BY tenant_id;

-- name: overview_unpublished
-- What overview_totals counts that the page will count again from the events after overview_heads: finished
-- jobs with an event not yet published, as the rollups counted them (their ledger row). As many as the
-- publisher's lag, found on events_unpublished.
SELECT j.tenant_id,
       count(*) FILTER (WHERE j.status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE j.status = 'failed') AS failed,
       count(*) FILTER (WHERE j.status = 'canceled') AS canceled,
       coalesce(sum(c.input_tokens), 0)::bigint AS input_tokens,
       coalesce(sum(c.output_tokens), 0)::bigint AS output_tokens,
       coalesce(sum(c.cache_read_tokens), 0)::bigint AS cache_read_input_tokens,
       coalesce(sum(c.cache_write_5m_tokens + c.cache_write_1h_tokens), 0)::bigint AS cache_creation_input_tokens,
       coalesce(sum(c.cost_usd), 0)::float8 AS cost_usd,
       coalesce(sum(c.sync_cost_usd), 0)::float8 AS sync_cost_usd,
       coalesce(sum(c.sync_cost_usd - c.cost_usd), 0)::float8 AS saved_usd
  FROM (SELECT DISTINCT job_id FROM batchd.events WHERE seq IS NULL AND job_id IS NOT NULL) AS e
  JOIN batchd.jobs AS j ON j.id = e.job_id
  LEFT JOIN batchd.costs AS c ON c.job_id = j.id AND c.attempt = j.attempts AND j.status = 'succeeded'
 WHERE j.status IN ('succeeded', 'failed', 'canceled')
 GROUP BY j.tenant_id;

-- name: overview_turnaround
-- The batch turnaround the router uses (batchd.batch_turnaround: the p90 of the last $1 applied batches, the
-- prior $3 while fewer than $2 are), and the p50 and p90 measured over those same batches (null: none yet),
-- on batches_applied_at: at most $1 rows whatever the history.
WITH r AS (
    SELECT extract(epoch FROM applied_at - created_at)::float8 AS s
      FROM batchd.batches
     WHERE applied_at IS NOT NULL
     ORDER BY applied_at DESC
     LIMIT $1::integer
)
SELECT t.p90_s AS routing_p90_s, t.samples, t.measured,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s) FROM r) AS p50_s,
       (SELECT percentile_cont(0.9) WITHIN GROUP (ORDER BY s) FROM r) AS p90_s
  FROM batchd.batch_turnaround($1::integer, $2::integer, $3::float8) AS t;

-- name: overview_sync
-- Jobs finished in the last hour that went through the Messages API, per tenant and why, as a kind of their
-- path_reason (batchd.route_reason): `route` (the producer asked: route = sync), `deadline` (an auto job whose
-- deadline was too near for a batch), `other`. Only these words leave the query, never the text itself.
-- On jobs_finished: the last hour's finished jobs.
SELECT tenant_id,
       CASE WHEN path_reason LIKE 'sync: route = sync%' THEN 'route'
            WHEN path_reason LIKE 'auto: deadline %' THEN 'deadline'
            ELSE 'other' END AS reason,
       count(*) AS jobs
  FROM batchd.jobs
 WHERE status IN ('succeeded', 'failed', 'canceled') AND completed_at >= now() - interval '1 hour'
   AND path = 'sync'
 GROUP BY 1, 2
 ORDER BY 1, 2;

-- name: status_summary
-- The daemon's one-line status for systemd (STATUS=), every few seconds: two counts on partial indexes
-- (jobs_queued, batches_open), every daemon's work on this database.
SELECT (SELECT count(*) FROM batchd.jobs WHERE status = 'queued') AS queued,
       (SELECT count(*) FROM batchd.batches WHERE status IN ('pending', 'in_progress', 'ended')) AS open_batches;

-- name: metrics_snapshot
-- What GET /metrics reports of the database, in one statement (so one snapshot): jobs per tenant and status
-- (those in flight counted on jobs_live, which holds only them; finished ones from the rollups, for all
-- time), batches per status, and the age of the job at the head of the queue (one row of jobs_queued).
SELECT 'jobs' AS kind, tenant_id, status, jobs AS n, NULL::float8 AS age_s
  FROM batchd.job_counts()
UNION ALL
SELECT 'batches', NULL, status, count(*), NULL
  FROM batchd.batches
 GROUP BY status
UNION ALL
SELECT 'queue_head', NULL, NULL, 1, greatest(0, extract(epoch FROM now() - created_at))::float8
  FROM (SELECT created_at FROM batchd.jobs WHERE status = 'queued' ORDER BY seq LIMIT 1) AS head;

-- name: lock_budgets
-- One budget check at a time across every daemon: each sees the last one's verdicts, so a tenant's
-- tenant.held (or tenant.released) event is written once.
SELECT pg_advisory_xact_lock(hashtext('batchd.budgets'));

-- name: check_budgets
-- Each budgeted tenant's spend this UTC day and month against its budgets, at the clock $1 (null: now();
-- tests pass another time). A tenant over either is held (hold_reason set: the claim leaves its jobs
-- queued) and, if it chose `fail`, its queued jobs fail; one under both again is released. Changes of
-- state write tenant.held / tenant.released events. Returns the changes and how many jobs failed.
WITH clock AS (
    SELECT now,
           date_trunc('day', now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS day_start,
           date_trunc('month', now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS month_start
      FROM (SELECT coalesce($1::timestamptz, now()) AS now) AS c
), spent AS (
    -- Per budgeted tenant, its spend of this month only: a row a day (the view batchd.spend, on the
    -- rollups_tenant index) and the tallies not yet folded.
    SELECT t.name, t.budget_day_usd, t.budget_month_usd, t.over_budget, t.hold_reason AS was, s.day_usd,
           s.month_usd
      FROM batchd.tenants AS t
     CROSS JOIN clock AS c
     CROSS JOIN LATERAL (
        SELECT coalesce(sum(cost_usd) FILTER (WHERE at >= c.day_start AND at < c.day_start + interval '1 day'),
                        0) AS day_usd,
               coalesce(sum(cost_usd), 0) AS month_usd
          FROM batchd.spend
         WHERE tenant_id = t.name AND at >= c.month_start AND at < c.month_start + interval '1 month'
     ) AS s
     WHERE t.budget_day_usd IS NOT NULL OR t.budget_month_usd IS NOT NULL OR t.hold_reason IS NOT NULL
), verdicts AS (
    SELECT *,
           CASE WHEN day_usd >= budget_day_usd
                THEN format('over its daily budget: %s USD spent of %s USD today (UTC)',
                            round(day_usd, 6)::float8, budget_day_usd::float8)
                WHEN month_usd >= budget_month_usd
                THEN format('over its monthly budget: %s USD spent of %s USD this month (UTC)',
                            round(month_usd, 6)::float8, budget_month_usd::float8)
           END AS reason
      FROM spent
), changed AS (
    UPDATE batchd.tenants AS t
       SET hold_reason = v.reason,
           held_since = CASE WHEN v.reason IS NULL THEN NULL ELSE coalesce(t.held_since, c.now) END
      FROM verdicts AS v, clock AS c
     WHERE t.name = v.name AND t.hold_reason IS DISTINCT FROM v.reason
    RETURNING t.name, t.over_budget, v.was, v.reason, v.day_usd, v.month_usd, v.budget_day_usd,
              v.budget_month_usd
), tenant_events AS (
    INSERT INTO batchd.events (type, tenant_id, data)
    SELECT CASE WHEN reason IS NULL THEN 'tenant.released' ELSE 'tenant.held' END, name,
           jsonb_strip_nulls(jsonb_build_object(
               'status', CASE WHEN reason IS NULL THEN 'released' ELSE 'held' END,
               'reason', reason, 'over_budget', over_budget,
               'spent_day_usd', day_usd, 'budget_day_usd', budget_day_usd,
               'spent_month_usd', month_usd, 'budget_month_usd', budget_month_usd))
      FROM changed
     WHERE (was IS NULL) <> (reason IS NULL)
    RETURNING type, tenant_id, data ->> 'reason' AS reason
), failed AS (
    UPDATE batchd.jobs AS j
       SET status = 'failed', completed_at = now(),
           error = jsonb_build_object('type', 'budget_exceeded',
                                      'message', format('tenant %s is %s; its budget says over_budget = fail',
                                                        v.name, v.reason))
      FROM verdicts AS v
     WHERE v.reason IS NOT NULL AND v.over_budget = 'fail' AND j.tenant_id = v.name AND j.status = 'queued'
    RETURNING j.id, j.tenant_id, j.metadata, j.error, j.attempts, j.path, j.job_type
), tallied AS (
    INSERT INTO batchd.tallies (tenant_id, status, path, job_type, jobs)
    SELECT tenant_id, 'failed', coalesce(path, ''), coalesce(job_type, ''), count(*) FROM failed GROUP BY 1, 2, 3, 4
), failed_events AS (
    INSERT INTO batchd.events (type, tenant_id, job_id, data)
    SELECT 'job.failed', tenant_id, id,
           jsonb_build_object('status', 'failed', 'error', error, 'metadata', metadata, 'attempts', attempts)
      FROM failed
)
SELECT (SELECT count(*) FROM failed) AS failed,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('type', type, 'tenant', tenant_id, 'reason', reason)),
                        '[]')::text
          FROM tenant_events) AS transitions;

-- name: set_tenant_budget
-- `batchd tenant set NAME --budget-day/--budget-month/--over-budget`: $2..$4 change only when their flag
-- ($5..$7) is set (so a budget can be cleared to null). The tenant is added if new.
INSERT INTO batchd.tenants AS t (name, budget_day_usd, budget_month_usd, over_budget)
VALUES ($1, $2, $3, coalesce($4, 'hold'))
ON CONFLICT (name) DO UPDATE
   SET budget_day_usd = CASE WHEN $5 THEN $2 ELSE t.budget_day_usd END,
       budget_month_usd = CASE WHEN $6 THEN $3 ELSE t.budget_month_usd END,
       over_budget = CASE WHEN $7 THEN $4 ELSE t.over_budget END
RETURNING name, budget_day_usd, budget_month_usd, over_budget, hold_reason;

-- name: wake_daemons
-- The flusher listens on batchd_jobs: a changed budget is checked at once, not at the next sweep.
SELECT pg_notify('batchd_jobs', '');

-- name: tenant_budgets
-- `batchd status` and the dashboard's overview: every tenant with a budget or held, with what it spent this
-- UTC day and month (from batchd.spend: a rollup row per day of the month, on rollups_tenant, and the
-- tallies not yet folded).
SELECT t.name AS tenant_id, t.budget_day_usd, t.budget_month_usd, t.over_budget, t.hold_reason, t.held_since,
       s.spent_day_usd, s.spent_month_usd
  FROM batchd.tenants AS t
 CROSS JOIN LATERAL (
    SELECT coalesce(sum(cost_usd) FILTER (WHERE at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
                    0) AS spent_day_usd,
           coalesce(sum(cost_usd), 0) AS spent_month_usd
      FROM batchd.spend
     WHERE tenant_id = t.name AND at >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
 ) AS s
 WHERE t.budget_day_usd IS NOT NULL OR t.budget_month_usd IS NOT NULL OR t.hold_reason IS NOT NULL
 ORDER BY t.name;

-- name: lock_configured_limits
-- Daemons starting together publish one after another: each one's DELETE would miss the rows another is
-- inserting, and its INSERT collide with them.
SELECT pg_advisory_xact_lock(hashtext('batchd.configured_limits'));

-- name: clear_configured_limits
-- A daemon starting writes batchd.toml's tenant limits whole (fairness.publish): the old ones go first.
DELETE FROM batchd.configured_limits;

-- name: insert_configured_limits
INSERT INTO batchd.configured_limits (tenant_id, weight, max_queued, max_in_flight)
SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::bigint[]);

-- name: publish_price_set
-- A daemon starting writes its [pricing] table whole, as the set its digest names (results.publish_prices), in one
-- transaction: this row first, whose lock (taken by the insert, or by the update when the set is there)
-- makes daemons publishing the same set at once do it one after another, the second rewriting the rows the
-- first committed instead of colliding with them. Daemons with other prices write other sets, untouched.
INSERT INTO batchd.price_sets AS s (id, batch_factor)
VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET batch_factor = excluded.batch_factor, published_at = now();

-- name: clear_prices
DELETE FROM batchd.prices WHERE price_set = $1;

-- name: insert_prices
INSERT INTO batchd.prices (price_set, model, input, output, write_5m, write_1h, read, long_above, long_input,
                           long_output, long_write_5m, long_write_1h, long_read)
SELECT $1, *
  FROM unnest($2::text[], $3::numeric[], $4::numeric[], $5::numeric[], $6::numeric[], $7::numeric[],
              $8::bigint[], $9::numeric[], $10::numeric[], $11::numeric[], $12::numeric[], $13::numeric[]);

-- name: set_tenant_limits
-- `batchd tenant set NAME --weight/--max-queued/--max-in-flight`: $2..$4 change only when their flag ($5..$7)
-- is set (`none` clears one back to batchd.toml's). The tenant is added if new.
INSERT INTO batchd.tenants AS t (name, weight, max_queued, max_in_flight)
VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO UPDATE
   SET weight = CASE WHEN $5 THEN $2 ELSE t.weight END,
       max_queued = CASE WHEN $6 THEN $3 ELSE t.max_queued END,
       max_in_flight = CASE WHEN $7 THEN $4 ELSE t.max_in_flight END
RETURNING name;

-- name: tenant_limits
-- A tenant's limits in force, with where each comes from.
SELECT l.weight, l.max_queued, l.max_in_flight,
       t.weight AS set_weight, t.max_queued AS set_max_queued, t.max_in_flight AS set_max_in_flight
  FROM batchd.tenant_limits($1) AS l
  LEFT JOIN batchd.tenants AS t ON t.name = $1;
-- name: billed_totals
-- What was billed since the UTC hour of $1 (null: all time), for one tenant $2 (null: every tenant), from the
-- rollups (batchd.totals_since), which outlive the ledger's rows, in one pass (grouping sets): per tenant,
-- model and path, and per job type (null: raw requests) for the prompt cache. `batchd report` sums the paths;
-- GET /metrics reads it for all time.
SELECT GROUPING(job_type) = 0 AS by_job_type, tenant_id, model, path AS via, nullif(job_type, '') AS job_type,
       sum(billed)::bigint AS jobs,
       sum(input_tokens)::bigint AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens,
       sum(cache_write_5m_tokens)::bigint AS cache_write_5m_tokens,
       sum(cache_write_1h_tokens)::bigint AS cache_write_1h_tokens,
       sum(cache_read_tokens)::bigint AS cache_read_tokens,
       sum(cost_usd) AS cost_usd,
       sum(sync_cost_usd) AS sync_cost_usd,
       sum(unpriced)::bigint AS unpriced_jobs
  FROM batchd.totals_since($1, $2)
 WHERE billed > 0
 GROUP BY GROUPING SETS ((tenant_id, model, path), (job_type));

-- name: lock_fold
-- One fold at a time across every daemon (a second would only wait for the rows the first takes).
SELECT pg_try_advisory_xact_lock(hashtext('batchd.fold'));

-- name: fold_tallies
-- Up to $1 tallies moved into the rollups, per UTC hour, day and week, for all time and per tenant and UTC
-- day (budgets), in one statement: a
-- tally is in exactly one of the two tables at every snapshot. The upsert goes in key order, so two folds
-- (there is one, under lock_fold) could not deadlock. Returns how many tallies were folded.
WITH moved AS (
    DELETE FROM batchd.tallies
     WHERE ctid = ANY (ARRAY(SELECT ctid FROM batchd.tallies LIMIT $1))
    RETURNING *
), grouped AS (
    SELECT s.span,
           CASE s.span WHEN 'all' THEN '-infinity'::timestamptz
                ELSE date_trunc(s.unit, m.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' END AS start,
           m.tenant_id,
           -- 'tenant_day' folds the rest of the key: one row per tenant and day, for budgets.
           CASE WHEN s.span = 'tenant_day' THEN '' ELSE m.status END AS status,
           CASE WHEN s.span = 'tenant_day' THEN '' ELSE m.path END AS path,
           CASE WHEN s.span = 'tenant_day' THEN '' ELSE m.job_type END AS job_type,
           CASE WHEN s.span = 'tenant_day' THEN '' ELSE m.model END AS model,
           sum(m.jobs) AS jobs, sum(m.billed) AS billed,
           sum(m.input_tokens) AS input_tokens, sum(m.output_tokens) AS output_tokens,
           sum(m.cache_write_5m_tokens) AS cache_write_5m_tokens,
           sum(m.cache_write_1h_tokens) AS cache_write_1h_tokens, sum(m.cache_read_tokens) AS cache_read_tokens,
           sum(m.cost_usd) AS cost_usd, sum(m.sync_cost_usd) AS sync_cost_usd, sum(m.unpriced) AS unpriced
      FROM moved AS m
     CROSS JOIN (VALUES ('hour', 'hour'), ('day', 'day'), ('week', 'week'), ('all', NULL), ('tenant_day', 'day'))
                AS s (span, unit)
     GROUP BY 1, 2, 3, 4, 5, 6, 7
), folded AS (
    INSERT INTO batchd.rollups AS r
    SELECT span, start, tenant_id, status, path, job_type, model, jobs, billed, input_tokens, output_tokens,
           cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, cost_usd, sync_cost_usd, unpriced
      FROM grouped
     ORDER BY span, start, tenant_id, status, path, job_type, model
    ON CONFLICT (span, start, tenant_id, status, path, job_type, model) DO UPDATE
       SET jobs = r.jobs + excluded.jobs, billed = r.billed + excluded.billed,
           input_tokens = r.input_tokens + excluded.input_tokens,
           output_tokens = r.output_tokens + excluded.output_tokens,
           cache_write_5m_tokens = r.cache_write_5m_tokens + excluded.cache_write_5m_tokens,
           cache_write_1h_tokens = r.cache_write_1h_tokens + excluded.cache_write_1h_tokens,
           cache_read_tokens = r.cache_read_tokens + excluded.cache_read_tokens,
           cost_usd = r.cost_usd + excluded.cost_usd, sync_cost_usd = r.sync_cost_usd + excluded.sync_cost_usd,
           unpriced = r.unpriced + excluded.unpriced
)
SELECT count(*) FROM moved;


-- name: prune_jobs
-- One bounded chunk of the oldest jobs of status $1 finished more than $2 seconds ago (on jobs_finished),
-- deleted. The rollups keep what they counted; a row someone holds is left for the next chunk.
DELETE FROM batchd.jobs
 WHERE id IN (SELECT id FROM batchd.jobs
               WHERE status = $1 AND completed_at < now() - make_interval(secs => $2)
               ORDER BY completed_at
               LIMIT $3
                 FOR UPDATE SKIP LOCKED);

-- name: prune_batches
-- One bounded chunk of finished batches made more than $1 seconds ago that no job refers to any more (their
-- jobs were pruned, or retried elsewhere); batch_tenants goes with them.
DELETE FROM batchd.batches
 WHERE id IN (SELECT b.id FROM batchd.batches AS b
               WHERE b.status IN ('applied', 'abandoned') AND b.created_at < now() - make_interval(secs => $1)
                 AND NOT EXISTS (SELECT 1 FROM batchd.jobs AS j WHERE j.batch_id = b.id)
               ORDER BY b.created_at
               LIMIT $2
                 FOR UPDATE SKIP LOCKED);

-- name: prune_costs
-- One bounded chunk of the ledger older than $1 seconds (on the BRIN index costs_at).
DELETE FROM batchd.costs
 WHERE ctid = ANY (ARRAY(SELECT ctid FROM batchd.costs WHERE at < now() - make_interval(secs => $1) LIMIT $2));

-- name: prune_hourly_rollups
-- One bounded chunk of hour rollups older than $1 seconds (day and all-time rollups are kept).
DELETE FROM batchd.rollups
 WHERE ctid = ANY (ARRAY(SELECT ctid FROM batchd.rollups
                          WHERE span = 'hour' AND start < now() - make_interval(secs => $1) LIMIT $2));

-- name: instance_heartbeat
-- This daemon's row (batchd.instances): written at start, then with every renewal of its leases; put back
-- whole if the pruner took it (a daemon paused for a day). The API's state is as it last found it.
INSERT INTO batchd.instances AS i
       (instance_id, host, pid, version, started_at, heartbeat_at, heartbeat_s,
        api_url, api_state, api_checked_at, api_reason)
VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8, $9, $10)
    ON CONFLICT (instance_id) DO UPDATE
   SET heartbeat_at = now(), heartbeat_s = EXCLUDED.heartbeat_s, api_url = EXCLUDED.api_url,
       api_state = EXCLUDED.api_state, api_checked_at = EXCLUDED.api_checked_at,
       api_reason = EXCLUDED.api_reason;

-- name: instance_remove
-- A daemon that stops takes its row with it.
DELETE FROM batchd.instances WHERE instance_id = $1;

-- name: prune_instances
-- One bounded chunk of the rows of daemons without a heartbeat for $1 seconds: they died (a daemon that
-- stops deletes its own).
DELETE FROM batchd.instances
 WHERE instance_id IN (SELECT instance_id FROM batchd.instances
                        WHERE heartbeat_at < now() - make_interval(secs => $1)
                        LIMIT $2
                          FOR UPDATE SKIP LOCKED);

-- name: status_daemons
-- `batchd status`, its daemons: each instance's row, how long since its heartbeat (by the database's
-- clock, which wrote it), and the leases it holds now: open batches it owns and jobs it is sending.
SELECT i.instance_id, i.host, i.pid, i.version, i.started_at, i.heartbeat_at, i.heartbeat_s,
       extract(epoch FROM now() - i.heartbeat_at)::float8 AS heartbeat_age_s,
       i.api_url, i.api_state, i.api_checked_at, i.api_reason,
       (SELECT count(*) FROM batchd.batches AS b
         WHERE b.status IN ('pending', 'in_progress', 'ended') AND b.owner = i.instance_id
           AND b.lease_until > now()) AS batches_leased,
       (SELECT count(*) FROM batchd.jobs AS j
         WHERE j.status = 'sending' AND j.sync_owner = i.instance_id
           AND j.sync_lease_until > now()) AS sync_jobs_leased
  FROM batchd.instances AS i
 ORDER BY i.started_at, i.instance_id;

-- name: release_sync_job
-- A sync call refused for the API key (401): the job goes back to the queue as it was, no attempt counted
-- (the key is the operator's to fix, not the job's fault), and is sent once the key works again.
UPDATE batchd.jobs SET status = 'queued', sync_owner = NULL, sync_lease_until = NULL
 WHERE id = $1 AND status = 'sending' AND sync_owner = $2;

-- name: series_intervals
-- GET /v1/series: the UTC $1s ('hour' or 'day') of the last $2 seconds, oldest first, by the database's clock
-- (read in the same snapshot as `series`, so both see the same now()).
SELECT generate_series(date_trunc($1, now() AT TIME ZONE 'UTC' - make_interval(secs => $2)) AT TIME ZONE 'UTC',
                       date_trunc($1, now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                       make_interval(hours => CASE $1 WHEN 'hour' THEN 1 ELSE 24 END)) AS start;

-- name: series
-- GET /v1/series: per tenant and UTC $1 ('hour' or 'day': the rollups' span of that name) from $2 on, jobs
-- finished by outcome and by path, prompt tokens, cost and Messages API cost. Reads the rollup rows of the
-- window (a range of the rollups' primary key, span and start) and the tallies not yet folded (a few: the fold
-- drains them), so its cost is the window's rows whatever the history.
WITH rows AS (
    SELECT r.start, r.tenant_id, r.status, r.path, r.jobs, r.input_tokens,
           r.cache_write_5m_tokens + r.cache_write_1h_tokens AS cache_write_tokens, r.cache_read_tokens,
           r.cost_usd, r.sync_cost_usd
      FROM batchd.rollups AS r
     WHERE r.span = $1 AND r.start >= $2
    UNION ALL
    SELECT date_trunc($1, t.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', t.tenant_id, t.status, t.path, t.jobs,
           t.input_tokens, t.cache_write_5m_tokens + t.cache_write_1h_tokens, t.cache_read_tokens, t.cost_usd,
           t.sync_cost_usd
      FROM batchd.tallies AS t
     WHERE t.at >= $2
)
SELECT start, tenant_id,
       coalesce(sum(jobs) FILTER (WHERE status = 'succeeded'), 0)::bigint AS succeeded,
       coalesce(sum(jobs) FILTER (WHERE status = 'failed'), 0)::bigint AS failed,
       coalesce(sum(jobs) FILTER (WHERE status = 'canceled'), 0)::bigint AS canceled,
       coalesce(sum(jobs) FILTER (WHERE path = 'batch'), 0)::bigint AS batch_jobs,
       coalesce(sum(jobs) FILTER (WHERE path = 'sync'), 0)::bigint AS sync_jobs,
       sum(input_tokens)::bigint AS input_tokens,
       sum(cache_write_tokens)::bigint AS cache_write_tokens,
       sum(cache_read_tokens)::bigint AS cache_read_tokens,
       sum(cost_usd)::float8 AS cost_usd,
       sum(sync_cost_usd)::float8 AS sync_cost_usd
  FROM rows
 GROUP BY start, tenant_id
 ORDER BY start, tenant_id;

-- name: sample_flow
-- The queue's sample (flow.py): unless one was taken less than $1 seconds ago (batchd.flow_clock, whose
-- row lock makes a second daemon at the same moment find the first's time and take none), the queued jobs
-- per tenant and the oldest's wait (on jobs_live: the queue, never the history), and the routing p90 in use
-- (batchd.batch_turnaround over the last $2 applied batches, the prior $4 below $3), added to batchd.flow's
-- rows of this UTC minute, hour and day: one per tenant with queued jobs and one for every tenant ('').
-- Returns whether it sampled, and how many tenants had queued jobs.
WITH tick AS (
    UPDATE batchd.flow_clock SET sampled_at = now()
     WHERE sampled_at <= now() - make_interval(secs => $1::float8)
    RETURNING sampled_at
), queued AS (
    SELECT j.tenant_id, count(*) AS jobs, extract(epoch FROM now() - min(j.created_at))::float8 AS oldest_s
      FROM batchd.jobs AS j
     WHERE j.status = 'queued' AND EXISTS (SELECT 1 FROM tick)
     GROUP BY j.tenant_id
), sample AS (
    SELECT q.tenant_id, q.jobs, q.oldest_s, 0::float8 AS routing_p90_s FROM queued AS q
    UNION ALL
    SELECT '', coalesce((SELECT sum(q.jobs) FROM queued AS q), 0)::bigint,
           coalesce((SELECT max(q.oldest_s) FROM queued AS q), 0), t.p90_s
      FROM tick
     CROSS JOIN batchd.batch_turnaround($2::integer, $3::integer, $4::float8) AS t
), added AS (
    INSERT INTO batchd.flow AS f (span, start, tenant_id, samples, queued_sum, queued_max, oldest_max_s,
                                  routing_p90_sum_s)
    SELECT u.span, date_trunc(u.span, now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', s.tenant_id, 1, s.jobs,
           s.jobs, s.oldest_s, s.routing_p90_s
      FROM sample AS s
     CROSS JOIN (VALUES ('minute'), ('hour'), ('day')) AS u (span)
     ORDER BY 1, 2, 3
    ON CONFLICT (span, start, tenant_id) DO UPDATE
       SET samples = f.samples + 1, queued_sum = f.queued_sum + excluded.queued_sum,
           queued_max = greatest(f.queued_max, excluded.queued_max),
           oldest_max_s = greatest(f.oldest_max_s, excluded.oldest_max_s),
           routing_p90_sum_s = f.routing_p90_sum_s + excluded.routing_p90_sum_s
)
SELECT EXISTS (SELECT 1 FROM tick) AS sampled, (SELECT count(*) FROM queued) AS tenants;

-- name: fold_turnarounds
-- Up to $1 turnaround tallies moved into batchd.turnarounds per UTC minute, hour and day, in one statement
-- (as fold_tallies, under lock_fold). Returns how many were folded.
WITH moved AS (
    DELETE FROM batchd.turnaround_tallies
     WHERE ctid = ANY (ARRAY(SELECT ctid FROM batchd.turnaround_tallies LIMIT $1))
    RETURNING *
), folded AS (
    INSERT INTO batchd.turnarounds AS t (span, start, tenant_id, bucket, jobs)
    SELECT u.span, date_trunc(u.span, m.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', m.tenant_id, m.bucket,
           sum(m.jobs)
      FROM moved AS m
     CROSS JOIN (VALUES ('minute'), ('hour'), ('day')) AS u (span)
     GROUP BY 1, 2, 3, 4
     ORDER BY 1, 2, 3, 4
        ON CONFLICT (span, start, tenant_id, bucket) DO UPDATE SET jobs = t.jobs + excluded.jobs
)
SELECT count(*) FROM moved;

-- name: prune_flow
-- One bounded chunk of batchd.flow's rows of span $3 older than $1 seconds.
DELETE FROM batchd.flow
 WHERE ctid = ANY (ARRAY(SELECT ctid FROM batchd.flow
                          WHERE span = $3 AND start < now() - make_interval(secs => $1) LIMIT $2));

-- name: prune_turnarounds
-- One bounded chunk of batchd.turnarounds' rows of span $3 older than $1 seconds.
DELETE FROM batchd.turnarounds
 WHERE ctid = ANY (ARRAY(SELECT ctid FROM batchd.turnarounds
                          WHERE span = $3 AND start < now() - make_interval(secs => $1) LIMIT $2));

-- name: flow_intervals
-- GET /v1/series, the flow's intervals: the UTC $1s ('minute', 'hour' or 'day') of the last $2 seconds,
-- oldest first, by the database's clock.
SELECT generate_series(date_trunc($1, now() AT TIME ZONE 'UTC' - make_interval(secs => $2)) AT TIME ZONE 'UTC',
                       date_trunc($1, now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                       CASE $1 WHEN 'minute' THEN interval '1 minute' WHEN 'hour' THEN interval '1 hour'
                               ELSE interval '1 day' END) AS start;

-- name: flow_series
-- GET /v1/series, the queue: batchd.flow's rows of span $1 from $2 on, every tenant's and the all-tenants
-- row (''): a range of its primary key, the window's rows whatever the history.
SELECT start, tenant_id, samples, queued_sum, queued_max, oldest_max_s, routing_p90_sum_s
  FROM batchd.flow
 WHERE span = $1 AND start >= $2
 ORDER BY start, tenant_id;

-- name: turnaround_series
-- GET /v1/series, batch turnaround: the histogram rows of span $1 from $2 on (a range of batchd.turnarounds'
-- primary key) and the tallies not yet folded (a few: the fold drains them), per interval, tenant and bucket.
SELECT start, tenant_id, bucket, sum(jobs)::bigint AS jobs
  FROM (SELECT t.start, t.tenant_id, t.bucket, t.jobs FROM batchd.turnarounds AS t
         WHERE t.span = $1 AND t.start >= $2
        UNION ALL
        SELECT date_trunc($1, t.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', t.tenant_id, t.bucket, t.jobs
          FROM batchd.turnaround_tallies AS t
         WHERE t.at >= $2) AS rows
 GROUP BY start, tenant_id, bucket
 ORDER BY start, tenant_id, bucket;
-- ---- webhooks (webhooks.py, deliverer.py) ------------------------------------------------------------------

-- name: webhook_add_endpoint
-- A tenant's new endpoint; it gets the events published from now on.
INSERT INTO batchd.webhook_endpoints (tenant_id, url, secret, event_types, after_seq)
SELECT $1, $2, $3, $4, published_seq FROM batchd.event_log
RETURNING id;

-- name: webhook_endpoints
-- Every endpoint (of tenant $1, or all when null), with its deliveries waiting (pending rows only: an
-- index range per endpoint).
SELECT w.id, w.tenant_id, w.url, w.event_types, w.created_at, w.disabled_at, w.disabled_reason, w.failures,
       w.failing_since, w.last_success_at,
       (SELECT count(*) FROM batchd.webhook_deliveries AS d
         WHERE d.endpoint_id = w.id AND d.status = 'pending') AS pending
  FROM batchd.webhook_endpoints AS w
 WHERE $1::text IS NULL OR w.tenant_id = $1
 ORDER BY w.tenant_id, w.id;

-- name: webhook_endpoint
-- One endpoint, as webhook_endpoints lists it.
SELECT w.id, w.tenant_id, w.url, w.event_types, w.created_at, w.disabled_at, w.disabled_reason, w.failures,
       w.failing_since, w.last_success_at,
       (SELECT count(*) FROM batchd.webhook_deliveries AS d
         WHERE d.endpoint_id = w.id AND d.status = 'pending') AS pending
  FROM batchd.webhook_endpoints AS w
 WHERE w.id = $1;

-- name: webhook_lock_tenant
-- A tenant's endpoints are added one at a time (until commit), so that its count stays under the limit.
SELECT pg_advisory_xact_lock(hashtextextended('batchd.webhook_endpoints:' || $1::text, 0));

-- name: webhook_count_endpoints
SELECT count(*) FROM batchd.webhook_endpoints WHERE tenant_id = $1;

-- name: webhook_remove_endpoint
-- Its deliveries go with it (ON DELETE CASCADE).
DELETE FROM batchd.webhook_endpoints WHERE id = $1 RETURNING tenant_id, url;

-- name: webhook_deliveries
-- An endpoint's delivery log, newest event first, up to $2 rows ($3: one status only, or all when null).
SELECT id, event_seq, message_id, event_type, status, attempts, created_at, first_attempt_at,
       last_attempt_at, next_attempt_at, last_status, last_error, finished_at
  FROM batchd.webhook_deliveries
 WHERE endpoint_id = $1 AND ($3::text IS NULL OR status = $3)
 ORDER BY event_seq DESC
 LIMIT $2;

-- name: webhook_retry_delivery
-- One delivery sent again from its first attempt, whatever became of it (a pending one is due at once,
-- unless an attempt is in flight); its endpoint re-enabled. Returns the endpoint.
WITH retried AS (
    UPDATE batchd.webhook_deliveries
       SET status = 'pending', attempts = 0, next_attempt_at = now(), finished_at = NULL,
           first_attempt_at = NULL
     WHERE id = $1 AND (status <> 'pending' OR lease_until IS NULL OR lease_until < now())
    RETURNING endpoint_id
)
UPDATE batchd.webhook_endpoints AS w
   SET disabled_at = NULL, disabled_reason = NULL, failures = 0, failing_since = NULL
  FROM retried
 WHERE w.id = retried.endpoint_id
RETURNING w.id;

-- name: webhook_retry_endpoint
-- An endpoint re-enabled and its dead deliveries sent again from their first attempt; returns how many.
WITH endpoint AS (
    UPDATE batchd.webhook_endpoints
       SET disabled_at = NULL, disabled_reason = NULL, failures = 0, failing_since = NULL
     WHERE id = $1
    RETURNING id
), retried AS (
    UPDATE batchd.webhook_deliveries AS d
       SET status = 'pending', attempts = 0, next_attempt_at = now(), finished_at = NULL,
           first_attempt_at = NULL
      FROM endpoint
     WHERE d.endpoint_id = endpoint.id AND d.status = 'dead'
    RETURNING 1
)
SELECT (SELECT count(*) FROM endpoint) AS endpoints, (SELECT count(*) FROM retried) AS retried;

-- name: webhook_lock_cursor
-- The enqueuer's turn: one at a time, across daemons. The next statement, in the same transaction, reads a
-- snapshot taken after the lock, so it sees every event the cursor's last holder saw.
SELECT enqueued_seq FROM batchd.webhook_log FOR UPDATE;

-- name: webhook_enqueue
-- The deliveries of the published events after the cursor ($1), up to $2 events: one per enabled endpoint of
-- the event's tenant that wants its type and was there before it; then the cursor moves past them. The body
-- is a Standard Webhooks payload ({type, timestamp, data}; data is the event as a stream sends it) and the
-- message id the tenant's own event number, as its stream's `id:` (a range of events_seq).
WITH head AS (
    SELECT least(published_seq, $1::bigint + $2::bigint) AS seq FROM batchd.event_log
), added AS (
    INSERT INTO batchd.webhook_deliveries (endpoint_id, event_seq, message_id, event_type, body)
    SELECT w.id, e.seq, 'evt_' || coalesce(e.tenant_seq, e.seq), e.type,
           json_build_object('type', e.type, 'timestamp', e.data::json -> 'at', 'data', e.data::json)::text
      FROM batchd.event_envelopes AS e
      JOIN batchd.webhook_endpoints AS w ON w.tenant_id = e.tenant_id
     WHERE e.seq > $1 AND e.seq <= (SELECT seq FROM head)
       AND w.disabled_at IS NULL AND e.seq > w.after_seq
       AND (w.event_types IS NULL OR e.type = ANY (w.event_types))
        ON CONFLICT (endpoint_id, event_seq) DO NOTHING
    RETURNING 1
), moved AS (
    UPDATE batchd.webhook_log SET enqueued_seq = greatest(enqueued_seq, (SELECT seq FROM head))
    RETURNING enqueued_seq
)
SELECT (SELECT count(*) FROM added) AS deliveries, (SELECT enqueued_seq FROM moved) - $1 AS events;

-- name: webhook_claim
-- Up to $3 due deliveries for daemon $1, each endpoint's oldest first and at most $2 in flight per endpoint
-- (across daemons: the endpoint's row is locked while its in-flight count is read). Each is leased for $4
-- seconds; a lease that runs out makes it due again (its daemon died mid-request). The cost is a probe per
-- enabled endpoint and the rows taken, never the history.
WITH endpoints AS (
    SELECT w.id, w.url, w.secret FROM batchd.webhook_endpoints AS w
     WHERE w.disabled_at IS NULL
       AND EXISTS (SELECT FROM batchd.webhook_deliveries AS d
                    WHERE d.endpoint_id = w.id AND d.status = 'pending' AND d.next_attempt_at <= now())
       FOR UPDATE OF w SKIP LOCKED
), chosen AS (
    SELECT due.id, due.next_attempt_at, w.id AS endpoint_id
      FROM endpoints AS w
     CROSS JOIN LATERAL (
        SELECT d.id, d.next_attempt_at FROM batchd.webhook_deliveries AS d
         WHERE d.endpoint_id = w.id AND d.status = 'pending' AND d.next_attempt_at <= now()
         ORDER BY d.next_attempt_at, d.id
         LIMIT greatest(0, $2 - (SELECT count(*) FROM batchd.webhook_deliveries AS f
                                  WHERE f.endpoint_id = w.id AND f.status = 'pending'
                                    AND f.lease_until > now()))
     ) AS due
     ORDER BY due.next_attempt_at, due.id
     LIMIT $3
)
UPDATE batchd.webhook_deliveries AS d
   SET owner = $1, lease_until = now() + make_interval(secs => $4),
       next_attempt_at = now() + make_interval(secs => $4), attempts = d.attempts + 1,
       first_attempt_at = coalesce(d.first_attempt_at, now()), last_attempt_at = now()
  FROM chosen JOIN endpoints AS w ON w.id = chosen.endpoint_id
 WHERE d.id = chosen.id AND d.status = 'pending'
RETURNING d.id, d.endpoint_id, d.message_id, d.body, d.attempts, w.url, w.secret;

-- name: webhook_delivered
-- An attempt of daemon $2 succeeded with HTTP status $3: the delivery is done, its endpoint's run of
-- failures over. Nothing when the lease was lost meanwhile (another attempt owns the row now).
WITH done AS (
    UPDATE batchd.webhook_deliveries
       SET status = 'delivered', finished_at = now(), last_status = $3, last_error = NULL, owner = NULL,
           lease_until = NULL
     WHERE id = $1 AND owner = $2 AND status = 'pending'
    RETURNING endpoint_id
)
UPDATE batchd.webhook_endpoints AS w
   SET failures = 0, failing_since = NULL, last_success_at = now()
  FROM done
 WHERE w.id = done.endpoint_id;

-- name: webhook_failed
-- An attempt of daemon $2 failed (HTTP status $3 or none, why $4): tried again in $5 seconds, or dead when
-- $5 is null. A dead delivery disables its endpoint unless a delivery to it succeeded since the dead one's
-- first attempt (webhooks.md). Returns the endpoint's state; no row when the lease was lost meanwhile.
WITH failed AS (
    UPDATE batchd.webhook_deliveries
       SET status = CASE WHEN $5::float8 IS NULL THEN 'dead' ELSE 'pending' END,
           next_attempt_at = now() + make_interval(secs => coalesce($5::float8, 0)),
           finished_at = CASE WHEN $5::float8 IS NULL THEN now() END,
           last_status = $3, last_error = $4, owner = NULL, lease_until = NULL
     WHERE id = $1 AND owner = $2 AND status = 'pending'
    RETURNING endpoint_id, status, first_attempt_at
)
UPDATE batchd.webhook_endpoints AS w
   SET failures = w.failures + 1, failing_since = coalesce(w.failing_since, now()),
       disabled_at = CASE WHEN failed.status = 'dead' AND w.disabled_at IS NULL
                               AND (w.last_success_at IS NULL OR w.last_success_at < failed.first_attempt_at)
                          THEN now() ELSE w.disabled_at END,
       disabled_reason = CASE WHEN failed.status = 'dead' AND w.disabled_at IS NULL
                                   AND (w.last_success_at IS NULL
                                        OR w.last_success_at < failed.first_attempt_at)
                              THEN $6 ELSE w.disabled_reason END
  FROM failed
 WHERE w.id = failed.endpoint_id
RETURNING w.id, w.failures, w.disabled_at IS NOT NULL AS disabled, failed.status;

-- name: webhook_release
-- A stopping daemon hands its attempts back: due again at once, the attempt not counted.
UPDATE batchd.webhook_deliveries
   SET owner = NULL, lease_until = NULL, next_attempt_at = now(), attempts = greatest(attempts - 1, 0)
 WHERE id = ANY ($1::bigint[]) AND owner = $2 AND status = 'pending';

-- name: prune_webhook_deliveries
-- One bounded chunk of the delivery log's finished rows (delivered or dead) older than $1 seconds.
DELETE FROM batchd.webhook_deliveries
 WHERE id IN (SELECT id FROM batchd.webhook_deliveries
               WHERE status <> 'pending' AND finished_at < now() - make_interval(secs => $1)
               ORDER BY finished_at
               LIMIT $2
                 FOR UPDATE SKIP LOCKED);
