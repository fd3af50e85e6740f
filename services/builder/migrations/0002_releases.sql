-- The release counter of each built version: per model, 1, 2, 3… in build order, signed
-- into the image's signature (edgeloop.release); agents enforce anti-rollback on it.
ALTER TABLE {schema}.builds ADD COLUMN release integer;
CREATE UNIQUE INDEX builds_model_release ON {schema}.builds (model, release);
