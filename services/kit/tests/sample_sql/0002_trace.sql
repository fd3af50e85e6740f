-- The trace id the handler ran under (trace propagation test).
ALTER TABLE {schema}.effects ADD COLUMN IF NOT EXISTS trace_id text;
