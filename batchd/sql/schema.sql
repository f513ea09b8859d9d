-- batchd's schema as it stands after the last migration (0016): the whole of it, in one place, to read.
--
-- The migrations in sql/migrations/ are what builds and upgrades a database (`batchd migrate`); this file
-- says what they add up to. Each migration that changes the schema changes this file the same way, in the
-- same commit: tests/test_schema.py builds one database from this file and one from the migrations and
-- fails unless they are identical (pg_dump of both, schema and rows). Why things are as they are is told
-- in the migration that made them, named in brackets below.
--
-- Not here: the roles, their grants and row-level security (deploy/sql/), and batchd.migrations, the record
-- of what `batchd migrate` applied (queries.sql, create_migrations_table).

CREATE SCHEMA IF NOT EXISTS batchd;

-- ---- functions the tables' checks use ---------------------------------------------------------------------

-- Whether a timestamp is one batchd can compute with and hand to Python (years 1 to 9999). [0008]
CREATE FUNCTION batchd.plausible_time(t timestamptz) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT t OPERATOR(pg_catalog.>=) '0001-01-02 00:00:00+00'::pg_catalog.timestamptz
           AND t OPERATOR(pg_catalog.<=) '9999-12-30 00:00:00+00'::pg_catalog.timestamptz
$$;

-- ---- tables -----------------------------------------------------------------------------------------------

-- One row per provider batch that batchd made or is making. A batch is recorded (pending) before the API
-- is called, so that a crash or a lost response can always be reconciled against the provider's list. [0001]
CREATE TABLE batchd.batches (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Short, unique and part of every custom_id in the batch: proof that a provider batch is ours.
    tag                 text NOT NULL UNIQUE CHECK (tag ~ '^[a-z0-9]{12}$'),
    provider_batch_id   text UNIQUE,
    -- batchd/statuses.py, BatchStatus (tests/test_statuses.py compares).
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'in_progress', 'ended', 'applied', 'abandoned')),
    request_count       integer NOT NULL CHECK (request_count >= 0),
    bytes               bigint NOT NULL,
    -- The process (one id per start) responsible for the batch, until lease_until.
    owner               text,
    lease_until         timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- Set, and committed, just before a create call; cleared when the provider refused the create.
    -- Set at a restart means: the provider may or may not have made this batch.
    create_attempted_at timestamptz,
    create_attempts     integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    submitted_at        timestamptz,
    ended_at            timestamptz,
    applied_at          timestamptz,
    provider_ended_at   timestamptz,
    request_counts      jsonb,
    -- Provider batches that looked like this one but proved not to be (never adopted again).
    rejected_provider_ids text[] NOT NULL DEFAULT '{}',
    provider_deleted_at timestamptz,
    last_error          text
);

