-- batchd's schema, version 8: event ids that tell a tenant nothing of other tenants, and revocations that
-- reach every instance's open streams.
--
-- 1. Per-tenant event ids. `seq` is one counter for every tenant: a tenant whose ids went 41, 57 learnt that
--    15 events of others came between. Now the publisher also gives each event its tenant's next number,
--    `tenant_seq`, in the same statement and under the same lock as `seq`: gap-free per tenant, in seq order
--    (so "this tenant's events after n" is exact too), and nothing a tenant can learn from it but how many
--    events of its own there were. A tenant's stream carries tenant_seq as its id; the admin's keeps seq.
--    (Encrypting seq under a key in the database was the other candidate: it hides counts too, but its ids
--    are not monotone, so a client can no longer compare two ids or count back from one, a forged id decrypts
--    to some real position that has to be checked against the tenant, and every frame costs 4 HMACs.)
--
--    The upgrade. Ids sent before it were seq values, and a client may hold any of them (an event's, a reset's,
--    a dashboard snapshot's). So the events already published keep their ids (tenant_seq = seq), and every
--    tenant's counter starts at `tenant_seq_base`, the log's head at the upgrade (0 on a new database): an id
--    at most the base is an old one and means the same events as before, an id above it is a new one, and in
--    both cases "the tenant's events with tenant_seq > id" is exactly what the client missed. The price: a
--    tenant's first new id, base + 1, shows how many events there were in all at the upgrade, once. This
--    rewrites every kept event row once (retention bounds how many). An older daemon still running after
--    this migration would send tenants seq values above the base, which mean something else now: stop
--    every instance before migrating (deploy/README.md, Upgrade).
ALTER TABLE batchd.event_log ADD COLUMN tenant_seq_base bigint NOT NULL DEFAULT 0;
UPDATE batchd.event_log SET tenant_seq_base = published_seq;

ALTER TABLE batchd.events ADD COLUMN tenant_seq bigint;
UPDATE batchd.events SET tenant_seq = seq WHERE seq IS NOT NULL AND tenant_id IS NOT NULL;
-- A tenant's replay reads by tenant_seq, and a resume looks up the event after the client's id: this index
-- replaces (tenant_id, seq), so publishing maintains no more indexes than before.
DROP INDEX batchd.events_tenant;
CREATE UNIQUE INDEX events_tenant ON batchd.events (tenant_id, tenant_seq);

-- Each tenant's last tenant_seq given out; written only by the publisher, under event_log's row lock. A tenant
-- without a row is at tenant_seq_base.
CREATE TABLE batchd.tenant_event_log (
    tenant_id       text PRIMARY KEY,
    published_seq   bigint NOT NULL
);

CREATE OR REPLACE FUNCTION batchd.publish_events(max_events integer) RETURNS integer LANGUAGE plpgsql AS $$
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

-- 2. Revocations. An open stream was authenticated once, when it opened; `batchd tenant revoke` (or any
--    UPDATE or DELETE of tokens, by whatever instance or by hand) now NOTIFYs batchd_tokens, and every
--    instance's hub checks the tokens of its open streams against the table and ends those revoked. The hub
--    also checks now and then without a notification (one was lost while its listener reconnected).
CREATE FUNCTION batchd.tokens_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('batchd_tokens', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER tokens_changed AFTER UPDATE OR DELETE ON batchd.tokens
    FOR EACH STATEMENT EXECUTE FUNCTION batchd.tokens_changed();

REVOKE EXECUTE ON FUNCTION batchd.tokens_changed() FROM PUBLIC;
