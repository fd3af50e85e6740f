-- Deployer: rollouts as persisted state machines, their planned waves and devices.
-- A rollout's plan (which device is in which wave) is fixed when it is admitted, so a
-- restarted deployer resumes the same plan; each transition commits with its outbox event.
CREATE TABLE {schema}.rollouts (
    rollout_id        uuid PRIMARY KEY,
    model             text NOT NULL,
    version           text NOT NULL,
    image             text,
    digest            text,
    model_digest      text,
    selector          jsonb NOT NULL,
    waves             jsonb NOT NULL,          -- the requested WavePlan list
    bake_seconds      double precision NOT NULL,
    converge_timeout_seconds double precision NOT NULL,
    max_failures      integer,
    max_failures_percent double precision,
    -- pending → running ⇄ paused → completed | rolling_back → rolled_back | aborted; refused
    state             text NOT NULL,
    current_wave      integer NOT NULL DEFAULT 0,
    reason            text,
    requested_by      text,
    rollback_by       text,                    -- operator who asked for a rollback (NULL: automatic)
    trace_parent      text,
    owner             text,
    lease_until       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
);
CREATE INDEX rollouts_active ON {schema}.rollouts (state)
    WHERE state IN ('pending', 'running', 'paused', 'rolling_back');

CREATE TABLE {schema}.waves (
    rollout_id        uuid NOT NULL REFERENCES {schema}.rollouts (rollout_id),
    wave              integer NOT NULL,
    size              integer NOT NULL,
    -- pending → writing → converging → baking → succeeded | failed
    state             text NOT NULL DEFAULT 'pending',
    started_at        timestamptz,
    phase_since       timestamptz,
    finished_at       timestamptz,
    converged         integer NOT NULL DEFAULT 0,
    failed            integer NOT NULL DEFAULT 0,
    verdict           text,
    verdict_reasons   jsonb,
    reason            text,
    PRIMARY KEY (rollout_id, wave)
);

CREATE TABLE {schema}.rollout_devices (
    rollout_id        uuid NOT NULL REFERENCES {schema}.rollouts (rollout_id),
    device_id         text NOT NULL,
    wave              integer NOT NULL,
    position          integer NOT NULL,
    previous          jsonb,                   -- desired document before this rollout
    captured          boolean NOT NULL DEFAULT false,
    outcome           text,                    -- converged | failed | timeout
    detail            text,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_device ON {schema}.rollout_devices (device_id);
