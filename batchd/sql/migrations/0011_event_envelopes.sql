-- batchd's schema, version 11: an event as a stream sends it, written once.
--
-- The hub's fan-out, an admin's replay and a tenant's replay each built the event's JSON (its columns and its
-- data) with the same expression. A plain view says it once; PostgreSQL inlines it into each query, so their
-- plans (the index range each reads) are what they were, and the JSON is built only for the rows returned.
CREATE VIEW batchd.event_envelopes AS
SELECT seq, tenant_seq, type, tenant_id, job_id, batch_id,
       (jsonb_strip_nulls(jsonb_build_object('type', type, 'job_id', job_id, 'tenant', tenant_id,
                                             'batch_id', batch_id, 'at', created_at)) || data)::text AS data
  FROM batchd.events;
