-- Gateway: revocation time (live sessions of a revoked device end), telemetry refused per
-- device (named in `devices show`). `hello_labels` are what the device says about itself:
-- reported attributes only, never used for targeting or groups.
ALTER TABLE {schema}.devices ADD COLUMN revoked_at timestamptz;
ALTER TABLE {schema}.devices ADD COLUMN refusals jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE {schema}.devices ADD COLUMN last_refusal text;
ALTER TABLE {schema}.devices ADD COLUMN last_refusal_at timestamptz;
CREATE INDEX devices_revoked_at ON {schema}.devices (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX devices_enrolled_at ON {schema}.devices (enrolled_at);
