-- batchd's schema, version 4: a producer needs privileges on batchd.jobs and nothing else.
--
-- The triggers on batchd.jobs used to run as whoever wrote the row, so a producer's INSERT needed SELECT on
-- batchd.wakeup and its cancel needed INSERT on batchd.events. Now the only code that touches those tables
-- on a producer's behalf runs as the schema's owner (SECURITY DEFINER, with a search_path that no caller can
-- change): the INSERT trigger, which only decides whether to notify, and a new AFTER trigger that records a
-- cancellation's event. Trigger functions cannot be called directly, so a producer cannot use them to write
-- an event of its own making. And since a producer is granted UPDATE of the status column for its cancels,
-- a trigger refuses it any other status. deploy/sql/roles.sql grants the roles; for a role with UPDATE on
-- the whole table (every role until then) behaviour is unchanged.

-- Statement-level, once per INSERT: reads batchd.wakeup and notifies.
ALTER FUNCTION batchd.jobs_inserted() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- The BEFORE trigger keeps its checks and timestamps and runs as the caller, so the daemon's status changes
-- (thousands of rows per statement) pay nothing for a change of user; the event moves to the trigger below.
CREATE OR REPLACE FUNCTION batchd.jobs_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'canceled' AND OLD.status <> 'canceled' THEN
        IF OLD.status <> 'queued' THEN
            RAISE EXCEPTION 'job % is %, and only a queued job can be canceled', OLD.id, OLD.status
                USING ERRCODE = 'check_violation';
        END IF;
        NEW.completed_at := coalesce(NEW.completed_at, now());
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

-- A role that may update the status column alone (a producer, deploy/sql/roles.sql) may only cancel: a
-- finished job put back in the queue, or a submitted one, would be sent and paid for twice. The condition is
-- the trigger's WHEN, bound when the trigger is made, so no caller's search_path can change its meaning; a
-- role with UPDATE on the whole table (the daemon, the owner) is not concerned.
CREATE FUNCTION batchd.jobs_status_refused() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a producer may only cancel a job, not set its status to %', NEW.status
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER jobs_status_refused BEFORE UPDATE OF status ON batchd.jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.status <> 'canceled'
                       AND NOT pg_catalog.has_table_privilege('batchd.jobs'::regclass, 'UPDATE'))
    EXECUTE FUNCTION batchd.jobs_status_refused();

-- Fires only for a job that was just canceled (the BEFORE trigger has refused any cancel but a queued job's).
CREATE FUNCTION batchd.jobs_canceled() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO batchd.events (type, tenant_id, job_id, data)
    VALUES ('job.canceled', NEW.tenant_id, NEW.id,
            jsonb_build_object('status', 'canceled', 'metadata', NEW.metadata));
    PERFORM pg_notify('batchd_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_canceled AFTER UPDATE OF status ON batchd.jobs
    FOR EACH ROW WHEN (NEW.status = 'canceled' AND OLD.status <> 'canceled')
    EXECUTE FUNCTION batchd.jobs_canceled();

-- Firing a trigger needs no EXECUTE privilege; nobody needs to call these by hand.
REVOKE EXECUTE ON FUNCTION batchd.jobs_inserted(), batchd.jobs_status_changed(), batchd.jobs_status_refused(),
    batchd.jobs_canceled() FROM PUBLIC;
