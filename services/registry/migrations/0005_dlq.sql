-- The DLQ's bookkeeping: which dead letters left it through an acknowledged replay, and
-- how far the registry has accounted for the DLQ stream's head. Whatever left below the
-- head and was not replayed was dropped by the stream's limits (max_bytes, max_age).
CREATE TABLE {schema}.dlq_replayed (
    seq        bigint PRIMARY KEY,
    replayed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {schema}.dlq_watch (
    stream     text PRIMARY KEY,
    first_seq  bigint NOT NULL,
    dropped    bigint NOT NULL DEFAULT 0,
    checked_at timestamptz NOT NULL DEFAULT now()
);
