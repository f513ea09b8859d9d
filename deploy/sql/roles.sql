-- batchd's database roles, least privilege. Run as a superuser, connected to batchd's database:
--
--   psql -d batchd -f deploy/sql/roles.sql                  # before the first `batchd migrate`, and
--   psql -d batchd -f deploy/sql/roles.sql                  # again after every `batchd migrate`
--
-- It is idempotent, all or nothing (one transaction), and converges batchd's objects to exactly the
-- privileges below. Optional psql variables (-v name=value):
--
--   owner, daemon, producer   the three roles' names (default batchd_owner, batchd_daemon, batchd_producer;
--                             the daemon's, once a run has recorded it in batchd.daemon_roles, that one)
--   owner_password, daemon_password, producer_password
--                             set that role's password (or leave them unset and use `\password ROLE` in psql,
--                             which never sends the password in clear; a -v value is visible in `ps`)
--
-- The roles (LOGIN roles, created when missing; the attributes of a role that exists are left alone, but
-- none of them may be a superuser or have BYPASSRLS):
--
--   owner     owns schema batchd and everything in it, and runs `batchd migrate` (DDL). It needs CREATE on
--             the database because `batchd migrate` always says CREATE SCHEMA IF NOT EXISTS. Nothing else
--             should connect as it. Objects in batchd that another role owns (a database migrated as
--             `postgres` before this script) are handed to it.
--   daemon    `batchd run` and the operator's commands (status, tenant, enqueue, cancel): SELECT, INSERT,
--             UPDATE and DELETE on batchd's tables, but only SELECT on batchd.migrations (it refuses to start
--             while a migration is pending, and records none); its functions; TEMPORARY (results are loaded
--             through a temporary table). No DDL, no TRUNCATE.
--   producer  INSERT and SELECT on batchd.jobs, UPDATE of its status column only (a cancel), and
--             batchd.cancel_job(uuid) and batchd.request_problem(jsonb); nothing on any other table. The
--             triggers on batchd.jobs do their work as the owner (migration 0004). One producer role per
--             tenant, with row-level security: deploy/sql/rls.sql and deploy/sql/tenant_producer.sql.
--             Whatever it is granted, the database lets a producer's INSERT set only tenant_id, request,
--             job_type, input, metadata, idempotency_key, deadline and route, and its UPDATE only cancel
--             (migration 0008): every role but the owner, superusers and the daemon named here (recorded
--             in batchd.daemon_roles) is a producer there.
--
-- Tables and functions that later migrations add get the daemon's privileges by default privileges, so a new
-- version runs before this script is run again; run it again for what producers may need of them.

\set ON_ERROR_STOP on
\set QUIET on
\if :{?owner}
\else
    \set owner batchd_owner
\endif
\ir daemon_role.sql
\if :{?producer}
\else
    \set producer batchd_producer
\endif

BEGIN;
SET LOCAL client_min_messages = warning;

-- The names, for the checks and loops below (psql does not interpolate inside $$ ... $$).
SELECT set_config('batchd_roles.owner', :'owner', true) AS batchd_roles_owner,
       set_config('batchd_roles.daemon', :'daemon', true) AS batchd_roles_daemon,
       set_config('batchd_roles.producer', :'producer', true) AS batchd_roles_producer \gset

DO $$
DECLARE
    names text[] := ARRAY[current_setting('batchd_roles.owner'), current_setting('batchd_roles.daemon'),
                          current_setting('batchd_roles.producer')];
    privileged text;
BEGIN
    IF (SELECT count(DISTINCT n) FROM unnest(names) AS n) <> 3 THEN
        RAISE EXCEPTION 'owner, daemon and producer must be three different roles, not %', names;
    END IF;
    SELECT string_agg(rolname, ', ') INTO privileged
      FROM pg_roles WHERE rolname = ANY (names) AND (rolsuper OR rolbypassrls);
    IF privileged IS NOT NULL THEN
        RAISE EXCEPTION 'refusing to use % for batchd: a superuser or BYPASSRLS role defeats the point', privileged;
    END IF;
END
$$;

-- The roles.
SELECT format('CREATE ROLE %I LOGIN', name)
  FROM unnest(ARRAY[:'owner', :'daemon', :'producer']) AS name
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) \gexec
\if :{?owner_password}
    ALTER ROLE :"owner" PASSWORD :'owner_password';
\endif
\if :{?daemon_password}
    ALTER ROLE :"daemon" PASSWORD :'daemon_password';
\endif
\if :{?producer_password}
    ALTER ROLE :"producer" PASSWORD :'producer_password';
\endif

-- The database.
GRANT CONNECT, CREATE ON DATABASE :"DBNAME" TO :"owner";
GRANT CONNECT, TEMPORARY ON DATABASE :"DBNAME" TO :"daemon";
GRANT CONNECT ON DATABASE :"DBNAME" TO :"producer";

-- The schema and everything in it belong to the owner.
CREATE SCHEMA IF NOT EXISTS batchd AUTHORIZATION :"owner";
DO $$
DECLARE
    owner text := current_setting('batchd_roles.owner');
    item record;
