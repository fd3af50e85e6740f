-- The audit trail, shared by every service: one append-only, hash-chained table in the
-- schema `audit` (created by whichever service migrates first; the lock keeps two from
-- creating it at once). {schema} is unused here: the trail is one for the platform.
SELECT pg_advisory_xact_lock(hashtext('edgeloop:audit-schema'));
CREATE SCHEMA IF NOT EXISTS audit;
CREATE TABLE IF NOT EXISTS audit.records (
    seq         bigint      PRIMARY KEY,
    at          timestamptz NOT NULL,
    service     text        NOT NULL,
    actor       text        NOT NULL,
    action      text        NOT NULL,
    subject     text        NOT NULL,
    model       text,
    version     text,
    before      jsonb,
    after       jsonb,
    reason      text,
    trace_id    text,
    prev_hash   text        NOT NULL,
    hash        text        NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS records_model ON audit.records (model, version, seq);
