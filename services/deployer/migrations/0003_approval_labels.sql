-- A release policy may gate by destination: a rollout whose selector includes these
-- labels (e.g. {"env": "prod"}) waits for an approval before its first wave.
ALTER TABLE {schema}.policies ADD COLUMN approval_labels jsonb;
