-- One validation report per model version (the image that was validated, every check).
CREATE TABLE {schema}.reports (
    report_id   uuid PRIMARY KEY,
    model       text NOT NULL,
    version     text NOT NULL,
    image       text NOT NULL,
    digest      text NOT NULL,
    passed      boolean NOT NULL,
    reasons     jsonb NOT NULL,
    metrics     jsonb NOT NULL,
    report      jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (model, version)
);
