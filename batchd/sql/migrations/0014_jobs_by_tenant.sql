-- batchd's schema, version 14: a tenant's jobs in the order they were made, for `GET /v1/jobs`.
--
-- The HTTP API lists a tenant's jobs a page at a time, keyset on the job's id, which is time-ordered (a UUID
-- version 7 since 0012): each page is a range scan of this index from the cursor on, whatever the size of
-- the tenant's history or of the others'. The admin's listing of every tenant reads the primary key.
--
-- Building it holds a lock that blocks INSERTs on batchd.jobs until it is built: on a large table, migrate
-- at a quiet time.

CREATE INDEX jobs_tenant_id ON batchd.jobs (tenant_id, id);
