-- batchd's schema, version 10: the price table as data, for the statement that applies results to join.
--
-- Until now every chunk of results carried batchd.toml's whole [pricing] table as twelve array parameters of
-- apply_results. Now each daemon writes its table here when it starts (pricing.publish), as a *price set*
-- named by a digest of its contents, and apply_results joins the set of the daemon applying (one parameter).
--
-- Whose prices apply when daemons sharing a database read different batchd.toml prices (a rolling config
-- change): each daemon's own, as before this table. Every daemon publishes its set and prices what it
-- applies with it, so a result is priced as the file of the process that records it says. Daemons with the
-- same prices share one set (the same digest). Sets are never removed by batchd: a few rows each, and a
-- record of what prices were in force; `published_at` is the last start that published the set.

CREATE TABLE batchd.price_sets (
    id           text PRIMARY KEY,  -- pricing.PriceSet: a digest of batch_factor and every row below
    batch_factor numeric NOT NULL CHECK (batch_factor > 0 AND batch_factor <= 1),
    published_at timestamptz NOT NULL DEFAULT now()
);

-- USD per million tokens through the synchronous API (the batch factor multiplies them inside a batch), one
-- row per model of a set; long_* is the model's long-prompt tier, all null when it has none: a prompt of
-- more than long_above tokens (input, cache writes and reads) is billed, every token, at those rates.
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
