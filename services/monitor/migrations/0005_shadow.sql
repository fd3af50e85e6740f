-- Shadow (challenger) comparisons: per shadow rollout, challenger version, device group
-- and champion version, the running totals of a challenger's batches (never mixed into
-- the model's windows). aggregate: flips, both models' predictions and latency
-- histograms on the same inputs, devices (compared per device).
CREATE TABLE IF NOT EXISTS {schema}.shadow_comparisons (
    rollout_id       text        NOT NULL,   -- '' when the challenger named none
    model            text        NOT NULL,
    version          text        NOT NULL,   -- the challenger
    grp              text        NOT NULL,
    champion_version text        NOT NULL,
    compared         bigint      NOT NULL DEFAULT 0,
    agreed           bigint      NOT NULL DEFAULT 0,
    sampled_out      bigint      NOT NULL DEFAULT 0,
    skipped_budget   bigint      NOT NULL DEFAULT 0,
    aggregate        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    first_at         timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version, rollout_id, grp, champion_version)
);
