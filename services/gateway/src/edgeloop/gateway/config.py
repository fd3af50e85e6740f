"""Gateway settings (``EDGELOOP_GATEWAY_…``)."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from edgeloop.contracts.stackfile import state_dir
from edgeloop.gateway.trust import BudgetLimits, TelemetryPolicy
from edgeloop.kit.settings import ApiServiceSettings


class GatewaySettings(ApiServiceSettings):
    """Settings of the edge gateway."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_GATEWAY_", extra="ignore")

    gateway_id: str = Field(default_factory=socket.gethostname)
    """Names this gateway in the device registry (sessions it owns)."""
    grpc_host: str = "127.0.0.1"
    """Address the gRPC (mTLS) endpoint listens on."""
    grpc_port: int = 18443
    """Port of the gRPC endpoint agents connect to."""
    public_address: str | None = None
    """host:port agents are told to connect to (enrolment bundles); default grpc host:port."""
    server_hostnames: str = "localhost,127.0.0.1"
    """Names and addresses in the server certificate, comma separated."""
    api_port: int = 18200
    """Port of the HTTP API (OpenAPI at /docs)."""
    pki_dir: Path = Field(default_factory=lambda: state_dir() / "gateway" / "pki")
    """The device CA (ca.crt, ca.key) and the server certificate; created when absent."""
    cache_dir: Path = Field(default_factory=lambda: state_dir() / "gateway" / "blobs")
    """Local cache of artifact blobs served to devices."""
    signing_public_key: Path | None = None
    """PEM of the key images are signed with, handed to devices at enrolment."""
    signing_key_rotations: Path | None = None
    """Directory of signed key rotations (``edgeloop signing rotate``) sent to devices."""
    heartbeat_seconds: int = 10
    """Heartbeat interval agents are asked to keep; 3 missed heartbeats end a session."""
    max_message_bytes: int = 1 << 20
    """Largest agent message accepted (larger ones get a too_large error)."""
    chunk_bytes: int = 256 * 1024
    """Default artifact chunk size."""
    outbound_queue: int = 64
    """Messages waiting for one device before its session is ended (backpressure)."""
    max_sessions: int = 50_000
    """Sessions one gateway accepts."""
    group_label: str = "group"
    """The device label whose value names its group in telemetry (the monitor aggregates
    per model version and group)."""

    max_hello_bytes: int = 16 * 1024
    """Largest Hello accepted (a larger one refuses the session)."""
    max_batch_count: int = 100_000
    """Most inferences one telemetry batch may carry."""
    max_clock_skew_seconds: float = 300.0
    """How far past the gateway's clock a batch's window may end."""
    max_batch_age_hours: float = 168.0
    """How long ago a batch's window may have ended (the agent's offline buffer)."""
    device_batches_per_second: float = 1000.0
    """Telemetry budget of one device: batches per second (bursts of 2 s); a batch over
    it is held back (the agent sends it again) and counted for the device."""
    device_records_per_second: float = 50_000.0
    """Telemetry budget of one device: inferences per second."""
    device_bytes_per_second: float = 4 << 20
    """Telemetry budget of one device: bytes per second."""

    def telemetry_policy(self) -> TelemetryPolicy:
        """The bounds a telemetry batch must keep."""
        return TelemetryPolicy(
            max_count=self.max_batch_count,
            max_clock_skew=timedelta(seconds=self.max_clock_skew_seconds),
            max_age=timedelta(hours=self.max_batch_age_hours),
        )

    def budget(self) -> BudgetLimits:
        """One device's telemetry budget."""
        return BudgetLimits(
            batches_per_second=self.device_batches_per_second,
            records_per_second=self.device_records_per_second,
            bytes_per_second=self.device_bytes_per_second,
        )

    def hostnames(self) -> list[str]:
        """Names and addresses for the server certificate."""
        return [h.strip() for h in self.server_hostnames.split(",") if h.strip()]

    def address(self) -> str:
        """What agents connect to."""
        return self.public_address or f"{self.grpc_host}:{self.grpc_port}"
