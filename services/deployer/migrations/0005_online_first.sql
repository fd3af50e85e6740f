-- Online-first waves: which devices a wave takes is decided when it starts (online and
-- healthy ones, in the plan's stable order), and stored with its wave.started; devices
-- offline then are left for a later wave, and on the last one given the release as
-- stragglers (not waited for, not judged; stale once their deadline passed).
ALTER TABLE {schema}.rollouts
    ADD COLUMN device_deadline_seconds double precision NOT NULL DEFAULT 3600;

ALTER TABLE {schema}.waves
    ADD COLUMN members integer,                  -- devices the wave drew (NULL: not started)
    ADD COLUMN deferred integer NOT NULL DEFAULT 0;  -- of its share, offline or unhealthy

-- position: the device's rank in the stable order over the whole rollout (so a device
-- moved to another wave keeps its place); wave: its planned wave, then the one it was
-- drawn into or deferred to
ALTER TABLE {schema}.rollout_devices
    ADD COLUMN straggler boolean NOT NULL DEFAULT false,
    ADD COLUMN absent text,                      -- why it was not drawn when last passed over
    ADD COLUMN offline_since timestamptz;        -- its last message then (NULL: never seen)
