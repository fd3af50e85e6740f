"""Console settings (``EDGELOOP_CONSOLE_…``).

The console holds no secret of its own and no database: each person signs in with their
own API token, which is what it sends to the other services' APIs.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConsoleSettings(BaseSettings):
    """Settings of the console."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_CONSOLE_", extra="ignore")

    host: str = "127.0.0.1"
    """Address the pages are served on."""
    port: int = 18500
    """Port the pages are served on (0: any free port)."""
    registry_api: str = "http://127.0.0.1:18100"
    """The registry's HTTP API (models, versions, audit, who a token is)."""
    deployer_api: str = "http://127.0.0.1:18300"
    """The deployer's HTTP API (rollouts)."""
    monitor_api: str = "http://127.0.0.1:18400"
    """The monitor's HTTP API (alarms, drift windows, samples)."""
    gateway_api: str = "http://127.0.0.1:18200"
    """The gateway's HTTP API (devices)."""
    traces_api: str | None = None
    """The trace query API (Jaeger's ``/api/traces/{id}``: ``make up``'s collector or
    Jaeger); unset: version pages show no waterfall."""
    nats_monitor_url: str | None = None
    """NATS's HTTP monitoring endpoint (``/jsz``: the dead-letter stream's depth);
    unset: the overview shows no DLQ depth."""
    prometheus_url: str | None = None
    """Prometheus, linked from the overview when set."""
    session_hours: float = Field(default=12.0, gt=0)
    """How long a sign-in lasts (sessions live in this process: a restart signs
    everyone out, and nothing else is lost)."""
    secure_cookies: bool = False
    """Mark the session cookie ``Secure`` (behind HTTPS)."""
    live_poll_seconds: float = Field(default=0.5, gt=0)
    """How often a live page (server-sent events) asks the APIs for changes."""
    api_timeout_seconds: float = Field(default=10.0, gt=0)
    """Timeout of one call to an API."""
