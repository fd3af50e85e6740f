-- Shadow (challenger) phases: a rollout with `shadow` runs the version beside what its
-- devices run (state `shadowing`) before its waves (then_waves) or instead of them, and
-- passes or fails on the agreement the monitor measured. A release policy's
-- `shadow_first` gives every rollout of its model such a phase.
ALTER TABLE {schema}.rollouts
    ADD COLUMN shadow jsonb,                 -- the ShadowSpec (NULL: no shadow phase)
    ADD COLUMN shadow_state text,            -- observing → deciding → passed | failed
    ADD COLUMN shadow_started_at timestamptz,
    ADD COLUMN shadow_devices jsonb,         -- the devices given the challenger
    ADD COLUMN shadow_result jsonb;          -- verdict, agreement, compared, reason, report

ALTER TABLE {schema}.policies ADD COLUMN shadow_first jsonb;
