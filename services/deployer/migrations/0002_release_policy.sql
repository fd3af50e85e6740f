-- Release policies per model (automatic rollout of validated versions, approval gates)
-- and the approval a rollout waits for.
CREATE TABLE {schema}.policies (
    model             text PRIMARY KEY,
    auto_rollout      boolean NOT NULL DEFAULT false,  -- roll out each validated version
    selector          jsonb,                           -- where automatic rollouts go
    waves             jsonb,                           -- their WavePlan list (NULL: default)
    bake_seconds      double precision,
    converge_timeout_seconds double precision,
    max_failures      integer,
    max_failures_percent double precision,
    -- none | before_rollout | after_first_wave: which wave waits for an approval
    approval          text NOT NULL DEFAULT 'none',
    updated_by        text,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE {schema}.rollouts
    ADD COLUMN approval_wave integer,       -- the wave that waits for an approval (NULL: none)
    ADD COLUMN approved_by text,
    ADD COLUMN approved_at timestamptz,
    ADD COLUMN approval_reason text;

-- awaiting_approval is an active state (it holds its devices against other rollouts)
DROP INDEX {schema}.rollouts_active;
CREATE INDEX rollouts_active ON {schema}.rollouts (state)
    WHERE state IN ('pending', 'running', 'paused', 'awaiting_approval', 'rolling_back');
