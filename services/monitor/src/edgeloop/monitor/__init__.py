"""edgeloop monitor: drift and KPIs from batched telemetry, alarms, retraining requests."""
