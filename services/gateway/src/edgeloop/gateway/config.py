"""Gateway settings (``EDGELOOP_GATEWAY_…``)."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from edgeloop.contracts.stackfile import state_dir
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

    def hostnames(self) -> list[str]:
        """Names and addresses for the server certificate."""
        return [h.strip() for h in self.server_hostnames.split(",") if h.strip()]

    def address(self) -> str:
        """What agents connect to."""
        return self.public_address or f"{self.grpc_host}:{self.grpc_port}"
