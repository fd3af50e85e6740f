-- Deliberately not idempotent on its own: only the inbox keeps an event from being
-- counted twice, which is what the tests check.
CREATE TABLE IF NOT EXISTS {schema}.effects (
    id         bigserial PRIMARY KEY,
    event_id   uuid NOT NULL,
    model      text NOT NULL,
    version    text NOT NULL,
    deliveries integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
