-- batchd's schema, version 7: deadline-aware routing. A job says how it wants to go (`route`): through a
-- batch (the default, half the price), through the synchronous Messages API (`sync`), or `auto`: through a
-- batch unless its deadline cannot be met that way, judged from the turnaround of recent batches.
--
-- Producers' INSERTs that name no route keep working: `route` defaults to 'batch'.

ALTER TABLE batchd.jobs
    ADD COLUMN route text NOT NULL DEFAULT 'batch' CHECK (route IN ('batch', 'sync', 'auto')),
    -- Which path the job took, and why: set by the daemon when it decides (the flusher when it puts the job
    -- in a batch, the sync sender when it routes it to the Messages API). Null while undecided. A job that
    -- is retried keeps its last path; an `auto` job is judged again, a `sync` path is never undone.
    ADD COLUMN path text CHECK (path IN ('batch', 'sync')),
    ADD COLUMN path_reason text,
    -- The sync path's lease, as batches have theirs: the process (one id per start) sending the job, and
    -- until when. A job `sending` whose lease ran out (its daemon was killed mid-call) goes back to the queue.
    ADD COLUMN sync_owner text,
    ADD COLUMN sync_lease_until timestamptz,
    -- A sync job that the API refused for a passing reason (429, 5xx, a lost connection) is not sent again
    -- before this time (its backoff, or the API's retry-after).
    ADD COLUMN not_before timestamptz;

-- `sending`: a sync job whose Messages API call is in flight. The check is replaced with NOT VALID and then
-- validated, so that the table is scanned under a lock that lets producers go on inserting.
ALTER TABLE batchd.jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE batchd.jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('queued', 'submitting', 'submitted', 'sending', 'succeeded', 'failed', 'canceled')) NOT VALID;
ALTER TABLE batchd.jobs VALIDATE CONSTRAINT jobs_status_check;

-- The sync sender's reads touch only queued jobs that may not batch: a handful beside a batch backlog of
-- any depth. Ordered as it claims them: the nearest deadline first.
CREATE INDEX jobs_queued_routed ON batchd.jobs (deadline, seq) WHERE status = 'queued' AND route <> 'batch';
-- Jobs in flight through the Messages API, for lease renewal and for taking back a dead daemon's.
CREATE INDEX jobs_sending ON batchd.jobs (sync_lease_until) WHERE status = 'sending';
-- The recent batches the turnaround is measured on.
CREATE INDEX batches_applied_at ON batchd.batches (applied_at) WHERE applied_at IS NOT NULL;

