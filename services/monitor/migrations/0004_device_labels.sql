-- Samples' labels count as ground truth only when given with `edgeloop data label`
-- (labelled_by set): labels devices sent with their samples are not kept.
UPDATE {schema}.samples SET label = NULL WHERE labelled_by IS NULL;
