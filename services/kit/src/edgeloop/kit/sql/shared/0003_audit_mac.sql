-- The audit chain's anchor outside the database: each record's HMAC-SHA256 (hex) over
-- its hash, with a key the database never sees (EDGELOOP_AUDIT_KEY, kit.audit). A writer
-- of the table without the key can change a record and recompute every hash after it,
-- but not these. NULL: written without a key (an installation that has none).
ALTER TABLE audit.records ADD COLUMN IF NOT EXISTS mac text;