-- The batch path's turnaround: from a batch's flush (created_at: its jobs were claimed) to its results
-- applied (applied_at: the jobs' results are readable), over the last `window_n` applied batches; their
-- 90th percentile (interpolated, percentile_cont). With fewer than `min_samples` of them, `prior_s` (a
-- configured guess) stands in, and `measured` says so. STABLE: one statement sees one value.
CREATE FUNCTION batchd.batch_turnaround(window_n integer, min_samples integer, prior_s float8)
RETURNS TABLE (p90_s float8, samples integer, measured boolean) LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN count(*) >= greatest(min_samples, 1)
                THEN percentile_cont(0.9) WITHIN GROUP (ORDER BY r.turnaround_s)
                ELSE prior_s
           END,
           count(*)::integer,
           count(*) >= greatest(min_samples, 1)
      FROM (SELECT extract(epoch FROM b.applied_at - b.created_at)::float8 AS turnaround_s
              FROM batchd.batches AS b
             WHERE b.applied_at IS NOT NULL
             ORDER BY b.applied_at DESC
             LIMIT window_n) AS r
$$;

-- The routing rule, in one place: may this queued job go into a batch now? `batch` jobs always; `sync`
-- jobs never; `auto` jobs unless routed sync already, or their deadline is nearer than `threshold_s` (the
-- batch p90 plus the margin: a batch made now would most likely end after it). The flusher's reads and
-- claims all ask this, at their statement's now(), so a job the sync path should take never goes into a
-- batch. Inlined by the planner.
CREATE FUNCTION batchd.batch_bound(route text, path text, deadline timestamptz, threshold_s float8)
RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT route = 'batch'
           OR (route = 'auto' AND path IS DISTINCT FROM 'sync'
               AND (deadline IS NULL OR deadline >= now() + make_interval(secs => threshold_s)))
$$;

-- Why a job takes its path, as recorded in batchd.jobs.path_reason, e.g. "auto: deadline in 240 s < flush
-- in 0 s + batch p90 1800 s + margin 60 s (20 batches)". `flush_in_s`: how long the job would still wait
-- for its batch to be made (0 when the flusher is making it).
CREATE FUNCTION batchd.route_reason(route text, deadline timestamptz, flush_in_s float8, p90_s float8,
                                    samples integer, measured boolean, margin_s float8, min_samples integer)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN route = 'batch' THEN 'batch: route = batch'
        WHEN route = 'sync' THEN 'sync: route = sync'
        WHEN deadline IS NULL THEN 'auto: no deadline, so the batch'
        ELSE format('auto: deadline in %s s %s flush in %s s + batch p90 %s s + margin %s s (%s)',
                    trim_scale(round(d.left_s::numeric, 1)),
                    CASE WHEN d.left_s < flush_in_s + p90_s + margin_s THEN '<' ELSE '>=' END,
                    trim_scale(round(flush_in_s::numeric, 1)), trim_scale(round(p90_s::numeric, 1)),
                    trim_scale(round(margin_s::numeric, 1)),
                    CASE WHEN measured THEN format('%s batches', samples)
                         ELSE format('prior: %s of %s batches measured', samples, min_samples) END)
    END
      -- Clamped: a producer may write any timestamptz ('infinity', year 294276), whose distance from now
      -- does not fit an interval.
      FROM (SELECT extract(epoch FROM least(greatest(deadline, now() - interval '100 years'),
                                            now() + interval '100 years') - now())::float8 AS left_s) AS d
$$;

-- The INSERT trigger also wakes the daemon for a job that may go sync: such a job must not wait for the
-- flusher's own reasons to be woken (a full batch, an idle queue), nor for the next sweep. It keeps 0006's
-- max_queued check.
CREATE OR REPLACE FUNCTION batchd.jobs_inserted() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    armed boolean;
    wake_seq bigint;
    limited boolean;
    tenant record;
    queued bigint;
BEGIN
    SELECT w.armed, w.wake_seq, w.queue_limited INTO armed, wake_seq, limited FROM batchd.wakeup AS w;
    IF limited THEN
        FOR tenant IN
            SELECT n.tenant_id, l.max_queued
              FROM (SELECT DISTINCT new_jobs.tenant_id FROM new_jobs WHERE new_jobs.status = 'queued') AS n
             CROSS JOIN LATERAL batchd.tenant_limits(n.tenant_id) AS l
             WHERE l.max_queued IS NOT NULL
             ORDER BY n.tenant_id  -- the same lock order in every transaction: no deadlock between them
        LOOP
            PERFORM pg_advisory_xact_lock(hashtext('batchd.max_queued'), hashtext(tenant.tenant_id));
            SELECT count(*) INTO queued
              FROM (SELECT 1 FROM batchd.jobs AS j
                     WHERE j.tenant_id = tenant.tenant_id AND j.status = 'queued'
                     LIMIT tenant.max_queued + 1) AS q;
            IF queued > tenant.max_queued THEN
                RAISE EXCEPTION 'tenant % may have at most % queued jobs', tenant.tenant_id, tenant.max_queued
                    USING ERRCODE = 'configuration_limit_exceeded',
                          DETAIL = 'This INSERT would leave more than max_queued of its jobs waiting; none of its rows was added.',
                          HINT = 'Insert again once batchd has sent some of them, or raise the limit: batchd tenant set '
                                 || tenant.tenant_id || ' --max-queued N (or [tenants] in batchd.toml).';
            END IF;
        END LOOP;
        -- Read again: the flusher may have armed the trigger while this one waited for a tenant's lock.
        SELECT w.armed, w.wake_seq INTO armed, wake_seq FROM batchd.wakeup AS w;
    END IF;
    IF armed OR EXISTS (
        SELECT 1 FROM new_jobs
         WHERE new_jobs.seq >= wake_seq OR new_jobs.deadline IS NOT NULL OR new_jobs.route <> 'batch'
    ) THEN
        PERFORM pg_notify('batchd_jobs', '');
    END IF;
    RETURN NULL;
END
$$;

REVOKE EXECUTE ON FUNCTION batchd.jobs_inserted() FROM PUBLIC;