-- What producers write (tenant_id, request, job_type, input, metadata, idempotency_key, deadline, route)
-- and what batchd alone writes (every other column: the triggers jobs_guard_insert and jobs_guard_update
-- refuse anyone else, whatever the grants). [0001, 0007, 0008]
CREATE TABLE batchd.jobs (
    -- Both made by jobs_guard_insert: a column default could not tell a producer's value from its own. [0008]
    id              uuid PRIMARY KEY,
    -- Claim order: a sequence, not created_at, so that producers' clocks and ties do not matter.
    seq             bigint NOT NULL,
    tenant_id       text NOT NULL CHECK (tenant_id <> ''),
    created_at      timestamptz NOT NULL DEFAULT now(),
    request         jsonb,
    job_type        text,
    input           jsonb,
    metadata        jsonb,
    idempotency_key text,
    deadline        timestamptz,
    -- batchd/statuses.py, JobStatus (tests/test_statuses.py compares). `sending`: a sync job whose Messages
    -- API call is in flight. [0007]
    status          text NOT NULL DEFAULT 'queued'
                    CONSTRAINT jobs_status_check
                    CHECK (status IN ('queued', 'submitting', 'submitted', 'sending', 'succeeded', 'failed', 'canceled')),
    attempts        integer NOT NULL DEFAULT 0,
    batch_id        uuid REFERENCES batchd.batches (id),
    -- The Messages API params as sent (rendered from the job type's template; null for raw requests).
    params          jsonb,
    result          jsonb,
    error           jsonb,
    usage           jsonb,
    submitted_at    timestamptz,
    completed_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- How the job wants to go: a batch (half the price), the synchronous Messages API, or `auto`: a batch
    -- unless its deadline cannot be met that way. [0007]
    route           text NOT NULL DEFAULT 'batch' CHECK (route IN ('batch', 'sync', 'auto')),
    -- Which path the job took, and why: set by the daemon when it decides. Null while undecided.
    path            text CHECK (path IN ('batch', 'sync')),
    path_reason     text,
    -- The sync path's lease: the process sending the job, and until when.
    sync_owner      text,
    sync_lease_until timestamptz,
    -- A sync job refused for a passing reason is not sent again before this time.
    not_before      timestamptz,
    CONSTRAINT jobs_request_or_job_type CHECK ((request IS NULL) <> (job_type IS NULL)),
    CONSTRAINT jobs_input_with_job_type CHECK (input IS NULL OR job_type IS NOT NULL),
    CONSTRAINT jobs_batch_when_in_flight CHECK (status NOT IN ('submitting', 'submitted') OR batch_id IS NOT NULL),
    CONSTRAINT jobs_attempts_not_negative CHECK (attempts >= 0),
    CONSTRAINT jobs_times_plausible
        CHECK (batchd.plausible_time(created_at) AND batchd.plausible_time(updated_at)
               AND batchd.plausible_time(submitted_at) AND batchd.plausible_time(completed_at)
               AND batchd.plausible_time(sync_lease_until) AND batchd.plausible_time(not_before))
);
CREATE SEQUENCE batchd.jobs_seq_seq OWNED BY batchd.jobs.seq;

-- Every state change a client cares about, written in the transaction that makes it. Streams are served by
-- seq (the admin's) and tenant_seq (a tenant's), which batchd.publish_events gives out in commit order.
-- [0001, 0003, 0009]
CREATE TABLE batchd.events (
    id          bigserial PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    type        text NOT NULL,
    tenant_id   text,
    job_id      uuid,
    batch_id    uuid,
    data        jsonb NOT NULL DEFAULT '{}',
    seq         bigint,
    -- Set by the publisher: grows with seq, so retention cuts a prefix.
    published_at timestamptz,
    -- The event's number among its tenant's events: gap-free per tenant, growing with seq.
    tenant_seq  bigint
);

-- When producers' INSERTs should wake the daemon (the trigger jobs_inserted reads it), and whether any
-- max_queued is set anywhere. One row. [0001, 0006]
CREATE TABLE batchd.wakeup (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    armed       boolean NOT NULL DEFAULT true,
    wake_seq    bigint NOT NULL DEFAULT 0,
    queue_limited boolean NOT NULL DEFAULT false
);

-- Tenants: their budgets (USD per UTC day and month; over either, their queued jobs are held or failed)
-- and their limits (set with `batchd tenant set`; batchd.toml's are in batchd.configured_limits).
-- [0002, 0005, 0006]
CREATE TABLE batchd.tenants (
    name        text PRIMARY KEY CHECK (name <> ''),
    created_at  timestamptz NOT NULL DEFAULT now(),
    budget_day_usd   numeric CHECK (budget_day_usd >= 0),
    budget_month_usd numeric CHECK (budget_month_usd >= 0),
    over_budget      text NOT NULL DEFAULT 'hold' CHECK (over_budget IN ('hold', 'fail')),
    hold_reason      text,
    held_since       timestamptz,
    weight        integer CHECK (weight BETWEEN 1 AND 10000),
    max_queued    bigint CHECK (max_queued >= 0),
    max_in_flight bigint CHECK (max_in_flight >= 0)
);

-- Tenants' API tokens, stored only as their SHA-256. [0002]
CREATE TABLE batchd.tokens (
    id            bigserial PRIMARY KEY,
    tenant_id     text NOT NULL REFERENCES batchd.tenants (name),
    token_sha256  bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

-- The head of the event log: the highest seq given out, and where tenants' counts started. One row.
-- [0003, 0009]
CREATE TABLE batchd.event_log (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- The highest seq given out; every seq from 1 to here was given to exactly one event.
    published_seq   bigint NOT NULL DEFAULT 0,
    -- The head at the upgrade to 0009 (0 on a database made since): tenant ids up to it were seq values.
    tenant_seq_base bigint NOT NULL DEFAULT 0
);

-- Each tenant's share of a batch, written when the batch is submitted. [0003]
CREATE TABLE batchd.batch_tenants (
    batch_id    uuid NOT NULL REFERENCES batchd.batches (id) ON DELETE CASCADE,
    tenant_id   text NOT NULL,
    requests    integer NOT NULL CHECK (requests > 0),
    PRIMARY KEY (batch_id, tenant_id)
);

-- The cost ledger: one row per request the provider billed, keyed by (job_id, attempt) so nothing is
-- counted twice; no foreign key to batchd.jobs: the money history outlives the jobs. [0005]
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

-- batchd.toml's limits as the last daemon to start read them: tenant_id '' holds [tenant_defaults], the
-- other rows [tenants.NAME]. [0006]
CREATE TABLE batchd.configured_limits (
    tenant_id     text PRIMARY KEY,
    weight        integer CHECK (weight BETWEEN 1 AND 10000),
    max_queued    bigint CHECK (max_queued >= 0),
    max_in_flight bigint CHECK (max_in_flight >= 0)
);

-- The roles that run batchd (deploy/sql/roles.sql writes its daemon here); written by its owner only.
-- [0008]
CREATE TABLE batchd.daemon_roles (
    role_name text PRIMARY KEY CHECK (role_name <> '')
);

-- Each tenant's last tenant_seq given out; written only by the publisher. [0009]
CREATE TABLE batchd.tenant_event_log (
    tenant_id       text PRIMARY KEY,
    published_seq   bigint NOT NULL
);

-- Each daemon's [pricing] table as it published it at start, a *price set* named by a digest of its
-- contents; apply_results joins the set of the daemon applying. Sets are never removed by batchd. [0010]
CREATE TABLE batchd.price_sets (
    id           text PRIMARY KEY,  -- pricing.PriceSet: a digest of batch_factor and every row below
    batch_factor numeric NOT NULL CHECK (batch_factor > 0 AND batch_factor <= 1),
    published_at timestamptz NOT NULL DEFAULT now()
);

-- USD per million tokens through the synchronous API, one row per model of a set; long_* is the model's
-- long-prompt tier, all null when it has none. [0010]
CREATE TABLE batchd.prices (
    price_set     text NOT NULL REFERENCES batchd.price_sets ON DELETE CASCADE,
    model         text NOT NULL,
    input         numeric NOT NULL CHECK (input >= 0),
    output        numeric NOT NULL CHECK (output >= 0),
    write_5m      numeric NOT NULL CHECK (write_5m >= 0),
    write_1h      numeric NOT NULL CHECK (write_1h >= 0),
    read          numeric NOT NULL CHECK (read >= 0),
    long_above    bigint CHECK (long_above >= 1),
    long_input    numeric CHECK (long_input >= 0),
    long_output   numeric CHECK (long_output >= 0),
    long_write_5m numeric CHECK (long_write_5m >= 0),
    long_write_1h numeric CHECK (long_write_1h >= 0),
    long_read     numeric CHECK (long_read >= 0),
    PRIMARY KEY (price_set, model),
    CHECK (num_nulls(long_above, long_input, long_output, long_write_5m, long_write_1h, long_read) IN (0, 6))
);

-- What statements that finish jobs add to the rollups: one row per group per statement, in the statement
-- that finishes them; `path` is the path the job took ('' when it never went), `model` the billed model (''
-- when not billed); `jobs` counts jobs, `billed` ledger rows, whose tokens and USD the rest sum, `unpriced`
-- billed rows without a price. Only ever inserted; the fold (rollups.py) moves them to batchd.rollups. [0012]
CREATE TABLE batchd.tallies (
    at                      timestamptz NOT NULL DEFAULT now(),
    tenant_id               text NOT NULL,
    status                  text NOT NULL CHECK (status IN ('succeeded', 'failed', 'canceled')),
    path                    text NOT NULL DEFAULT '',
    job_type                text NOT NULL DEFAULT '',
    model                   text NOT NULL DEFAULT '',
    jobs                    bigint NOT NULL DEFAULT 0,
    billed                  bigint NOT NULL DEFAULT 0,
    input_tokens            bigint NOT NULL DEFAULT 0,
    output_tokens           bigint NOT NULL DEFAULT 0,
    cache_write_5m_tokens   bigint NOT NULL DEFAULT 0,
    cache_write_1h_tokens   bigint NOT NULL DEFAULT 0,
    cache_read_tokens       bigint NOT NULL DEFAULT 0,
    cost_usd                numeric NOT NULL DEFAULT 0,
    sync_cost_usd           numeric NOT NULL DEFAULT 0,
    unpriced                bigint NOT NULL DEFAULT 0
);

-- The tallies folded: per UTC hour ('hour'), per UTC day ('day'), per week from Monday, UTC ('week'), for
-- all time ('all', start '-infinity'), and per tenant and UTC day with the rest of the key folded
-- ('tenant_day': status, path, job_type and model ''), which budgets read. Hour rows go with the ledger's
-- retention; the rest are kept. [0012]
CREATE TABLE batchd.rollups (
    span                    text NOT NULL CHECK (span IN ('hour', 'day', 'week', 'all', 'tenant_day')),
    start                   timestamptz NOT NULL,
    tenant_id               text NOT NULL,
    status                  text NOT NULL,
    path                    text NOT NULL,
    job_type                text NOT NULL,
    model                   text NOT NULL,
    jobs                    bigint NOT NULL,
    billed                  bigint NOT NULL,
    input_tokens            bigint NOT NULL,
    output_tokens           bigint NOT NULL,
    cache_write_5m_tokens   bigint NOT NULL,
    cache_write_1h_tokens   bigint NOT NULL,
    cache_read_tokens       bigint NOT NULL,
    cost_usd                numeric NOT NULL,
    sync_cost_usd           numeric NOT NULL,
    unpriced                bigint NOT NULL,
    PRIMARY KEY (span, start, tenant_id, status, path, job_type, model)
);

-- The daemons running on this database, one row each (per start of `batchd run`: `instance_id` is the
-- batches' `owner`), upserted at start and with every lease renewal (`heartbeat_at`, every `heartbeat_s`),
-- with the API's state as the daemon last found it; deleted when the daemon stops, pruned a day after its
-- last heartbeat when it died. [0013]
CREATE TABLE batchd.instances (
    instance_id     text PRIMARY KEY CHECK (length(instance_id) BETWEEN 1 AND 200),
    host            text NOT NULL,
    pid             integer NOT NULL,
    version         text NOT NULL,
    started_at      timestamptz NOT NULL,
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_s     double precision NOT NULL CHECK (heartbeat_s > 0),
    api_url         text NOT NULL,
    api_state       text NOT NULL CHECK (api_state IN ('unchecked', 'ok', 'refused', 'unreachable')),
    api_checked_at  timestamptz,
    api_reason      text
);

-- The queue over time: per UTC minute, hour and day, per tenant with queued jobs and for every tenant
-- together (tenant_id ''), the samples taken in it (flow.py), the queued jobs summed over them and their
-- maximum, the oldest wait's maximum, and ('' rows) the routing p90 in use summed. Minute rows go after
-- `retention.flow_minutes_s`, hour rows with the hourly rollups; day rows are kept. [0015]
CREATE TABLE batchd.flow (
    span                text NOT NULL CHECK (span IN ('minute', 'hour', 'day')),
    start               timestamptz NOT NULL,
    tenant_id           text NOT NULL,
    samples             integer NOT NULL,
    queued_sum          bigint NOT NULL,
    queued_max          bigint NOT NULL,
    oldest_max_s        double precision NOT NULL,
    routing_p90_sum_s   double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (span, start, tenant_id)
);

-- When the queue was last sampled: one row, the sampler's gate (one daemon per interval). [0015]
CREATE TABLE batchd.flow_clock (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    sampled_at  timestamptz NOT NULL
);

-- Batch turnaround (created to finished) of the jobs each applied chunk finished, per tenant and log-scale
-- bucket (batchd.turnaround_bucket); the fold (rollups.py) moves them to batchd.turnarounds. [0015]
CREATE TABLE batchd.turnaround_tallies (
    at          timestamptz NOT NULL DEFAULT now(),
    tenant_id   text NOT NULL,
    bucket      smallint NOT NULL CHECK (bucket BETWEEN 0 AND 79),
    jobs        bigint NOT NULL
);

-- The turnaround tallies folded per UTC minute, hour and day: kept as batchd.flow's rows are. [0015]
CREATE TABLE batchd.turnarounds (
    span        text NOT NULL CHECK (span IN ('minute', 'hour', 'day')),
    start       timestamptz NOT NULL,
    tenant_id   text NOT NULL,
    bucket      smallint NOT NULL CHECK (bucket BETWEEN 0 AND 79),
    jobs        bigint NOT NULL,
    PRIMARY KEY (span, start, tenant_id, bucket)
);

-- A tenant's webhook endpoints: where its events are sent, signed with its secret (`whsec_` + base64, which
-- batchd signs with, so it is kept as is; only the daemon's role may read the table). [0016]
CREATE TABLE batchd.webhook_endpoints (
    id              bigserial PRIMARY KEY,
    tenant_id       text NOT NULL CHECK (tenant_id <> ''),
    url             text NOT NULL CHECK (url ~* '^https?://' AND length(url) <= 2048),
    secret          text NOT NULL CHECK (secret ~ '^whsec_[A-Za-z0-9+/]+=*$'),
    -- The event types delivered; null: every type.
    event_types     text[] CHECK (cardinality(event_types) > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Events up to this seq (the log's head when the endpoint was added) are not delivered to it.
    after_seq       bigint NOT NULL,
    -- Set when batchd stops delivering to it (a run of failures, webhooks.py); cleared by `webhook retry`.
    disabled_at     timestamptz,
    disabled_reason text,
    -- Failed attempts since the last success, and when that run of failures began.
    failures        integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    failing_since   timestamptz,
    last_success_at timestamptz
);

-- One message to one endpoint: the body as signed, fixed at enqueue (every retry sends the same bytes under
-- the same webhook-id), and its delivery's state; claimed with a lease, so a daemon killed mid-request
-- leaves it to be sent again. [0016]
CREATE TABLE batchd.webhook_deliveries (
    id               bigserial PRIMARY KEY,
    endpoint_id      bigint NOT NULL REFERENCES batchd.webhook_endpoints (id) ON DELETE CASCADE,
    event_seq        bigint NOT NULL,
    message_id       text NOT NULL,
    event_type       text NOT NULL,
    body             text NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- When it may be tried (again); while an attempt runs, when its lease ends.
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- The daemon trying it now, until lease_until; an attempt's outcome is written only by its claimant.
    owner            text,
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    first_attempt_at timestamptz,
    last_attempt_at  timestamptz,
    -- The last attempt's HTTP status (null: no response) and why it failed.
    last_status      integer,
    last_error       text,
    finished_at      timestamptz,
    UNIQUE (endpoint_id, event_seq)
);

-- The webhook enqueuer's cursor over the published events: every event with seq up to enqueued_seq has its
-- deliveries; the pruner keeps the events past it. One row. [0016]
CREATE TABLE batchd.webhook_log (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    enqueued_seq bigint NOT NULL
);

-- The one row of each singleton table.
INSERT INTO batchd.wakeup DEFAULT VALUES;
INSERT INTO batchd.event_log DEFAULT VALUES;
INSERT INTO batchd.flow_clock (one, sampled_at) VALUES (true, '-infinity');
INSERT INTO batchd.webhook_log (enqueued_seq) SELECT published_seq FROM batchd.event_log;

-- ---- indexes ----------------------------------------------------------------------------------------------

CREATE INDEX batches_open ON batchd.batches (status) WHERE status IN ('pending', 'in_progress', 'ended');
-- The recent batches the turnaround is measured on. [0007]
CREATE INDEX batches_applied_at ON batchd.batches (applied_at) WHERE applied_at IS NOT NULL;

-- A producer that retries its INSERT ... ON CONFLICT DO NOTHING makes no duplicate.
CREATE UNIQUE INDEX jobs_idempotency_key ON batchd.jobs (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The claim reads queued rows only: a partial index keeps it fast under a large finished history.
CREATE INDEX jobs_queued ON batchd.jobs (seq) WHERE status = 'queued';
CREATE INDEX jobs_queued_deadline ON batchd.jobs (deadline) WHERE status = 'queued' AND deadline IS NOT NULL;
CREATE INDEX jobs_batch ON batchd.jobs (batch_id) WHERE batch_id IS NOT NULL;
-- Jobs not finished, per tenant and status: as many entries as the work in flight (finished jobs are
-- counted by the rollups). [0012, replacing 0001's jobs_tenant_status on every job]
CREATE INDEX jobs_live ON batchd.jobs (tenant_id, status)
    WHERE status IN ('queued', 'submitting', 'submitted', 'sending');
-- The pruner reads finished jobs oldest first, per status. [0012]
CREATE INDEX jobs_finished ON batchd.jobs (status, completed_at)
    WHERE status IN ('succeeded', 'failed', 'canceled');
-- The fair claim skips through this one per tenant, and reads each tenant's queue head from it. [0006]
CREATE INDEX jobs_queued_tenant ON batchd.jobs (tenant_id, seq) WHERE status = 'queued';
-- The sync sender's reads: queued jobs that may not batch, nearest deadline first. [0007]
CREATE INDEX jobs_queued_routed ON batchd.jobs (deadline, seq) WHERE status = 'queued' AND route <> 'batch';
-- Jobs in flight through the Messages API, for lease renewal and taking back a dead daemon's. [0007]
CREATE INDEX jobs_sending ON batchd.jobs (sync_lease_until) WHERE status = 'sending';
-- A tenant's jobs in the order they were made: `GET /v1/jobs` pages through it by id. [0014]
CREATE INDEX jobs_tenant_id ON batchd.jobs (tenant_id, id);

CREATE UNIQUE INDEX events_seq ON batchd.events (seq);
CREATE INDEX events_unpublished ON batchd.events (id) WHERE seq IS NULL;
-- A tenant's replay reads by tenant_seq; a resume looks up the event after the client's id. [0009]
CREATE UNIQUE INDEX events_tenant ON batchd.events (tenant_id, tenant_seq);
-- Time windows (retention, `batchd status`) follow published_at. [0003]
CREATE INDEX events_published_at ON batchd.events (published_at);

-- Reports read a time window; rows arrive in time order, so a BRIN index costs the apply almost nothing.
CREATE INDEX costs_at ON batchd.costs USING brin (at);
-- Old batches go when their jobs have gone; budgets read one tenant's days of a month. [0012]
CREATE INDEX rollups_tenant ON batchd.rollups (tenant_id, span, start);
CREATE INDEX batches_finished ON batchd.batches (created_at) WHERE status IN ('applied', 'abandoned');
-- A tenant's endpoints; an endpoint's due deliveries and those in flight (pending rows only: the size of
-- the work in flight, never of the history); finished deliveries oldest first, for the pruner. [0016]
CREATE INDEX webhook_endpoints_tenant ON batchd.webhook_endpoints (tenant_id);
CREATE INDEX webhook_deliveries_due ON batchd.webhook_deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_finished ON batchd.webhook_deliveries (finished_at)
    WHERE status <> 'pending';

-- ---- views ------------------------------------------------------------------------------------------------

-- The tenants whose jobs must not be claimed now. The flusher's claim leaves their jobs in the queue. [0005]
CREATE VIEW batchd.held_tenants AS
    SELECT name AS tenant_id, hold_reason, held_since, over_budget
      FROM batchd.tenants
     WHERE hold_reason IS NOT NULL;

-- What budgets are checked against: each tenant's cost per UTC day from the rollups, and what the tallies
-- not yet folded add (budgets' windows are whole UTC days and months: exact). [0012, replacing 0005's table]
CREATE VIEW batchd.spend AS
SELECT tenant_id, start AS at, cost_usd FROM batchd.rollups WHERE span = 'tenant_day'
UNION ALL
SELECT tenant_id, at, cost_usd FROM batchd.tallies;

-- An event as a stream sends it: its columns and its data as one JSON text. [0011]
CREATE VIEW batchd.event_envelopes AS
SELECT seq, tenant_seq, type, tenant_id, job_id, batch_id,
       (jsonb_strip_nulls(jsonb_build_object('type', type, 'job_id', job_id, 'tenant', tenant_id,
                                             'batch_id', batch_id, 'at', created_at)) || data)::text AS data
  FROM batchd.events;

-- ---- functions --------------------------------------------------------------------------------------------

-- Why a raw request cannot be sent in a batch, or null. [0001]
CREATE FUNCTION batchd.request_problem(request jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(request) <> 'object' THEN 'request must be a JSON object of Messages API params'
        WHEN NOT request ? 'model' THEN 'request lacks model'
        WHEN jsonb_typeof(request -> 'model') <> 'string' THEN 'request.model must be a string'
        WHEN NOT request ? 'max_tokens' THEN 'request lacks max_tokens'
        WHEN jsonb_typeof(request -> 'max_tokens') <> 'number'
             OR (request ->> 'max_tokens')::numeric <> trunc((request ->> 'max_tokens')::numeric)
             THEN 'request.max_tokens must be an integer'
        WHEN (request ->> 'max_tokens')::numeric < 1 THEN 'request.max_tokens must be at least 1 in a batch'
        WHEN NOT request ? 'messages' THEN 'request lacks messages'
        WHEN jsonb_typeof(request -> 'messages') <> 'array' OR jsonb_array_length(request -> 'messages') = 0
             THEN 'request.messages must be a non-empty array'
        WHEN request ? 'stream' AND request -> 'stream' <> 'false'::jsonb
             THEN 'request.stream is not allowed in a batch'
    END
$$;

-- A producer cancels a queued job with UPDATE ... SET status = 'canceled' or batchd.cancel_job(id). [0001]
CREATE FUNCTION batchd.cancel_job(job uuid) RETURNS boolean LANGUAGE sql AS $$
    WITH canceled AS (
        UPDATE batchd.jobs SET status = 'canceled' WHERE id = job AND status = 'queued' RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM canceled)
$$;

-- Publishes up to `max_events` committed events, numbering each with seq and its tenant's tenant_seq;
-- returns how many. Must run in READ COMMITTED. [0003, 0009]
CREATE FUNCTION batchd.publish_events(max_events integer) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    head        bigint;
    base        bigint;
    published   integer;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'batchd.publish_events must run in READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    SELECT published_seq, tenant_seq_base INTO head, base FROM batchd.event_log FOR UPDATE;
    -- One statement, so one snapshot (taken after the lock): `pending` is read once (a CTE used twice is
    -- materialized), and each tenant's counter moves by exactly the events numbered for it.
    WITH pending AS (
        SELECT id, tenant_id, head + row_number() OVER (ORDER BY id) AS seq
          FROM batchd.events
         WHERE seq IS NULL
         ORDER BY id
         LIMIT max_events
    ), numbered AS (
        SELECT id, tenant_id, seq,
               row_number() OVER (PARTITION BY tenant_id ORDER BY seq) AS n,
               count(*) OVER (PARTITION BY tenant_id) AS total
          FROM pending
    ), tenant_heads AS (
        INSERT INTO batchd.tenant_event_log AS l (tenant_id, published_seq)
        SELECT tenant_id, base + count(*) FROM pending WHERE tenant_id IS NOT NULL GROUP BY tenant_id
            ON CONFLICT (tenant_id) DO UPDATE SET published_seq = l.published_seq + (excluded.published_seq - base)
        RETURNING tenant_id, published_seq
    )
    UPDATE batchd.events AS e
       SET seq = numbered.seq,
           tenant_seq = tenant_heads.published_seq - numbered.total + numbered.n,
           published_at = clock_timestamp()
      FROM numbered
      LEFT JOIN tenant_heads ON tenant_heads.tenant_id = numbered.tenant_id
     WHERE e.id = numbered.id;
    GET DIAGNOSTICS published = ROW_COUNT;
    IF published > 0 THEN
        UPDATE batchd.event_log SET published_seq = head + published;
        PERFORM pg_notify('batchd_published', (head + published)::text);
    END IF;
    RETURN published;
END
$$;

-- A token count from a result's usage, for the ledger: 0 unless it is a plausible number. [0005]
CREATE FUNCTION batchd.usage_tokens(value jsonb) RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(value) = 'number' AND value::numeric BETWEEN 0 AND 1e15
                THEN trunc(value::numeric)::bigint ELSE 0 END
$$;

-- A tenant's limits in force: `batchd tenant set`, else batchd.toml's [tenants.NAME], else its defaults.
-- [0006]
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

-- The batch path's turnaround (p90 of the last `window_n` applied batches, or `prior_s`). [0007]
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

-- The routing rule, in one place: may this queued job go into a batch now? [0007]
CREATE FUNCTION batchd.batch_bound(route text, path text, deadline timestamptz, threshold_s float8)
RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT route = 'batch'
           OR (route = 'auto' AND path IS DISTINCT FROM 'sync'
               AND (deadline IS NULL OR deadline >= now() + make_interval(secs => threshold_s)))
$$;

-- Why a job takes its path, as recorded in batchd.jobs.path_reason. [0007]
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

-- Whether `who` may write any column of batchd.jobs (its owner or a member, or a member of a role in
-- batchd.daemon_roles). [0008]
CREATE FUNCTION batchd.trusted_writer(who name) RETURNS boolean LANGUAGE sql STABLE
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_has_role(who, c.relowner, 'MEMBER')
           OR EXISTS (SELECT 1 FROM batchd.daemon_roles AS d JOIN pg_roles AS r ON r.rolname = d.role_name
                       WHERE pg_has_role(who, r.oid, 'MEMBER'))
      FROM pg_class AS c
     WHERE c.oid = 'batchd.jobs'::regclass
$$;

-- The same question for a trigger's WHEN, asked once per statement: nowhere else (see 0008). [0008]
CREATE FUNCTION batchd.trusted_writer_now() RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT batchd.trusted_writer(current_user)
$$;

-- What the rollups and the tallies not yet folded say, from the UTC hour of `since` on (null: all time), for
-- one tenant (null: every tenant): the rollup rows that cover it (whole days as day rows, the hours before
-- the first whole day as hour rows) and the tallies since that hour, unsummed. Every reader of totals
-- reads this, so its cost is the rollups' rows, whatever the history's size. A plain SQL function, inlined
-- into the query that calls it. [0012]
CREATE FUNCTION batchd.totals_since(since timestamptz, tenant text)
RETURNS TABLE (tenant_id text, status text, path text, job_type text, model text, jobs bigint, billed bigint,
               input_tokens bigint, output_tokens bigint, cache_write_5m_tokens bigint,
               cache_write_1h_tokens bigint, cache_read_tokens bigint, cost_usd numeric, sync_cost_usd numeric,
               unpriced bigint)
LANGUAGE sql STABLE AS $$
    -- Since the UTC hour of `since`: hour rows up to its first whole day, day rows up to its first whole week
    -- (Monday), week rows from there on (the current week's row holds the week so far). Each branch is one
    -- range of an index; a branch whose condition on `since` is false is skipped whole (a one-time filter),
    -- however the plan was made.
    WITH hours AS MATERIALIZED (
        SELECT h.hour, CASE WHEN h.day = h.hour THEN h.day ELSE h.day + interval '1 day' END AS whole_days
          FROM (SELECT date_trunc('hour', since AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
                       date_trunc('day', since AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS day) AS h
    ), bounds AS MATERIALIZED (
        SELECT hours.hour, hours.whole_days,
               CASE WHEN w.week = hours.whole_days THEN w.week ELSE w.week + interval '7 days' END AS whole_weeks
          FROM hours
         CROSS JOIN LATERAL (
            SELECT date_trunc('week', hours.whole_days AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS week
         ) AS w
    ), rows AS (
        SELECT r.* FROM batchd.rollups AS r
         WHERE since IS NULL AND r.span = 'all' AND r.start = '-infinity'
           AND (tenant IS NULL OR r.tenant_id = tenant)
        UNION ALL
        SELECT r.* FROM batchd.rollups AS r
         WHERE since IS NOT NULL AND r.span = 'week' AND r.start >= (SELECT whole_weeks FROM bounds)
           AND (tenant IS NULL OR r.tenant_id = tenant)
        UNION ALL
        SELECT r.* FROM batchd.rollups AS r
         WHERE since IS NOT NULL AND r.span = 'day' AND r.start >= (SELECT whole_days FROM bounds)
           AND r.start < (SELECT whole_weeks FROM bounds) AND (tenant IS NULL OR r.tenant_id = tenant)
        UNION ALL
        SELECT r.* FROM batchd.rollups AS r
         WHERE since IS NOT NULL AND r.span = 'hour' AND r.start >= (SELECT hour FROM bounds)
           AND r.start < (SELECT whole_days FROM bounds) AND (tenant IS NULL OR r.tenant_id = tenant)
    )
    SELECT r.tenant_id, r.status, r.path, r.job_type, r.model, r.jobs, r.billed, r.input_tokens, r.output_tokens,
           r.cache_write_5m_tokens, r.cache_write_1h_tokens, r.cache_read_tokens, r.cost_usd, r.sync_cost_usd,
           r.unpriced
      FROM rows AS r
    UNION ALL
    SELECT t.tenant_id, t.status, t.path, t.job_type, t.model, t.jobs, t.billed, t.input_tokens, t.output_tokens,
           t.cache_write_5m_tokens, t.cache_write_1h_tokens, t.cache_read_tokens, t.cost_usd, t.sync_cost_usd,
           t.unpriced
      FROM batchd.tallies AS t
     WHERE (tenant IS NULL OR t.tenant_id = tenant)
       AND (since IS NULL OR t.at >= (SELECT hour FROM bounds))
$$;

-- Jobs per tenant and status, for all time: those in flight counted on jobs_live (which holds only them),
-- finished ones from the rollups and the tallies (batchd.totals_since): `batchd status`, `batchd tenant
-- list` and /metrics count them so, at a cost that follows the work in flight, not the history. Inlined. [0013]
CREATE FUNCTION batchd.job_counts()
RETURNS TABLE (tenant_id text, status text, jobs bigint)
LANGUAGE sql STABLE AS $$
    SELECT counted.tenant_id, counted.status, sum(counted.jobs)::bigint
      FROM (SELECT j.tenant_id, j.status, count(*) AS jobs
              FROM batchd.jobs AS j
             WHERE j.status IN ('queued', 'submitting', 'submitted', 'sending')
             GROUP BY j.tenant_id, j.status
            UNION ALL
            SELECT t.tenant_id, t.status, t.jobs FROM batchd.totals_since(NULL, NULL) AS t) AS counted
     GROUP BY counted.tenant_id, counted.status
$$;

-- A turnaround's bucket: bucket b holds 2^(b/4) s up to 2^((b+1)/4) s, bucket 0 everything shorter, bucket 79
-- everything longer (flow.py reads percentiles from the bounds). [0015]
CREATE FUNCTION batchd.turnaround_bucket(seconds double precision) RETURNS smallint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- 4 / ln 2: quarter powers of two.
    SELECT least(79, greatest(0, floor(ln(greatest(seconds, 1)) * 5.770780163555854)))::smallint
$$;

-- ---- triggers ---------------------------------------------------------------------------------------------

-- INSERT on batchd.jobs, once per statement: refuses jobs past a tenant's max_queued, and notifies
-- batchd_jobs when the daemon asked for it (idle, a batch's worth, a deadline, a job that may go sync).
-- Runs as the schema's owner. [0001, 0004, 0006, 0007]
CREATE FUNCTION batchd.jobs_inserted() RETURNS trigger LANGUAGE plpgsql
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

CREATE TRIGGER jobs_inserted AFTER INSERT ON batchd.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION batchd.jobs_inserted();

-- A job's id: time-ordered, so that the jobs in flight, which are the newest, sit together at the end of
-- every index keyed by it (the primary key, the ledger's), however long the history is. [0012]
CREATE FUNCTION batchd.time_ordered_uuid() RETURNS uuid LANGUAGE sql VOLATILE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp AS $$
    -- A UUID version 7 (RFC 9562): 48 bits of Unix time in milliseconds, then 74 random bits (with the
    -- version and variant bits set).
    SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                                          PLACING substring(int8send((extract(epoch FROM clock_timestamp())
                                                                      * 1000)::bigint) FROM 3)
                                          FROM 1 FOR 6),
                                  52, 1),
                          53, 1),
                  'hex')::uuid
$$;

-- INSERT on batchd.jobs, per row: makes id (time-ordered) and seq, and refuses a producer's row that sets a
-- column only batchd writes. [0008, 0012]
CREATE FUNCTION batchd.jobs_guard_insert() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    forged text;
BEGIN
    IF NEW.id IS NULL THEN
        NEW.id := batchd.time_ordered_uuid();
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

-- UPDATE on batchd.jobs by a writer that is not trusted: it may only cancel. Sorts before
-- jobs_status_changed, so it sees the row as the UPDATE wrote it. [0008]
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

-- A status change: only a queued job can be canceled; timestamps. Runs as the caller. [0001, 0004]
CREATE FUNCTION batchd.jobs_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE TRIGGER jobs_status_changed BEFORE UPDATE OF status ON batchd.jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION batchd.jobs_status_changed();

-- A cancel's event, and its tally. [0004, 0012]
CREATE FUNCTION batchd.jobs_canceled() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO batchd.events (type, tenant_id, job_id, data)
    VALUES ('job.canceled', NEW.tenant_id, NEW.id,
            jsonb_build_object('status', 'canceled', 'metadata', NEW.metadata));
    INSERT INTO batchd.tallies (tenant_id, status, path, job_type, jobs)
    VALUES (NEW.tenant_id, 'canceled', coalesce(NEW.path, ''), coalesce(NEW.job_type, ''), 1);
    PERFORM pg_notify('batchd_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_canceled AFTER UPDATE OF status ON batchd.jobs
    FOR EACH ROW WHEN (NEW.status = 'canceled' AND OLD.status <> 'canceled')
    EXECUTE FUNCTION batchd.jobs_canceled();

-- Keeps batchd.wakeup.queue_limited: whether any max_queued is set anywhere. [0006]
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

CREATE TRIGGER tenants_max_queued AFTER INSERT OR DELETE OR UPDATE OF max_queued OR TRUNCATE ON batchd.tenants
    FOR EACH STATEMENT EXECUTE FUNCTION batchd.max_queued_changed();
CREATE TRIGGER configured_limits_max_queued
    AFTER INSERT OR DELETE OR UPDATE OF max_queued OR TRUNCATE ON batchd.configured_limits
    FOR EACH STATEMENT EXECUTE FUNCTION batchd.max_queued_changed();

-- Any change of tokens NOTIFYs batchd_tokens: every instance ends the streams of revoked tokens. [0009]
CREATE FUNCTION batchd.tokens_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('batchd_tokens', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER tokens_changed AFTER UPDATE OR DELETE ON batchd.tokens
    FOR EACH STATEMENT EXECUTE FUNCTION batchd.tokens_changed();

-- ---- privileges -------------------------------------------------------------------------------------------

-- Firing a trigger needs no EXECUTE privilege; nobody needs to call these by hand. [0004, 0006, 0008, 0009]
REVOKE EXECUTE ON FUNCTION batchd.jobs_inserted(), batchd.jobs_status_changed(), batchd.jobs_canceled(),
    batchd.max_queued_changed(), batchd.jobs_guard_insert(), batchd.jobs_guard_update(),
    batchd.tokens_changed() FROM PUBLIC;

-- These run on behalf of any role that writes batchd.jobs (a check, a trigger's WHEN): anyone may call
-- them. [0008]
GRANT EXECUTE ON FUNCTION batchd.trusted_writer(name), batchd.trusted_writer_now(),
    batchd.plausible_time(timestamptz) TO PUBLIC;
-- jobs_guard_insert runs as whoever inserts: producers too. [0012]
GRANT EXECUTE ON FUNCTION batchd.time_ordered_uuid() TO PUBLIC;
