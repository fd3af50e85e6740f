-- A version's lifecycle stage: active → deprecated (new rollouts refused, warnings shown).
ALTER TABLE {schema}.versions ADD COLUMN stage text NOT NULL DEFAULT 'active';
ALTER TABLE {schema}.versions ADD COLUMN stage_reason text;
