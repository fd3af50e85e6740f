"""Notifier settings (``EDGELOOP_NOTIFIER_…``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from edgeloop.kit.settings import ApiServiceSettings


class NotifierSettings(ApiServiceSettings):
    """Settings of the notifier service."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_NOTIFIER_", extra="ignore")

    api_port: int = 18600
    max_attempts: int = Field(default=8, ge=1, le=100)
    """Attempts at one delivery before it is dead-lettered (status ``dead``)."""
    retry_base_seconds: float = Field(default=2.0, gt=0)
    """Back-off after the first failed attempt; it doubles after each further one."""
    retry_max_seconds: float = Field(default=900.0, gt=0)
    """The longest back-off between two attempts."""
    request_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long one POST may take (connect, send, answer) before it counts as failed."""
    concurrency: int = Field(default=8, ge=1, le=256)
    """Deliveries POSTed at once by this replica."""
    poll_seconds: float = Field(default=1.0, gt=0)
    """How often due deliveries are looked for when nothing new woke the worker."""
    lease_seconds: float = Field(default=60.0, gt=0)
    """How long a replica holds a delivery it is sending; one left by a killed replica is
    sent again after this. Longer than ``request_timeout_seconds``."""
    delivery_retention_seconds: float = Field(default=30 * 86400.0, ge=0)
    """Finished deliveries (and their attempts) are deleted this long after they finished
    (0: never); checked every ``prune_every_seconds``."""
    instance_id: str | None = None
    """This replica's name among the notifier replicas (default: host, pid, random)."""
