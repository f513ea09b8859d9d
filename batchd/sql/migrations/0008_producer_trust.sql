-- batchd's schema, version 8: a producer writes only what a producer may write.
--
-- Until now a producer's INSERT could name any column of batchd.jobs (roles.sql grants INSERT on the whole
-- table, and row-level security checks tenant_id only): a row born `sending` with an expired lease and
-- attempts = 2147483647 made the sync sender's statement overflow once a second, for every tenant; one born
-- `submitted` in another tenant's batch stopped that batch from ever being applied; `succeeded` rows with
-- a made-up result were kept as batchd's own. From here the database itself refuses them, whatever the
-- grants: a producer's INSERT may set only
--
--     tenant_id, request, job_type, input, metadata, idempotency_key, deadline, route
--
-- and every other column must be what a plain INSERT gives it. Its UPDATE may only cancel (status to
-- 'canceled'; the existing trigger still allows that of a queued job only) and change nothing else.
--
-- Who is not a producer (batchd.trusted_writer): the owner of batchd.jobs and any member of it (superusers
-- are members of every role), and members of the roles named in batchd.daemon_roles, which
-- deploy/sql/roles.sql sets to its daemon role. A table rather than a grant: an operator may grant a producer
-- more than it needs on batchd.jobs (that is what this migration must survive), while this table is
-- written only by its owner, and says in so many words which role runs batchd. Role names rather than oids,
-- so that a dump restored elsewhere keeps its meaning. The daemon itself never needs it to INSERT (`batchd
-- enqueue` names producer columns only) but does to UPDATE, so the table is filled at once with the roles
-- that may UPDATE batchd.batches, a table no producer has any privilege on: the daemon of a deployment that
-- ran roles.sql keeps working until roles.sql runs again (as it must after each migration) and replaces
-- that guess with its own daemon.
--
-- What it costs:
-- - every INSERT runs a row trigger (it makes id and seq, whose defaults move into it: a column default
--   cannot tell a value the producer gave from its own, and a producer that chose its seq would jump the
--   queue); about 2 us a row on this kind of machine (50,000 1 KB rows in one INSERT: 0.87 s against
--   0.77 s, best of 6), lost in the noise of one-row producers (pgbench, 8 clients: 1,965 against 2,030
--   tps, means of 4 turns on a loaded machine). Trust is only looked up for a row that sets something
--   more, which batchd's own INSERTs never do.
-- - an UPDATE asks who runs it once per statement, not per row (batchd.trusted_writer_now, below): the
--   daemon's statements that change 100,000 rows at once pay for one look, not 100,000.

-- Rows already here may hold values that no daemon statement expects, written by producers before this
-- version. They are made sane before the checks that keep them so: attempts below 0 (a job that would be
-- retried 2^31 times) become 0; the timestamps batchd computes with (now() minus them, them minus now(),
-- which no interval holds when they are infinite) or hands to Python (whose datetime holds years 1 to 9999
-- only: the flusher reads the oldest created_at) become now() when out of that range (a lease so set runs
-- out at once, as if its daemon had died, and the job is queued again), or null for not_before. Jobs keep
-- their status: attempts + 1 no longer overflows anywhere (queries.sql), so a job at the top of the range
-- fails at max_attempts with its reason, and the jobs around it go on. deadline is a producer's column and
-- may hold anything; the queries clamp it where they compute with it (0007).
--
-- plausible_time names its operators in full: it runs in every writer's INSERT (a check), under the
-- writer's search_path, and a SET clause would cost each of its six calls per row a change of settings.
CREATE FUNCTION batchd.plausible_time(t timestamptz) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT t OPERATOR(pg_catalog.>=) '0001-01-02 00:00:00+00'::pg_catalog.timestamptz
           AND t OPERATOR(pg_catalog.<=) '9999-12-30 00:00:00+00'::pg_catalog.timestamptz
$$;

