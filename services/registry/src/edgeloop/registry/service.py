"""Registration logic: checks, profile, artifacts, immutable versions, lineage.

No web framework and no database driver here: the API adapter calls :class:`Registry`,
which talks to a :class:`~edgeloop.registry.store.Store` and an :class:`ArtifactStore`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Tracer

from edgeloop.contracts.events import ArtifactRef, ModelCommitted, ModelRef
from edgeloop.contracts.names import check_model, check_version
from edgeloop.contracts.thresholds import BelowMinimum, ThresholdError, apply_minimums
from edgeloop.kit.tracing import inject_headers
from edgeloop.registry.checks import Checked, Limits, WorkerChecks
from edgeloop.registry.errors import Conflict, Forbidden, InvalidInput, NotFound, TooLarge

MEDIA_ONNX = "application/vnd.onnx.model"
MEDIA_NPZ = "application/vnd.edgeloop.dataset.npz"
MEDIA_PROFILE = "application/vnd.edgeloop.profile.v1+json"
MEDIA_SIGNATURE = "application/vnd.edgeloop.model-signature.v1+json"


@dataclass(frozen=True)
class ArtifactFile:
    """One file of a model version, as pushed to the module store."""

    name: str
    media_type: str
    data: bytes


@dataclass(frozen=True)
class StoredArtifacts:
    """Where a version's files landed: the artifact manifest and a descriptor per file."""

    manifest_digest: str
    files: dict[str, ArtifactRef]


class ArtifactStore(Protocol):
    """The module store (an OCI registry), content-addressed."""

    async def store(
        self,
        repository: str,
        tag: str,
        files: Sequence[ArtifactFile],
        annotations: dict[str, str],
    ) -> StoredArtifacts:
        """Push the files and an artifact manifest that references them, tagged ``tag``."""
        ...


@dataclass
class Registration:
    """What a data scientist or CI pipeline registers."""

    name: str
    model: bytes
    version: str | None = None
    suite: bytes | None = None
    reference: bytes | None = None
    source_commit: str | None = None
    data_digest: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    retrain_request_id: uuid.UUID | None = None
    actor: str | None = None
    may_loosen_thresholds: bool = False
    """Whether the caller may set thresholds below the platform's minimums (an admin)."""


@dataclass(frozen=True)
class Registered:
    """The outcome: the version, and whether this call created it (False: same bytes)."""

    name: str
    version: str
    created: bool
    record: dict[str, Any]


class Checks(Protocol):
    """Runs the checks of an upload's bytes (:class:`WorkerChecks`: in a worker process
    with CPU and memory limits)."""

    async def __call__(
        self, model: bytes, suite: bytes | None, reference: bytes | None
    ) -> Checked: ...


