-- Registry: models, immutable versions with lineage and artifact digests, aliases.
-- Bytes live in the OCI registry; these tables hold metadata and digests only.
CREATE TABLE {schema}.models (
    name        text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text
);

CREATE TABLE {schema}.versions (
    model              text NOT NULL REFERENCES {schema}.models (name),
    version            text NOT NULL,
    seq                integer NOT NULL,
    event_id           uuid NOT NULL,
    repository         text NOT NULL,
    artifact_manifest  text NOT NULL,
    model_digest       text NOT NULL,
    model_size         bigint NOT NULL,
    suite_digest       text,
    reference_digest   text,
    profile_digest     text,
    content_digest     text NOT NULL,
    signature          jsonb NOT NULL,
    profile            jsonb,
    source_commit      text,
    data_digest        text,
    params             jsonb NOT NULL DEFAULT '{}'::jsonb,
    tags               jsonb NOT NULL DEFAULT '{}'::jsonb,
    parent_model       text,
    parent_version     text,
    retrain_request_id uuid,
    created_at         timestamptz NOT NULL DEFAULT now(),
    created_by         text,
    -- projections of other services' events (the registry never reads their tables)
    build_state        text NOT NULL DEFAULT 'pending',
    build_detail       jsonb,
    validation_state   text NOT NULL DEFAULT 'pending',
    validation_detail  jsonb,
    PRIMARY KEY (model, version),
    UNIQUE (model, seq)
);

CREATE TABLE {schema}.aliases (
    model      text NOT NULL REFERENCES {schema}.models (name),
    alias      text NOT NULL,
    version    text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text,
    PRIMARY KEY (model, alias),
    FOREIGN KEY (model, version) REFERENCES {schema}.versions (model, version)
);

CREATE TABLE {schema}.retrain_requests (
    request_id  uuid PRIMARY KEY,
    model       text NOT NULL,
    version     text NOT NULL,
    alarm_id    uuid,
    reason      text NOT NULL,
    evidence    jsonb NOT NULL,
    dataset     jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
