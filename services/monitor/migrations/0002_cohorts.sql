-- Canary cohorts: a rollout wave's devices on the new version, compared with the devices
-- of the same model still on another version, window by window.
CREATE TABLE {schema}.cohorts (
    rollout_id    uuid NOT NULL,
    wave          integer NOT NULL,
    model         text NOT NULL,
    version       text NOT NULL,
    devices       jsonb NOT NULL,
    started_at    timestamptz NOT NULL,
    ended_at      timestamptz,
    last_verdict  text,
    PRIMARY KEY (rollout_id, wave)
);
CREATE INDEX cohorts_open ON {schema}.cohorts (model, version) WHERE ended_at IS NULL;