BEGIN
    EXECUTE format('ALTER SCHEMA batchd OWNER TO %I', owner);
    -- A table's indexes, and the sequences of its serial columns, follow it.
    FOR item IN SELECT oid::regclass AS name FROM pg_class
                 WHERE relnamespace = 'batchd'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'f')
                   AND relowner <> owner::regrole LOOP
        EXECUTE format('ALTER TABLE %s OWNER TO %I', item.name, owner);
    END LOOP;
    FOR item IN SELECT oid::regclass AS name FROM pg_class
                 WHERE relnamespace = 'batchd'::regnamespace AND relkind = 'S' AND relowner <> owner::regrole LOOP
        EXECUTE format('ALTER SEQUENCE %s OWNER TO %I', item.name, owner);
    END LOOP;
    FOR item IN SELECT oid::regprocedure AS name FROM pg_proc
                 WHERE pronamespace = 'batchd'::regnamespace AND proowner <> owner::regrole LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO %I', item.name, owner);
    END LOOP;
END
$$;

REVOKE ALL ON SCHEMA batchd FROM PUBLIC;
GRANT USAGE ON SCHEMA batchd TO :"daemon", :"producer";
REVOKE CREATE ON SCHEMA batchd FROM :"daemon", :"producer";

-- What the owner creates from now on (the next migrations).
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA batchd
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"daemon";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA batchd GRANT USAGE ON SEQUENCES TO :"daemon";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA batchd GRANT EXECUTE ON FUNCTIONS TO :"daemon";

-- The tables, when `batchd migrate` has made them (version 4 or later).
SELECT to_regclass('batchd.migrations') IS NOT NULL AS batchd_has_migrations \gset
\if :batchd_has_migrations
    SELECT coalesce(max(version), 0) >= 4 AS batchd_migrated FROM batchd.migrations \gset
\else
    \set batchd_migrated false
\endif

\if :batchd_migrated
    -- From scratch each time, so that a second run leaves exactly what a first one does.
    REVOKE ALL ON ALL TABLES IN SCHEMA batchd FROM PUBLIC, :"daemon", :"producer";
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA batchd FROM PUBLIC, :"daemon", :"producer";
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA batchd FROM PUBLIC, :"daemon", :"producer";

    -- The daemon: DML on every table and view of the schema (what later migrations add included, as the
    -- default privileges above give it), but only SELECT on batchd.migrations (it reads what is applied and
    -- records nothing); every function but the triggers', which fire without it.
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA batchd TO :"daemon";
    REVOKE INSERT, UPDATE, DELETE ON batchd.migrations FROM :"daemon";
    GRANT USAGE ON ALL SEQUENCES IN SCHEMA batchd TO :"daemon";
    GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA batchd TO :"daemon";
    DO $$
    DECLARE
        trigger_function regprocedure;
    BEGIN
        FOR trigger_function IN SELECT oid FROM pg_proc
                                 WHERE pronamespace = 'batchd'::regnamespace AND prorettype = 'trigger'::regtype LOOP
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %I', trigger_function,
                           current_setting('batchd_roles.daemon'));
        END LOOP;
    END
    $$;

    -- The producer: the contract in README.md, and nothing more.
    -- Table-wide INSERT: it covers the columns later migrations add, such as `route` (0007). The columns a
    -- producer may set are enforced by a trigger (0008), whatever the grants, whose refusal names the
    -- column; a column grant's says only "permission denied for table jobs".
    GRANT SELECT, INSERT ON batchd.jobs TO :"producer";
    GRANT UPDATE (status) ON batchd.jobs TO :"producer";
    GRANT USAGE ON SEQUENCE batchd.jobs_seq_seq TO :"producer";
    GRANT EXECUTE ON FUNCTION batchd.cancel_job(uuid), batchd.request_problem(jsonb) TO :"producer";

    -- Who the daemon is, for the triggers that keep producers to their columns (0008): this run's daemon,
    -- and no one else. Only the owner writes the list.
    SELECT to_regclass('batchd.daemon_roles') IS NOT NULL AS batchd_has_daemon_roles \gset
    \if :batchd_has_daemon_roles
        DELETE FROM batchd.daemon_roles;
        INSERT INTO batchd.daemon_roles (role_name) VALUES (:'daemon');
        REVOKE INSERT, UPDATE, DELETE ON batchd.daemon_roles FROM :"daemon";
        -- Predicates that run on behalf of whoever writes batchd.jobs (a check, a trigger's WHEN), and
        -- hide nothing.
        GRANT EXECUTE ON FUNCTION batchd.trusted_writer(name), batchd.trusted_writer_now(),
            batchd.plausible_time(timestamptz) TO PUBLIC;
    \endif
    -- What makes a job's id (0012), in the trigger that runs as whoever inserts.
    SELECT to_regprocedure('batchd.time_ordered_uuid()') IS NOT NULL AS batchd_has_time_ordered_uuid \gset
    \if :batchd_has_time_ordered_uuid
        GRANT EXECUTE ON FUNCTION batchd.time_ordered_uuid() TO PUBLIC;
    \endif
    \echo batchd roles: :owner owns schema batchd; :daemon and :producer have their privileges.
\else
    \echo batchd roles: the schema is not migrated yet. Run batchd migrate as :owner, then this script again
    \echo to grant :daemon and :producer their privileges on the tables.
\endif

COMMIT;
