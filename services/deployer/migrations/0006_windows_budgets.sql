-- Maintenance windows and disruption budgets (issue 17 item 4). Outside its window a
-- rollout writes no desired state (state waiting_for_window, with the next opening); a
-- budget caps how many devices of a wave are given the release and not yet running it.
ALTER TABLE {schema}.rollouts
    ADD COLUMN window_spec text,                 -- e.g. 'Mon-Fri 02:00-04:00 Europe/Berlin'
    ADD COLUMN window_opens_at timestamptz,      -- waiting_for_window: the next opening
    ADD COLUMN max_unavailable integer,
    ADD COLUMN max_unavailable_percent double precision;

-- when the engine gave the device the release (NULL: not yet): with a disruption budget
-- a wave writes its devices a few at a time, each judged from its own write
ALTER TABLE {schema}.rollout_devices
    ADD COLUMN written_at timestamptz;

ALTER TABLE {schema}.policies
    ADD COLUMN window_spec text,
    ADD COLUMN max_unavailable integer,
    ADD COLUMN max_unavailable_percent double precision;

-- waiting_for_window is an active state (it holds its devices against other rollouts)
DROP INDEX {schema}.rollouts_active;
CREATE INDEX rollouts_active ON {schema}.rollouts (state)
    WHERE state IN ('pending', 'running', 'paused', 'awaiting_approval', 'waiting_for_window',
                    'rolling_back');
