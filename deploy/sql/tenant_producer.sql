-- A producer role for one tenant, for row-level security (deploy/sql/rls.sql). Run as a superuser:
--
--   psql -d batchd -v tenant=acme -f deploy/sql/tenant_producer.sql
--        [-v role=batchd_producer_acme] [-v producer=batchd_producer] [-v password=...]
--
-- It creates the LOGIN role (default batchd_producer_<tenant>) when missing, makes it a member of the
-- producer role (whose privileges it inherits: roles.sql) and gives it a policy on batchd.jobs, named after
-- the role, that lets it see, insert and cancel the rows whose tenant_id is the tenant's and no other.
-- Run again with another tenant, it moves the role to that tenant. Without row-level security on, the policy
-- is inert and the role is a plain producer that sees every tenant's jobs. To remove one:
--
--   DROP POLICY batchd_producer_acme ON batchd.jobs; DROP ROLE batchd_producer_acme;

\set ON_ERROR_STOP on
\set QUIET on
\if :{?tenant}
\else
    DO $$ BEGIN RAISE EXCEPTION 'name the tenant: psql -v tenant=NAME -f tenant_producer.sql'; END $$;
\endif
\if :{?role}
\else
    \set role batchd_producer_ :tenant
\endif
\if :{?producer}
\else
    \set producer batchd_producer
\endif

BEGIN;
SET LOCAL client_min_messages = warning;
SELECT set_config('batchd_roles.role', :'role', true) AS batchd_roles_role,
       set_config('batchd_roles.tenant', :'tenant', true) AS batchd_roles_tenant \gset
DO $$
DECLARE
    new_role text := current_setting('batchd_roles.role');
    trusted boolean;
BEGIN
    IF current_setting('batchd_roles.tenant') = '' THEN
        RAISE EXCEPTION 'the tenant must not be empty';
    END IF;
    IF octet_length(new_role) > 63 THEN  -- PostgreSQL would cut the name short: two tenants could share it
        RAISE EXCEPTION 'role name % is longer than 63 bytes: choose one with -v role=NAME', new_role;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = new_role AND (rolsuper OR rolbypassrls)) THEN
        RAISE EXCEPTION 'refusing to use %: a superuser or BYPASSRLS role sees every tenant', new_role;
    END IF;
    -- A member of the owner or of the daemon role writes any column of batchd.jobs (migration 0008; the
    -- question is asked dynamically, since a schema from before 0008 has no such function).
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = new_role)
       AND to_regprocedure('batchd.trusted_writer(name)') IS NOT NULL THEN
        EXECUTE 'SELECT batchd.trusted_writer($1)' INTO trusted USING new_role::name;
        IF trusted THEN
            RAISE EXCEPTION 'refusing to use %: it is a member of batchd''s owner or daemon role, which may '
                            'write every column of batchd.jobs', new_role;
        END IF;
    END IF;
END
$$;
SELECT format('CREATE ROLE %I LOGIN', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
\if :{?password}
    ALTER ROLE :"role" PASSWORD :'password';
\endif
GRANT :"producer" TO :"role";
DROP POLICY IF EXISTS :"role" ON batchd.jobs;
CREATE POLICY :"role" ON batchd.jobs TO :"role"
    USING (tenant_id = :'tenant') WITH CHECK (tenant_id = :'tenant');
SELECT relrowsecurity AS batchd_rls_on FROM pg_class WHERE oid = 'batchd.jobs'::regclass \gset
COMMIT;
\if :batchd_rls_on
    \echo batchd: :role sees only tenant :tenant in batchd.jobs.
\else
    \echo batchd: :role is the producer of tenant :tenant, but row-level security is off:
    \echo until rls.sql has run, it sees every tenant.
\endif
