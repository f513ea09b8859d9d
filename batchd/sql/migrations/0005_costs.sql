-- batchd's schema, version 5: what each finished job cost, and per-tenant budgets.
--
-- batchd.costs is the ledger: one row per request the provider billed, written by the same statement that
-- applies the result (queries.sql, apply_results), so a job is counted when, and only when, its result is.
-- Its key is (job_id, attempt): a result applied twice (a crash between chunks, a restart) finds the row
-- there and adds nothing. Errored, canceled and expired requests are not billed by the provider and get no
-- row. The ledger has no foreign key to batchd.jobs on purpose: the money history outlives the jobs, which
-- may be pruned or truncated.

CREATE TABLE batchd.costs (
    job_id                  uuid NOT NULL,
    attempt                 integer NOT NULL,
    tenant_id               text NOT NULL,
    -- The model the provider billed (the result's `model`), and the job type, if any.
    model                   text NOT NULL,
    job_type                text,
    batch_id                uuid,
    -- How the request went: through a batch (at the batch price), or synchronously (for routing).
    via                     text NOT NULL DEFAULT 'batch' CHECK (via IN ('batch', 'sync')),
    at                      timestamptz NOT NULL DEFAULT now(),
    input_tokens            bigint NOT NULL,
    output_tokens           bigint NOT NULL,
    cache_write_5m_tokens   bigint NOT NULL,
    cache_write_1h_tokens   bigint NOT NULL,
    cache_read_tokens       bigint NOT NULL,
    -- USD, exact. Null when batchd.toml has no price for the model (the tokens are still here to reprice).
    cost_usd                numeric,
    -- What the same call would have cost through the synchronous Messages API.
    sync_cost_usd           numeric,
    PRIMARY KEY (job_id, attempt)
);
-- Reports read a time window; rows arrive in time order, so a BRIN index costs the apply almost nothing.
CREATE INDEX costs_at ON batchd.costs USING brin (at);

-- What budgets are checked against: one row per tenant per applied chunk of results, so a month's spend
-- is a few hundred rows per tenant however many jobs it ran, and the apply's chunks never wait on each
-- other for a shared counter.
CREATE TABLE batchd.spend (
    tenant_id   text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    cost_usd    numeric NOT NULL
);
CREATE INDEX spend_tenant_at ON batchd.spend (tenant_id, at);

-- Budgets, in USD, per UTC day and UTC month (null: none). Over either, a tenant's queued jobs are held
-- (`hold`: they stay queued and move on when the budget allows) or failed (`fail`). While a tenant is over
-- budget, hold_reason says why (`batchd status` shows it) and held_since since when.
ALTER TABLE batchd.tenants
    ADD COLUMN budget_day_usd   numeric CHECK (budget_day_usd >= 0),
    ADD COLUMN budget_month_usd numeric CHECK (budget_month_usd >= 0),
    ADD COLUMN over_budget      text NOT NULL DEFAULT 'hold' CHECK (over_budget IN ('hold', 'fail')),
    ADD COLUMN hold_reason      text,
    ADD COLUMN held_since       timestamptz;

-- The tenants whose jobs must not be claimed now. The flusher's claim leaves their jobs in the queue.
CREATE VIEW batchd.held_tenants AS
    SELECT name AS tenant_id, hold_reason, held_since, over_budget
      FROM batchd.tenants
     WHERE hold_reason IS NOT NULL;

-- A token count from a result's usage, for the ledger: 0 unless it is a plausible number, so that a usage
-- the provider wrote oddly can never stop a batch's results from being applied. Inlined by the planner.
CREATE FUNCTION batchd.usage_tokens(value jsonb) RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(value) = 'number' AND value::numeric BETWEEN 0 AND 1e15
                THEN trunc(value::numeric)::bigint ELSE 0 END
$$;
