-- The W3C traceparent of a version's registration: the root of the version's trace,
-- which every later step (build, validation, rollout waves, device activations) joins.
ALTER TABLE {schema}.versions ADD COLUMN trace_parent text;
