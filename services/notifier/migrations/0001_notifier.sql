-- Webhook subscriptions (the secret is the HMAC key: read by the delivery worker only,
-- never returned by the API), their deliveries (one per subscription and event, its
-- body fixed when it is created) and every attempt at one.
CREATE TABLE {schema}.subscriptions (
    subscription_id uuid PRIMARY KEY,
    url             text NOT NULL,
    events          text[] NOT NULL,
    format          text NOT NULL CHECK (format IN ('json', 'alertmanager')),
    secret          text NOT NULL,
    description     text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL,
    removed_at      timestamptz,
    removed_by      text
);

CREATE TABLE {schema}.deliveries (
    delivery_id     uuid PRIMARY KEY,
    subscription_id uuid NOT NULL REFERENCES {schema}.subscriptions,
    event_id        uuid NOT NULL,
    event           text NOT NULL,
    body            bytea NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'dead', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    -- rounds of max_attempts it may spend: 1, one more each time a person retries it
    rounds          integer NOT NULL DEFAULT 1,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    lease_until     timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    UNIQUE (subscription_id, event_id)
);
CREATE INDEX deliveries_due ON {schema}.deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_by_subscription ON {schema}.deliveries (subscription_id, created_at);

CREATE TABLE {schema}.attempts (
    delivery_id uuid NOT NULL REFERENCES {schema}.deliveries ON DELETE CASCADE,
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    status_code integer,
    error       text,
    duration_ms double precision NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
