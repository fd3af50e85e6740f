-- One row per model version: the build's state and result.
CREATE TABLE {schema}.builds (
    model        text NOT NULL,
    version      text NOT NULL,
    state        text NOT NULL,            -- built | failed
    image        text,
    digest       text,
    size         bigint,
    signature    text,
    attempts     integer NOT NULL,
    reason       text,
    built_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);
