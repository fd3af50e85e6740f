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
    max_unpacked_bytes: int = 1 << 30
    """What the arrays of a suite or reference may hold once decompressed (a small
    compressed file can expand a thousandfold)."""
    check_cpu_seconds: int = 60
    """CPU time the worker that checks an upload (ONNX load, decompression, reference
    profile) may use; over it the upload is refused (422)."""
    check_memory_bytes: int = 2 << 30
    """Memory (address space) of that worker."""
    check_timeout_seconds: float = 120.0
    """Wall-clock time before that worker is killed."""
    check_workers: int = 2
    """Uploads checked at once; more wait their turn."""
    min_thresholds: dict[str, float] = {}
    """The platform's minimum quality bars, e.g. ``{"accuracy": 0.8}`` (JSON): a
    ``threshold.<metric>`` param below one (above one, for an error metric such as
    ``mae``) needs an admin; a version that sets none is given the minimum."""
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
