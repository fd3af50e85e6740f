"""The device twin's desired half: the document in the ``desired`` KV bucket.

The deployer (or an operator) writes one document per device, key
:func:`edgeloop.contracts.subjects.kv_key` of the device id; gateways watch the bucket
and turn each document into a ``DesiredState`` message for the device (adding the image
signature from the registry and the KV revision). The reported half is the latest
:class:`~edgeloop.contracts.events.DeviceStatusReported` of the device, in the
``reported`` bucket.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

__all__ = ["DesiredModel", "ShadowModel", "image_repository"]

SCHEMA_VERSION = 1


class DesiredModel(BaseModel):
    """What one device should run; ``manifest_digest`` ``None`` means "run nothing"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    model: str | None = None
    version: str | None = None
    image: str | None = Field(
        default=None, description="repository reference, e.g. host:port/edgeloop/images/iris"
    )
    manifest_digest: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    model_digest: str | None = Field(
        default=None, pattern=r"^sha256:[0-9a-f]{64}$", description="the ONNX file's digest"
    )
    rollout_id: uuid.UUID | None = None
    explicit_rollback: bool = Field(
        default=False, description="permits a version older than the device's (anti-rollback)"
    )
    trace_parent: str | None = None
    set_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    set_by: str | None = None
    shadow: ShadowModel | None = Field(
        default=None,
        description="a challenger run beside this model on the same inputs, never acted on",
    )

    @model_validator(mode="after")
    def _complete(self) -> DesiredModel:
        if self.manifest_digest is not None and not (self.model and self.version and self.image):
            raise ValueError("a desired image needs model, version and image")
        if self.shadow is not None and self.manifest_digest is None:
            raise ValueError("a challenger needs a champion: no shadow without a desired image")
        return self

    def images(self) -> list[tuple[str, str]]:
        """(image, manifest digest) of what the device may fetch: the model, then the
        challenger."""
        out = []
        for doc in (self, self.shadow):
            if doc is not None and doc.image and doc.manifest_digest:
                out.append((doc.image, doc.manifest_digest))
        return out

    def versions(self) -> list[tuple[str, str]]:
        """(model, version) the device is desired to run: the model and the challenger."""
        return [
            (doc.model, doc.version)
            for doc in (self, self.shadow)
            if doc is not None and doc.model and doc.version
        ]

    def to_bytes(self) -> bytes:
        """The KV value."""
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> DesiredModel:
        """Parse a KV value (``pydantic.ValidationError`` when it is not one)."""
        return cls.model_validate_json(data)


class ShadowModel(DesiredModel):
    """A challenger: an image like any desired one, plus what the agent enforces on it."""

    manifest_digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    sample: float = Field(default=0.2, gt=0, le=1)
    max_overhead: float = Field(default=0.5, gt=0)
    until: AwareDatetime | None = Field(
        default=None, description="the agent stops running the challenger after this"
    )


DesiredModel.model_rebuild()


def image_repository(image: str) -> str:
    """The repository path of an image reference: ``host:port/a/b`` → ``a/b``.

    The first component is a registry host when it has a dot or a port, or is
    ``localhost`` (the Docker reference grammar).
    """
    first, sep, rest = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return rest
    return image
