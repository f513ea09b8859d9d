-- Optional: per-tenant row-level security on batchd.jobs. Run as a superuser (or the owner), after roles.sql:
--
--   psql -d batchd -f deploy/sql/rls.sql [-v daemon=NAME]
--
-- The daemon's role is the one roles.sql recorded in batchd.daemon_roles unless -v daemon names another.
--
-- Once it has run, a role sees and writes only the rows of batchd.jobs that a policy gives it:
--
--   - the daemon role sees every row (a policy named after it, USING (true));
--   - each tenant's producer role sees, inserts and cancels only its tenant's rows: make one with
--     deploy/sql/tenant_producer.sql (a LOGIN role, member of batchd_producer, with a policy of its own);
--   - any other role, the shared batchd_producer included, sees no row and can insert none;
--   - the owner (the table's owner) and superusers are not subject to it: `batchd migrate` is unaffected.
--
-- Nothing else changes: batchd's other tables are closed to producers anyway (roles.sql). Single-tenant
-- deployments do not need this. Idempotent. To turn it off again (the policies stay, inert):
--
--   ALTER TABLE batchd.jobs DISABLE ROW LEVEL SECURITY;

\set ON_ERROR_STOP on
\set QUIET on
\ir daemon_role.sql

BEGIN;
SET LOCAL client_min_messages = warning;
DROP POLICY IF EXISTS :"daemon" ON batchd.jobs;
CREATE POLICY :"daemon" ON batchd.jobs TO :"daemon" USING (true) WITH CHECK (true);
ALTER TABLE batchd.jobs ENABLE ROW LEVEL SECURITY;
COMMIT;
\echo batchd: row-level security is on for batchd.jobs; :daemon sees every tenant.
