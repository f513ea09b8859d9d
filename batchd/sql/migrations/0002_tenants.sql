-- batchd's schema, version 2: tenants and their API tokens, for batchd's own HTTP API.
-- A token is shown once when it is made and stored only as its SHA-256 (tokens are 256 random bits, so a
-- plain hash is enough: there is nothing to guess).

CREATE TABLE batchd.tenants (
    name        text PRIMARY KEY CHECK (name <> ''),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE batchd.tokens (
    id            bigserial PRIMARY KEY,
    tenant_id     text NOT NULL REFERENCES batchd.tenants (name),
    token_sha256  bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
