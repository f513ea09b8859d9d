-- batchd's schema, version 1. Everything lives in the schema `batchd`; producers write to batchd.jobs.

CREATE SCHEMA IF NOT EXISTS batchd;

-- One row per provider batch that batchd made or is making. A batch is recorded (pending) before the API
-- is called, so that a crash or a lost response can always be reconciled against the provider's list.
CREATE TABLE batchd.batches (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Short, unique and part of every custom_id in the batch: proof that a provider batch is ours.
    tag                 text NOT NULL UNIQUE CHECK (tag ~ '^[a-z0-9]{12}$'),
    provider_batch_id   text UNIQUE,
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

CREATE INDEX batches_open ON batchd.batches (status) WHERE status IN ('pending', 'in_progress', 'ended');

CREATE TABLE batchd.jobs (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Claim order: a sequence, not created_at, so that producers' clocks and ties do not matter.
    seq             bigserial NOT NULL,
    tenant_id       text NOT NULL CHECK (tenant_id <> ''),
    created_at      timestamptz NOT NULL DEFAULT now(),
    request         jsonb,
    job_type        text,
    input           jsonb,
    metadata        jsonb,
    idempotency_key text,
    deadline        timestamptz,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'submitting', 'submitted', 'succeeded', 'failed', 'canceled')),
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
    CONSTRAINT jobs_request_or_job_type CHECK ((request IS NULL) <> (job_type IS NULL)),
    CONSTRAINT jobs_input_with_job_type CHECK (input IS NULL OR job_type IS NOT NULL),
    CONSTRAINT jobs_batch_when_in_flight CHECK (status NOT IN ('submitting', 'submitted') OR batch_id IS NOT NULL)
);

-- A producer that retries its INSERT ... ON CONFLICT DO NOTHING makes no duplicate.
CREATE UNIQUE INDEX jobs_idempotency_key ON batchd.jobs (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The claim reads queued rows only: a partial index keeps it fast under a large finished history.
CREATE INDEX jobs_queued ON batchd.jobs (seq) WHERE status = 'queued';
CREATE INDEX jobs_queued_deadline ON batchd.jobs (deadline) WHERE status = 'queued' AND deadline IS NOT NULL;
CREATE INDEX jobs_batch ON batchd.jobs (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX jobs_tenant_status ON batchd.jobs (tenant_id, status);

-- Every state change a client cares about, written in the transaction that makes it. Served by id.
CREATE TABLE batchd.events (
    id          bigserial PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    type        text NOT NULL,
    tenant_id   text,
    job_id      uuid,
    batch_id    uuid,
    data        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_tenant ON batchd.events (tenant_id, id);
CREATE INDEX events_created_at ON batchd.events (created_at);

-- When producers' INSERTs should wake the daemon. Notifying costs every committing transaction a
-- cluster-wide lock, so the trigger notifies only when a daemon asked for it: when it is idle (`armed`),
-- when the job count it would flush at is reached (`wake_seq`), or for a job with a deadline.
CREATE TABLE batchd.wakeup (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    armed       boolean NOT NULL DEFAULT true,
    wake_seq    bigint NOT NULL DEFAULT 0
);
INSERT INTO batchd.wakeup DEFAULT VALUES;

CREATE FUNCTION batchd.jobs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    wake batchd.wakeup;
BEGIN
    SELECT * INTO wake FROM batchd.wakeup;
    IF wake.armed OR EXISTS (
        SELECT 1 FROM new_jobs WHERE new_jobs.seq >= wake.wake_seq OR new_jobs.deadline IS NOT NULL
    ) THEN
        PERFORM pg_notify('batchd_jobs', '');
    END IF;
    RETURN NULL;
END
$$;

-- FOR EACH STATEMENT: a 10,000-row INSERT sends one notification, not 10,000.
CREATE TRIGGER jobs_inserted AFTER INSERT ON batchd.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION batchd.jobs_inserted();

-- Why a raw request cannot be sent in a batch, or null. Checked in the database, where the jsonb is already
-- parsed; the API would only say so when the whole batch ends, hours later.
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

-- A producer cancels a queued job with UPDATE ... SET status = 'canceled' or batchd.cancel_job(id). A job
-- already in a batch is on its way to the provider and cannot be canceled: say so instead of pretending.
CREATE FUNCTION batchd.jobs_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'canceled' AND OLD.status <> 'canceled' THEN
        IF OLD.status <> 'queued' THEN
            RAISE EXCEPTION 'job % is %, and only a queued job can be canceled', OLD.id, OLD.status
                USING ERRCODE = 'check_violation';
        END IF;
        NEW.completed_at := coalesce(NEW.completed_at, now());
        INSERT INTO batchd.events (type, tenant_id, job_id, data)
        VALUES ('job.canceled', NEW.tenant_id, NEW.id,
                jsonb_build_object('status', 'canceled', 'metadata', NEW.metadata));
        PERFORM pg_notify('batchd_events', '');
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_status_changed BEFORE UPDATE OF status ON batchd.jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION batchd.jobs_status_changed();

CREATE FUNCTION batchd.cancel_job(job uuid) RETURNS boolean LANGUAGE sql AS $$
    WITH canceled AS (
        UPDATE batchd.jobs SET status = 'canceled' WHERE id = job AND status = 'queued' RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM canceled)
$$;
