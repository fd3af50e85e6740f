-- Windows and alarms per device group ('' when a device has no group label).
ALTER TABLE {schema}.windows ADD COLUMN grp text NOT NULL DEFAULT '';
ALTER TABLE {schema}.windows DROP CONSTRAINT windows_pkey;
ALTER TABLE {schema}.windows ADD PRIMARY KEY (model, version, grp, window_start);
ALTER TABLE {schema}.alarms ADD COLUMN grp text NOT NULL DEFAULT '';
DROP INDEX {schema}.alarms_open;
CREATE UNIQUE INDEX alarms_open ON {schema}.alarms (model, version, grp, rule)
    WHERE state <> 'resolved';
