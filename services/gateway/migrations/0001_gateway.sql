-- Gateway: the device registry (identity, labels, sessions, what each device runs).
CREATE TABLE {schema}.devices (
    device_id       text PRIMARY KEY,
    labels          jsonb NOT NULL DEFAULT '{}'::jsonb,
    enrolled_at     timestamptz NOT NULL DEFAULT now(),
    fingerprint     text NOT NULL,
    cert_serial     numeric NOT NULL,
    cert_not_after  timestamptz NOT NULL,
    revoked         boolean NOT NULL DEFAULT false,
    first_seen      timestamptz,
    last_seen       timestamptz,
    online          boolean NOT NULL DEFAULT false,
    session_id      text,
    gateway_id      text,
    hello_labels    jsonb NOT NULL DEFAULT '{}'::jsonb,
    model           text,
    version         text,
    digest          text,
    state           text,
    error           text,
    reported_at     timestamptz
);

CREATE INDEX devices_labels ON {schema}.devices USING gin (labels);
CREATE INDEX devices_gateway ON {schema}.devices (gateway_id) WHERE online;