UPDATE batchd.jobs
   SET attempts = greatest(attempts, 0),
       created_at = CASE WHEN batchd.plausible_time(created_at) THEN created_at ELSE now() END,
       updated_at = CASE WHEN batchd.plausible_time(updated_at) THEN updated_at ELSE now() END,
       submitted_at = CASE WHEN NOT batchd.plausible_time(submitted_at) THEN now() ELSE submitted_at END,
       completed_at = CASE WHEN NOT batchd.plausible_time(completed_at) THEN now() ELSE completed_at END,
       sync_lease_until = CASE WHEN NOT batchd.plausible_time(sync_lease_until) THEN now()
                               ELSE sync_lease_until END,
       not_before = CASE WHEN batchd.plausible_time(not_before) THEN not_before END
 WHERE attempts < 0 OR NOT batchd.plausible_time(created_at) OR NOT batchd.plausible_time(updated_at)
    OR NOT batchd.plausible_time(submitted_at) OR NOT batchd.plausible_time(completed_at)
    OR NOT batchd.plausible_time(sync_lease_until) OR NOT batchd.plausible_time(not_before);

-- And kept so, whoever writes (plausible_time of a null is null, which a check lets through). One ALTER, so
-- one scan of the table (the migration holds batchd.jobs locked until it commits anyway: deploy/README.md,
-- Upgrade).
ALTER TABLE batchd.jobs
    ADD CONSTRAINT jobs_attempts_not_negative CHECK (attempts >= 0),
    ADD CONSTRAINT jobs_times_plausible
        CHECK (batchd.plausible_time(created_at) AND batchd.plausible_time(updated_at)
               AND batchd.plausible_time(submitted_at) AND batchd.plausible_time(completed_at)
               AND batchd.plausible_time(sync_lease_until) AND batchd.plausible_time(not_before));

-- The roles that run batchd (deploy/sql/roles.sql writes its daemon here). Read through trusted_writer.
CREATE TABLE batchd.daemon_roles (
    role_name text PRIMARY KEY CHECK (role_name <> '')
);
INSERT INTO batchd.daemon_roles (role_name)
SELECT DISTINCT pg_get_userbyid(a.grantee)
  FROM pg_class AS c
 CROSS JOIN LATERAL aclexplode(c.relacl) AS a
 WHERE c.oid = 'batchd.batches'::regclass AND a.privilege_type = 'UPDATE'
   AND a.grantee <> 0 AND a.grantee <> c.relowner;

-- Only its owner writes it: the default privileges of roles.sql would give the daemon DML on it, and a
-- daemon that could name roles here could make a producer trusted.
DO $$
DECLARE
    grantee oid;
BEGIN
    FOR grantee IN SELECT DISTINCT a.grantee FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a
                    WHERE c.oid = 'batchd.daemon_roles'::regclass
                      AND a.grantee <> c.relowner AND a.grantee <> 0
    LOOP
        EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON batchd.daemon_roles FROM %I',
                       pg_get_userbyid(grantee));
    END LOOP;
END
$$;

-- Whether `who` may write any column of batchd.jobs: the table's owner or a member of it (superusers are
-- members of every role), or a member of a role named in batchd.daemon_roles (a name no role has is no
-- one). SECURITY DEFINER so that it reads batchd.daemon_roles for callers who cannot; it answers for the
-- role it is given (callers pass current_user), and says nothing worth hiding.
CREATE FUNCTION batchd.trusted_writer(who name) RETURNS boolean LANGUAGE sql STABLE
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_has_role(who, c.relowner, 'MEMBER')
           OR EXISTS (SELECT 1 FROM batchd.daemon_roles AS d JOIN pg_roles AS r ON r.rolname = d.role_name
                       WHERE pg_has_role(who, r.oid, 'MEMBER'))
      FROM pg_class AS c
     WHERE c.oid = 'batchd.jobs'::regclass
$$;

-- The same question for a trigger's WHEN, asked once per statement. A WHEN clause is prepared (and its
-- constant parts folded) once each time a statement runs; declared IMMUTABLE with no argument, this is
-- folded there, so the daemon's UPDATEs look once, not once per row (a look per row made a 50,000-row UPDATE
-- a third slower). It is correct there because a statement runs as one role from start to end (a nested
-- statement, such as one in a SECURITY DEFINER function, is prepared anew). Nowhere else: a cached plan
-- would keep its answer after a SET ROLE. Use batchd.trusted_writer(current_user).
CREATE FUNCTION batchd.trusted_writer_now() RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT batchd.trusted_writer(current_user)
$$;

