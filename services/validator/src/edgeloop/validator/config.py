"""Validator settings (``EDGELOOP_VALIDATOR_…``)."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from edgeloop.kit.settings import ServiceSettings, secret_field


class ValidatorSettings(ServiceSettings):
    """Settings of the validator service."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_VALIDATOR_", extra="ignore")

    public_key: str
    """Ed25519 public key (PEM) that image signatures must verify with."""
    registry_api: str = "http://127.0.0.1:18100"
    """The registry's HTTP API (to look up the champion alias)."""
    registry_token: SecretStr = secret_field(
        "The validator's own API token for the registry's HTTP API (service:validator, role "
        "viewer: never the admin token)"
    )
    regression_tolerance: float = 0.01
    """How much worse than the champion a candidate may be on a headline metric."""
    min_accuracy: float = 0.0
    """Default accuracy threshold when the version sets none."""
    profile_threads: str = "1,2,4"
    """Intra-op thread counts to profile."""
    profile_runs: int = 200
    """Single-row inferences timed per thread count."""
    max_attempts: int = 4
    """Attempts (with back-off) before a validation that cannot reach the registry (or its
    API) is given up and reported failed."""
    retry_backoff: str = "1,3,10,30"
    """Seconds between attempts, comma separated."""
