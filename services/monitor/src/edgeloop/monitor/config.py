"""Monitor settings (``EDGELOOP_MONITOR_…``)."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from edgeloop.kit.settings import ApiServiceSettings, secret_field


class MonitorSettings(ApiServiceSettings):
    """Settings of the monitor service."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_MONITOR_", extra="ignore")

    api_port: int = 18400
    registry_api: str = "http://127.0.0.1:18100"
    """The registry's HTTP API (reference profiles)."""
    registry_token: SecretStr = secret_field(
        "The monitor's own API token for the registry's HTTP API (service:monitor, role "
        "viewer: never the admin token)"
    )
    window_seconds: float = 60.0
    """Length of an aggregation window (by the batches' window end)."""
    grace_seconds: float = 5.0
    """How long after its end a window still takes late batches before it is judged."""
    evaluate_seconds: float = 1.0
    """How often closed windows are looked for."""
    max_batch_count: int = 100_000
    """Most inferences one telemetry batch may carry."""
    batch_size: int = 256
    """Telemetry messages applied per transaction."""
    partition_lease_seconds: float = 15.0
    """How long a replica's hold on its telemetry partitions lasts without renewal (a
    stopped replica's partitions move to the others after at most this)."""
    instance_id: str | None = None
    """This replica's name among the monitor replicas (default: host, pid, random)."""