-- These three run on behalf of any role that writes batchd.jobs (a function in a check or a trigger's WHEN
-- needs the writer's EXECUTE privilege), and say nothing worth hiding: anyone may call them (roles.sql keeps
-- this; without it, a producer's every INSERT would be refused for want of plausible_time).
GRANT EXECUTE ON FUNCTION batchd.trusted_writer(name), batchd.trusted_writer_now(),
    batchd.plausible_time(timestamptz) TO PUBLIC;

-- INSERT. The row is compared with what a plain INSERT would have made of it: a column the producer may not
-- set must hold its default (status 'queued', attempts 0, created_at and updated_at now(), the rest null),
-- and id and seq must not be given at all (the trigger makes them: their defaults are gone). A value equal
-- to its default is let through, being indistinguishable from it and harmless. The first column found
-- otherwise is named in the refusal, unless the writer is trusted. SQLSTATE 42501 (insufficient_privilege):
-- what a missing grant would give. Runs as the caller: nextval needs USAGE on the sequence, which
-- roles.sql grants producers. Its search_path is its own: a writer's could otherwise put a now() or an
-- operator of the writer's making before pg_catalog's (measured: no cost above the noise). When a later
-- migration adds a column to batchd.jobs, it adds it here too (tests/test_producer_trust.py tries every
-- column of the table, and fails on one it does not know).
ALTER TABLE batchd.jobs ALTER COLUMN id DROP DEFAULT, ALTER COLUMN seq DROP DEFAULT;

CREATE FUNCTION batchd.jobs_guard_insert() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    forged text;
BEGIN
    IF NEW.id IS NULL THEN
        NEW.id := gen_random_uuid();
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

CREATE TRIGGER jobs_guard_insert BEFORE INSERT ON batchd.jobs
    FOR EACH ROW EXECUTE FUNCTION batchd.jobs_guard_insert();

-- UPDATE. A writer that is not trusted may change the status to 'canceled' (jobs_status_changed, which
-- fires after this trigger, still allows that of a queued job only) and nothing else, whatever UPDATE
-- privileges it holds: this replaces 0004's jobs_status_refused, which stood aside for any role with UPDATE
-- on the whole table. Every column is compared, those that later migrations add included. The trigger's
-- name sorts before jobs_status_changed, so it sees the row as the UPDATE wrote it.
CREATE FUNCTION batchd.jobs_guard_update() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    changed text;
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status AND NEW.status IS DISTINCT FROM 'canceled' THEN
        RAISE EXCEPTION 'a producer may only cancel a job, not set its status to %', NEW.status
            USING ERRCODE = 'insufficient_privilege', COLUMN = 'status', TABLE = 'jobs', SCHEMA = 'batchd',
                  HINT = 'UPDATE batchd.jobs SET status = ''canceled'' WHERE id = ... '
                         '(or batchd.cancel_job(id)) cancels a queued job; batchd sets every other status.';
    END IF;
    SELECT string_agg(n.key, ', ' ORDER BY n.key) INTO changed
      FROM jsonb_each(to_jsonb(NEW)) AS n
      JOIN jsonb_each(to_jsonb(OLD)) AS o USING (key)
     WHERE n.key <> 'status' AND n.value IS DISTINCT FROM o.value;
    IF changed IS NOT NULL THEN
        RAISE EXCEPTION 'a producer may not change batchd.jobs.% (role %)', changed, current_user
            USING ERRCODE = 'insufficient_privilege', TABLE = 'jobs', SCHEMA = 'batchd',
                  DETAIL = 'batchd alone writes ' || changed || '. No row of this UPDATE was changed.',
                  HINT = 'A producer may only cancel a queued job: UPDATE batchd.jobs '
                         'SET status = ''canceled'' WHERE id = ..., or SELECT batchd.cancel_job(id).';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_guard_update BEFORE UPDATE ON batchd.jobs
    FOR EACH ROW WHEN (NOT batchd.trusted_writer_now())
    EXECUTE FUNCTION batchd.jobs_guard_update();

DROP TRIGGER jobs_status_refused ON batchd.jobs;
DROP FUNCTION batchd.jobs_status_refused();

-- Firing a trigger needs no EXECUTE privilege; nobody needs to call these by hand.
REVOKE EXECUTE ON FUNCTION batchd.jobs_guard_insert(), batchd.jobs_guard_update() FROM PUBLIC;
