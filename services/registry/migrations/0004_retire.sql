-- Retirement and archival: active → deprecated → retired (no device runs it; no new
-- rollouts or aliases) → archived (its OCI manifests deleted after the retention; the
-- metadata stays).
ALTER TABLE {schema}.versions ADD COLUMN retired_at timestamptz;
ALTER TABLE {schema}.versions ADD COLUMN archived_at timestamptz;
CREATE INDEX versions_retired ON {schema}.versions (retired_at) WHERE stage = 'retired';
