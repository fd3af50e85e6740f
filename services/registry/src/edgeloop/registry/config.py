"""Registry settings (``EDGELOOP_REGISTRY_…``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from edgeloop.kit.settings import ApiServiceSettings


class RegistrySettings(ApiServiceSettings):
    """Settings of the registry service."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_REGISTRY_", extra="ignore")

    api_port: int = 18100
    """Port of the HTTP API (OpenAPI at /docs)."""
    max_model_bytes: int = 256 * 1024 * 1024
    """Largest accepted ONNX file."""
    max_data_bytes: int = 256 * 1024 * 1024
    """Largest accepted suite or reference file."""
    repository_prefix: str = "edgeloop/models"
    """OCI repository prefix; a model's artifacts go to <prefix>/<name>."""
    profile_bins: int = 10
    """Quantile bins per numeric feature in the reference profile."""
    retention_seconds: float = 30 * 24 * 3600
    """How long a retired version keeps its artifacts and images before it is archived
    (its manifests deleted from the OCI registry; its metadata kept)."""
    archive_sweep_seconds: float = 60.0
    """How often the registry looks for retired versions due for archival."""
    dlq_check_seconds: float = 30.0
    """How often the registry looks whether the DLQ stream's limits dropped dead letters
    (``edgeloop_dlq_dropped_total``, a warning in the log)."""
