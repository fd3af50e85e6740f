-- API tokens with roles, shared by every service's API (schema `auth`). Only a token's
-- SHA-256 is stored; the token itself is shown once, when it is issued. A shared
-- migration (see 0001_audit.sql).
CREATE SCHEMA IF NOT EXISTS auth;
CREATE TABLE IF NOT EXISTS auth.tokens (
    name        text        PRIMARY KEY,
    role        text        NOT NULL,
    hash        text        NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text,
    expires_at  timestamptz,
    revoked_at  timestamptz
);
