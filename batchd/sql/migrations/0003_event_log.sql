-- batchd's schema, version 3: the event log that Server-Sent Events are served from.
--
-- An event's `id` is taken from a sequence when it is inserted, but transactions commit in their own order:
-- id 41 may become visible after id 42. A client that saw 42 and resumes with "after 42" would never get 41.
-- So events are published: one publisher at a time (a row lock held to commit) gives every committed,
-- unpublished event the next number of a gap-free sequence, `seq`. Publications commit in `seq` order, so a
-- reader that sees `seq` n has already been able to see every `seq` below it: "after n" misses nothing.

ALTER TABLE batchd.events ADD COLUMN seq bigint;
-- Set by the publisher (clock_timestamp() after it took its turn): grows with seq, so retention cuts a prefix.
ALTER TABLE batchd.events ADD COLUMN published_at timestamptz;

CREATE UNIQUE INDEX events_seq ON batchd.events (seq);
CREATE INDEX events_unpublished ON batchd.events (id) WHERE seq IS NULL;
DROP INDEX batchd.events_tenant;
CREATE INDEX events_tenant ON batchd.events (tenant_id, seq);
-- Time windows (retention, `batchd status`) follow published_at, which only the publisher writes: producers'
-- and the daemon's inserts no longer pay for an index on created_at.
DROP INDEX batchd.events_created_at;
CREATE INDEX events_published_at ON batchd.events (published_at);

CREATE TABLE batchd.event_log (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- The highest seq given out; every seq from 1 to here was given to exactly one event.
    published_seq   bigint NOT NULL DEFAULT 0
);
INSERT INTO batchd.event_log DEFAULT VALUES;

-- Each tenant's share of a batch, written when the batch is submitted: a tenant's stream says "your 40
-- requests went out in batch B" and "batch B ended", never what other tenants sent.
CREATE TABLE batchd.batch_tenants (
    batch_id    uuid NOT NULL REFERENCES batchd.batches (id) ON DELETE CASCADE,
    tenant_id   text NOT NULL,
    requests    integer NOT NULL CHECK (requests > 0),
    PRIMARY KEY (batch_id, tenant_id)
);

-- Publishes up to `max_events` committed events; returns how many. Must run in READ COMMITTED: the second
-- statement needs a snapshot taken after the lock, which shows everything the previous publisher committed.
CREATE FUNCTION batchd.publish_events(max_events integer) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    head        bigint;
    published   integer;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'batchd.publish_events must run in READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    SELECT published_seq INTO head FROM batchd.event_log FOR UPDATE;
    WITH pending AS (
        SELECT id, head + row_number() OVER (ORDER BY id) AS seq
          FROM batchd.events
         WHERE seq IS NULL
         ORDER BY id
         LIMIT max_events
    )
    UPDATE batchd.events AS e
       SET seq = pending.seq, published_at = clock_timestamp()
      FROM pending
     WHERE e.id = pending.id;
    GET DIAGNOSTICS published = ROW_COUNT;
    IF published > 0 THEN
        UPDATE batchd.event_log SET published_seq = head + published;
        PERFORM pg_notify('batchd_published', (head + published)::text);
    END IF;
    RETURN published;
END
$$;
