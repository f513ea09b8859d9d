-- batchd's schema, version 16: signed webhooks, driven from the events outbox.
--
-- A tenant's endpoints (URL, secret, the event types it wants) live in webhook_endpoints. The enqueuer
-- (batchd/webhooks.py) reads the published events after webhook_log.enqueued_seq, inserts one delivery per
-- matching endpoint and moves the cursor, in one transaction under the cursor row's lock: a crash rolls both
-- back, so an event is enqueued exactly once per endpoint, and the pruner never deletes an event the cursor
-- has not passed. A delivery is claimed with a lease (lease_until), so a daemon killed mid-request leaves it
-- to be sent again (same webhook-id) once the lease runs out: at-least-once.
--
-- The secret is stored as the endpoint's owner must present it (`whsec_` + base64): batchd signs with it, so
-- it cannot be a hash; no role but the daemon's may read the table (deploy/sql/roles.sql grants producers
-- nothing here).

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
CREATE INDEX webhook_endpoints_tenant ON batchd.webhook_endpoints (tenant_id);

-- One message to one endpoint: the event's body as signed (fixed at enqueue, so every retry sends the same
-- bytes under the same webhook-id), and the state of its delivery.
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
-- What the dispatcher claims: an endpoint's due deliveries, oldest first; and what is in flight. Pending
-- rows only, so its size is the work in flight, never the history.
CREATE INDEX webhook_deliveries_due ON batchd.webhook_deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending';
-- The pruner reads finished deliveries oldest first.
CREATE INDEX webhook_deliveries_finished ON batchd.webhook_deliveries (finished_at)
    WHERE status <> 'pending';

-- The enqueuer's cursor: every event with seq up to enqueued_seq has its deliveries. One row.
CREATE TABLE batchd.webhook_log (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    enqueued_seq bigint NOT NULL
);
-- Starts at the log's head: events published before webhooks existed have no endpoint to go to.
INSERT INTO batchd.webhook_log (enqueued_seq) SELECT published_seq FROM batchd.event_log;