class Store(Protocol):
    """Persistence the registry logic needs (asyncpg implementation in store.py)."""

    async def register(
        self,
        name: str,
        version: str | None,
        content_digest: str,
        row: dict[str, Any],
        event_factory: Any,
    ) -> tuple[dict[str, Any], bool]: ...

    async def get_version(self, name: str, version: str) -> dict[str, Any] | None: ...


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``NAME[@VERSION]`` → (name, version or None)."""
    name, _, version = ref.partition("@")
    return check_model(name), (check_version(version) if version else None)


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """Registers model versions."""

    def __init__(
        self,
        store: Store,
        artifacts: ArtifactStore,
        *,
        repository_prefix: str,
        max_model_bytes: int,
        max_data_bytes: int,
        checks: Checks | None = None,
        min_thresholds: dict[str, float] | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.tracer = tracer or trace.get_tracer("edgeloop.registry")
        self.store = store
        self.artifacts = artifacts
        self.repository_prefix = repository_prefix.strip("/")
        self.max_model_bytes = max_model_bytes
        self.max_data_bytes = max_data_bytes
        self.checks: Checks = checks or WorkerChecks(Limits())
        self.min_thresholds = dict(min_thresholds or {})

    def repository(self, name: str) -> str:
        """The OCI repository holding ``name``'s artifacts."""
        return f"{self.repository_prefix}/{name}"

    async def inspect(self, reg: Registration) -> tuple[list[ArtifactFile], dict[str, Any]]:
        """Every check of an upload; returns the files to store and the derived metadata.
        Names and sizes are checked here; whatever runs the upload's bytes (ONNX load,
        ``.npz`` decompression, the reference profile) runs in :attr:`checks`."""
        check_model(reg.name)
        if reg.version is not None:
            check_version(reg.version)
        if len(reg.model) > self.max_model_bytes:
            raise TooLarge(
                f"model file is {len(reg.model)} bytes; the limit is {self.max_model_bytes}"
            )
        for what, blob in (("suite", reg.suite), ("reference", reg.reference)):
            if blob is not None and len(blob) > self.max_data_bytes:
                raise TooLarge(
                    f"{what} file is {len(blob)} bytes; the limit is {self.max_data_bytes}"
                )
        self._held_to_minimums(reg, kind=None)
        checked = await self.checks(reg.model, reg.suite, reg.reference)
        reg.params = self._held_to_minimums(reg, kind=checked.signature.get("kind"))
        files = [ArtifactFile("model.onnx", MEDIA_ONNX, reg.model)]
        meta: dict[str, Any] = {"signature": checked.signature, "profile": checked.profile}
        if reg.suite is not None:
            files.append(ArtifactFile("suite.npz", MEDIA_NPZ, reg.suite))
            meta["suite_rows"] = checked.suite_rows
        if checked.profile is not None and reg.reference is not None:
            files.append(ArtifactFile("reference.npz", MEDIA_NPZ, reg.reference))
            files.append(
                ArtifactFile(
                    "profile.json",
                    MEDIA_PROFILE,
                    json.dumps(checked.profile, sort_keys=True).encode(),
                )
            )
        files.append(
            ArtifactFile(
                "signature.json",
                MEDIA_SIGNATURE,
                json.dumps(meta["signature"], sort_keys=True).encode(),
            )
        )
        return files, meta

    def _held_to_minimums(self, reg: Registration, kind: str | None) -> dict[str, str]:
        """The params with the platform's minimum thresholds (403 for a looser one by
        someone who may not; 422 for one that is not a number)."""
        try:
            return apply_minimums(
                reg.params, self.min_thresholds, kind, may_loosen=reg.may_loosen_thresholds
            )
        except BelowMinimum as exc:
            raise Forbidden(str(exc)) from None
        except ThresholdError as exc:
            raise InvalidInput(str(exc)) from None

    async def register(self, reg: Registration) -> Registered:
        """Check, store the bytes, record the version and queue ``model.committed``.

        Idempotent: the same bytes under the same version return the existing version;
        different bytes under an existing version are a conflict.
        """
        files, meta = await self.inspect(reg)
        parent: ModelRef | None = None
        if reg.parent:
            pname, pversion = parse_ref(reg.parent)
            if pversion is None:
                raise InvalidInput(f"--parent needs NAME@VERSION, got {reg.parent!r}")
            if await self.store.get_version(pname, pversion) is None:
                raise InvalidInput(f"parent {pname}@{pversion} is not a registered version")
            parent = ModelRef(model=pname, version=pversion)
        content_digest = sha256_digest(
            b"\n".join(f"{f.name}={sha256_digest(f.data)}".encode() for f in files)
            + b"\n"
            + json.dumps(
                {
                    "commit": reg.source_commit,
                    "data": reg.data_digest,
                    "params": reg.params,
                    "tags": reg.tags,
                    "parent": reg.parent,
                },
                sort_keys=True,
            ).encode()
        )
        if reg.version is not None:
            existing = await self.store.get_version(reg.name, reg.version)
            if existing is not None:
                return self._same_or_conflict(reg.name, reg.version, existing, content_digest)
        repository = self.repository(reg.name)
        stored = await self.artifacts.store(
            repository,
            f"content-{content_digest.removeprefix('sha256:')[:32]}",
            files,
            {
                "edgeloop.model": reg.name,
                "org.opencontainers.image.revision": reg.source_commit or "",
                "edgeloop.data_digest": reg.data_digest or "",
            },
        )
        row: dict[str, Any] = {
            "repository": repository,
            "artifact_manifest": stored.manifest_digest,
            "model_digest": stored.files["model.onnx"].digest,
            "model_size": stored.files["model.onnx"].size,
            "suite_digest": _digest(stored, "suite.npz"),
            "reference_digest": _digest(stored, "reference.npz"),
            "profile_digest": _digest(stored, "profile.json"),
            "signature": meta["signature"],
            "profile": meta["profile"],
            "source_commit": reg.source_commit,
            "data_digest": reg.data_digest,
            "params": reg.params,
            "tags": reg.tags,
            "parent_model": parent.model if parent else None,
            "parent_version": parent.version if parent else None,
            "retrain_request_id": reg.retrain_request_id,
            "created_by": reg.actor,
        }

        def event_factory(version: str, event_id: uuid.UUID) -> ModelCommitted:
            return ModelCommitted(
                event_id=event_id,
                model=reg.name,
                version=version,
                repository=repository,
                model_artifact=stored.files["model.onnx"],
                suite_artifact=stored.files.get("suite.npz"),
                reference_artifact=stored.files.get("profile.json"),
                source_commit=reg.source_commit,
                data_digest=reg.data_digest,
                parent=parent,
                params=reg.params,
                tags=reg.tags,
                retrain_request_id=reg.retrain_request_id,
            )

        # The version's trace starts here (a new trace, not the HTTP request's): its
        # build, validation, rollouts and device activations all join it.
        with self.tracer.start_as_current_span(
            f"register {reg.name}", context=Context(), attributes={"edgeloop.model": reg.name}
        ) as span:
            row["trace_parent"] = inject_headers().get("traceparent")
            record, created = await self.store.register(
                reg.name, reg.version, content_digest, row, event_factory
            )
            span.set_attribute("edgeloop.version", record["version"])
        if not created:
            return self._same_or_conflict(reg.name, record["version"], record, content_digest)
        return Registered(reg.name, record["version"], True, record)

    @staticmethod
    def _same_or_conflict(
        name: str, version: str, existing: dict[str, Any], content_digest: str
    ) -> Registered:
        if existing["content_digest"] != content_digest:
            raise Conflict(
                f"{name}@{version} already exists with different content "
                f"({existing['content_digest'][:19]}…); versions are immutable, "
                "register under a new version"
            )
        return Registered(name, version, False, existing)

    async def get(self, name: str, version: str) -> dict[str, Any]:
        """One version, or NotFound."""
        record = await self.store.get_version(check_model(name), check_version(version))
        if record is None:
            raise NotFound(f"{name}@{version} is not registered")
        return record


def _digest(stored: StoredArtifacts, name: str) -> str | None:
    ref = stored.files.get(name)
    return ref.digest if ref else None
