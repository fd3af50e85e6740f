-- Monitor: window aggregates of telemetry, alarms, per-model rules, stored samples,
-- rejected telemetry per device.
CREATE TABLE {schema}.windows (
    model         text NOT NULL,
    version       text NOT NULL,
    window_start  timestamptz NOT NULL,
    window_end    timestamptz NOT NULL,
    aggregate     jsonb NOT NULL,
    count         bigint NOT NULL,
    evaluated     boolean NOT NULL DEFAULT false,
    scores        jsonb,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version, window_start)
);
CREATE INDEX windows_pending ON {schema}.windows (window_end) WHERE NOT evaluated;

CREATE TABLE {schema}.alarms (
    alarm_id      uuid PRIMARY KEY,
    model         text NOT NULL,
    version       text NOT NULL,
    rule          text NOT NULL,
    kind          text NOT NULL,
    state         text NOT NULL,              -- raised | acknowledged | resolved
    message       text NOT NULL,
    scores        jsonb NOT NULL,
    window_start  timestamptz NOT NULL,
    window_end    timestamptz NOT NULL,
    clean_windows integer NOT NULL DEFAULT 0,
    raised_at     timestamptz NOT NULL DEFAULT now(),
    acked_at      timestamptz,
    acked_by      text,
    resolved_at   timestamptz,
    retrain_request_id uuid
);
-- one open alarm per rule and version (de-duplication)
CREATE UNIQUE INDEX alarms_open ON {schema}.alarms (model, version, rule)
    WHERE state <> 'resolved';

CREATE TABLE {schema}.rules (
    model       text PRIMARY KEY,
    rules       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text
);

CREATE TABLE {schema}.samples (
    sample_id   bigserial PRIMARY KEY,
    model       text NOT NULL,
    version     text NOT NULL,
    device_id   text NOT NULL,
    kind        text NOT NULL DEFAULT 'low-confidence',
    features    jsonb NOT NULL,
    prediction  text,
    confidence  double precision,
    label       text,
    labelled_by text,
    at          timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX samples_model ON {schema}.samples (model, at);

CREATE TABLE {schema}.rejections (
    device_id   text NOT NULL,
    code        text NOT NULL,
    count       bigint NOT NULL,
    last_reason text NOT NULL,
    last_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, code)
);
