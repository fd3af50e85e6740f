-- The audit trail, shared by every service: one append-only, hash-chained table in the
-- schema `audit`. A shared migration: applied once per database, by the bootstrap
-- (edgeloop.kit.dbroles, admin DSN) or by the first service that connects as a
-- superuser (kit.db.migrate_shared).
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
