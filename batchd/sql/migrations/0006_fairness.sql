-- batchd's schema, version 6: tenants share batches fairly, within limits.
--
-- Each tenant has a weight (its share of a batch when several tenants are queued; default 1), the most jobs
-- it may have queued (beyond it the producer's INSERT is refused), and the most requests it may have in
-- flight in open batches (beyond it the flusher leaves its jobs queued). `batchd tenant set` writes them to
-- batchd.tenants; batchd.toml's [tenant_defaults] and [tenants.NAME] are written by each daemon, when it
-- starts, to batchd.configured_limits, so that the database (which refuses INSERTs) knows them too. A value
-- set with `batchd tenant set` wins over batchd.toml's.

ALTER TABLE batchd.tenants
    ADD COLUMN weight        integer CHECK (weight BETWEEN 1 AND 10000),
    ADD COLUMN max_queued    bigint CHECK (max_queued >= 0),
    ADD COLUMN max_in_flight bigint CHECK (max_in_flight >= 0);

-- batchd.toml's limits as the last daemon to start read them: tenant_id '' holds [tenant_defaults] (no job
-- can have an empty tenant_id), the other rows [tenants.NAME].
CREATE TABLE batchd.configured_limits (
    tenant_id     text PRIMARY KEY,
    weight        integer CHECK (weight BETWEEN 1 AND 10000),
    max_queued    bigint CHECK (max_queued >= 0),
    max_in_flight bigint CHECK (max_in_flight >= 0)
);

-- A tenant's limits in force: `batchd tenant set`, else batchd.toml's [tenants.NAME], else its defaults.
-- Not every tenant has a row anywhere (producers write any tenant_id): such a tenant gets the defaults.
-- Plain SQL with no SET clause, so that the planner inlines it into the claim (one row, known).
CREATE FUNCTION batchd.tenant_limits(tenant text)
    RETURNS TABLE (weight integer, max_queued bigint, max_in_flight bigint)
    LANGUAGE sql STABLE ROWS 1 AS $$
    SELECT coalesce(t.weight, c.weight, d.weight, 1),
           coalesce(t.max_queued, c.max_queued, d.max_queued),
           coalesce(t.max_in_flight, c.max_in_flight, d.max_in_flight)
      FROM (SELECT) AS one
      LEFT JOIN batchd.tenants AS t ON t.name = tenant
      LEFT JOIN batchd.configured_limits AS c ON c.tenant_id = tenant
      LEFT JOIN batchd.configured_limits AS d ON d.tenant_id = ''
$$;

-- The fair claim finds the tenants with queued jobs by skipping through this index (one probe per tenant,
-- however deep each one's queue), and reads each tenant's queue head from it in order.
CREATE INDEX jobs_queued_tenant ON batchd.jobs (tenant_id, seq) WHERE status = 'queued';

-- Whether a max_queued is set anywhere, kept in the row the INSERT trigger reads anyway: looking in
-- batchd.tenants and batchd.configured_limits on every INSERT cost one-row producers a tenth of their rate
-- (docs/benchmarks.md). Kept by the statement triggers below; limits change rarely.
ALTER TABLE batchd.wakeup ADD COLUMN queue_limited boolean NOT NULL DEFAULT false;

CREATE FUNCTION batchd.max_queued_changed() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- The row's lock first, the look after (a statement of its own, so a snapshot of its own): of two
    -- changes at once, the second sees the first's.
    PERFORM 1 FROM batchd.wakeup FOR UPDATE;
    UPDATE batchd.wakeup
       SET queue_limited = EXISTS (SELECT 1 FROM batchd.configured_limits WHERE max_queued IS NOT NULL)
                           OR EXISTS (SELECT 1 FROM batchd.tenants WHERE max_queued IS NOT NULL);
    RETURN NULL;
END
$$;

REVOKE EXECUTE ON FUNCTION batchd.max_queued_changed() FROM PUBLIC;

CREATE TRIGGER tenants_max_queued AFTER INSERT OR DELETE OR UPDATE OF max_queued OR TRUNCATE ON batchd.tenants
    FOR EACH STATEMENT EXECUTE FUNCTION batchd.max_queued_changed();
CREATE TRIGGER configured_limits_max_queued
    AFTER INSERT OR DELETE OR UPDATE OF max_queued OR TRUNCATE ON batchd.configured_limits
    FOR EACH STATEMENT EXECUTE FUNCTION batchd.max_queued_changed();

-- The INSERT trigger (still once per statement) also refuses jobs past a tenant's max_queued. It costs
-- nothing more while no limit is set anywhere; with one, it counts the tenant's queue, at most max_queued + 1
-- rows, under a per-tenant lock: two producers' INSERTs for one tenant are checked one after the other, and
-- each count (a new snapshot per statement under READ COMMITTED) sees the other's committed rows.
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
        SELECT 1 FROM new_jobs WHERE new_jobs.seq >= wake_seq OR new_jobs.deadline IS NOT NULL
    ) THEN
        PERFORM pg_notify('batchd_jobs', '');
    END IF;
    RETURN NULL;
END
$$;

REVOKE EXECUTE ON FUNCTION batchd.jobs_inserted() FROM PUBLIC;
