"""Deployer settings (``EDGELOOP_DEPLOYER_…``)."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from edgeloop.kit.settings import ApiServiceSettings, secret_field


class DeployerSettings(ApiServiceSettings):
    """Settings of the deployer service."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_DEPLOYER_", extra="ignore")

    api_port: int = 18300
    """Port of the HTTP API (OpenAPI at /docs)."""
    registry_api: str = "http://127.0.0.1:18100"
    """The registry's HTTP API (is a version validated, and its image)."""
    registry_token: SecretStr = secret_field(
        "The deployer's own API token for the registry's HTTP API (service:deployer, role "
        "service: reads, deprecates and retires versions; never the admin token)"
    )
    gateway_api: str = "http://127.0.0.1:18200"
    """The gateway's HTTP API (the device registry: which devices a selector matches)."""
    gateway_token: SecretStr = secret_field(
        "The deployer's own API token for the gateway's HTTP API (the same as its registry_token)"
    )
    monitor_api: str = "http://127.0.0.1:18400"
    """The monitor's HTTP API (a shadow phase's comparison of challenger and champion)."""
    monitor_token: SecretStr | None = None
    """The deployer's own API token for the monitor's HTTP API (reads only); unset: its
    registry_token (the same service token)."""
    instance_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-deployer")
    """Names this replica as the owner of the rollouts it drives. A restarted replica with
    the same id takes its rollouts back at once; another replica takes them over when
    the lease expires."""
    lease_seconds: float = 15.0
    """How long a replica's claim on a rollout lasts without renewal."""
    tick_seconds: float = 0.5
    """Longest wait between two looks at a rollout (changes of reported state, verdicts
    and operator actions wake it at once)."""
    presence_max_silence_seconds: float = 60.0
    """A device the gateway's registry shows online but has not heard from for longer
    counts as offline when a wave draws its devices (a gateway that died leaves its
    sessions marked online; a live session sends a heartbeat every 10 s)."""
    offline_grace_seconds: float = 60.0
    """How long a wave that finds no device left online and healthy waits for one, asking
    the gateway again, before it gives up (the first wave then fails, a later one is
    skipped or, the last, gives them the release as stragglers): a restarted gateway
    shows its devices offline until they reconnect."""
    clock_shift_file: Path | None = None
    """A file holding seconds by which the clock that judges maintenance windows is moved
    (read at each look; for tests and demos: a rollout outside its window waits, and
    starts when the file moves the clock to the opening). Unset: the wall clock."""
    kv_concurrency: int = 256
    """Desired-state writes in flight at once."""
    max_attempts: int = 6
    """Attempts (with back-off) of a rollout request whose version is not validated yet or
    whose registry/gateway cannot be reached, before it is refused."""
    retry_backoff: str = "1,2,5,10,30"
    """Seconds between those attempts."""
    retirement_sweep_seconds: float = 2.0
    """How often retirements under way are looked at (a replacement rollout that ended, a
    registry call to repeat after a crash or an outage)."""
