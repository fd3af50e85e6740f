-- Retirements of model versions: the devices running the version are moved to a
-- replacement by a rollout restricted to them, then the registry retires the version.
-- A sweep drives each row (replacing → retiring → retired, or failed) and repeats the
-- registry call its state implies until it succeeded (synced), so a crash anywhere heals.
CREATE TABLE {schema}.retirements (
    retirement_id     uuid PRIMARY KEY,
    model             text NOT NULL,
    version           text NOT NULL,
    reason            text,
    requested_by      text,
    replace_model     text,
    replace_version   text,
    rollout_id        uuid REFERENCES {schema}.rollouts (rollout_id),
    devices           jsonb NOT NULL DEFAULT '[]',  -- running the version when asked
    -- replacing (the rollout runs) → retiring (no device runs it: the registry retires
    -- it) → retired; or failed (the version stays deprecated, detail says why)
    state             text NOT NULL,
    detail            text,
    synced            boolean NOT NULL DEFAULT false,  -- the registry has this state's stage
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
);
-- one retirement of a version at a time: a retried request finds the one under way
CREATE UNIQUE INDEX retirements_open ON {schema}.retirements (model, version)
    WHERE state IN ('replacing', 'retiring');
CREATE INDEX retirements_pending ON {schema}.retirements (state) WHERE NOT synced
    OR state IN ('replacing', 'retiring');
