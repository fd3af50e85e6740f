-- Partitioned consumers: which replica consumes which partition of a stream.
-- A replica renews its membership and its partitions' leases; a partition whose lease
-- ran out (its replica died) is taken over by another, which resumes its durable.
CREATE TABLE IF NOT EXISTS {schema}.partition_members (
    consumer    text        NOT NULL,
    owner       text        NOT NULL,
    seen_until  timestamptz NOT NULL,
    PRIMARY KEY (consumer, owner)
);
CREATE TABLE IF NOT EXISTS {schema}.partition_leases (
    consumer    text        NOT NULL,
    partition   integer     NOT NULL,
    owner       text,
    lease_until timestamptz,
    PRIMARY KEY (consumer, partition)
);
