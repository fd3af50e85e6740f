"""Every event of the loop, as frozen pydantic models.

Rules (DESIGN §3): past-tense names; every event carries ``event_id``, ``occurred_at``,
``schema_version`` and the ids a trace or audit query needs; an event changes only by
adding optional fields; a breaking change gets a new subject or schema version.
Inputs are validated with ``extra="forbid"`` so a producer's typo is caught at the
boundary instead of being silently dropped.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, NonNegativeInt

from edgeloop.contracts import subjects as s
from edgeloop.contracts.windows import WindowSpec


def _now() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """Base of every event that crosses a process boundary."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: ClassVar[str] = ""
    """The subject this event is published on (a class constant, not a field)."""

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: AwareDatetime = Field(default_factory=_now)
    schema_version: int = 1
    trace_parent: str | None = Field(
        default=None, description="W3C traceparent of the span that caused this event"
    )

    def to_json(self) -> bytes:
        """Serialise for the wire."""
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Any:
        """Parse and validate wire bytes (raises ``pydantic.ValidationError``)."""
        return cls.model_validate_json(data)


class ModelRef(BaseModel):
    """``NAME@VERSION`` of a model version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)


# --- registry ---------------------------------------------------------------------


class ArtifactRef(BaseModel):
    """A content-addressed blob in the OCI registry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    size: NonNegativeInt
    media_type: str


class ModelCommitted(Event, ModelRef):
    """A model version was registered (ONNX + metadata + suite + reference profile)."""

    subject: ClassVar[str] = s.MODEL_COMMITTED

    repository: str = Field(description="OCI repository holding the artifacts")
    model_artifact: ArtifactRef
    suite_artifact: ArtifactRef | None = None
    reference_artifact: ArtifactRef | None = Field(
        default=None, description="the reference profile (profile.json) computed at registration"
    )
    source_commit: str | None = None
    data_digest: str | None = None
    parent: ModelRef | None = None
    params: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    retrain_request_id: uuid.UUID | None = None


# --- builder -----------------------------------------------------------------------


class ImageBuilt(Event, ModelRef):
    """The builder pushed an OCI image for a model version."""

    subject: ClassVar[str] = s.IMAGE_BUILT

    image: str = Field(description="repository reference, e.g. host:port/models/iris")
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    size: NonNegativeInt
    signature_digest: str | None = None
    backend: Literal["oci", "docker"] = "oci"
    model_digest: str | None = Field(default=None, description="the ONNX blob in the image")
    source_repository: str | None = Field(
        default=None, description="OCI repository of the version's registered artifacts"
    )
    suite_artifact: ArtifactRef | None = None


class ImageBuildFailed(Event, ModelRef):
    """The builder gave up on a model version."""

    subject: ClassVar[str] = s.IMAGE_BUILD_FAILED

    reason: str
    attempts: NonNegativeInt = 1


# --- validator ---------------------------------------------------------------------


class ValidationPassed(Event, ModelRef):
    """The image's model met its thresholds and did not regress against the champion."""

    subject: ClassVar[str] = s.VALIDATION_PASSED

    image: str
    digest: str
    metrics: dict[str, float] = Field(default_factory=dict)
    report_id: uuid.UUID | None = None
    validated_tag: str | None = None
    report: dict[str, Any] = Field(default_factory=dict)


class ValidationFailed(Event, ModelRef):
    """The image's model failed validation; ``reasons`` lists every failed check."""

    subject: ClassVar[str] = s.VALIDATION_FAILED

    image: str | None = None
    digest: str | None = None
    reasons: list[str]
    metrics: dict[str, float] = Field(default_factory=dict)
    report_id: uuid.UUID | None = None
    report: dict[str, Any] = Field(default_factory=dict)


# --- deployer ----------------------------------------------------------------------


class WavePlan(BaseModel):
    """One wave: a device count or a percentage of the selected devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    count: NonNegativeInt | None = None
    percent: float | None = Field(default=None, gt=0, le=100)


class ShadowSpec(BaseModel):
    """A shadow (challenger) phase: the targeted devices keep acting on their current
    model and also run this version on the same inputs, never acting on it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sample: float = Field(
        default=0.2, gt=0, le=1, description="share of inference batches the challenger also runs"
    )
    duration_seconds: float = Field(default=3600.0, gt=0, le=30 * 86400)
    min_agreement: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="the phase passes when the challenger agrees with the champion on at "
        "least this share of the compared inputs",
    )
    min_compared: NonNegativeInt = Field(
        default=100, description="fewer compared inputs at the end of the phase fail it"
    )
    evidence_wait_seconds: float = Field(
        default=600.0,
        ge=0,
        le=86400,
        description="at the end of the duration, how long the phase may go on while fewer "
        "than min_compared inputs were compared (telemetry arrives in windows, late from "
        "devices that were offline): judged as soon as there are enough, failed after it",
    )
    max_overhead: float = Field(
        default=0.5,
        gt=0,
        le=100,
        description="the challenger's inference time may be at most this share of the "
        "champion's; the agent skips sampled batches over it (and reports them)",
    )
    then_waves: bool = Field(
        default=False,
        description="a passing phase goes on to the rollout's waves (--shadow-first); "
        "false: the rollout is the shadow phase alone (--shadow)",
    )


class RolloutRequested(Event, ModelRef):
    """An operator (or the loop) asked to roll a validated image out."""

    subject: ClassVar[str] = s.ROLLOUT_REQUESTED

    rollout_id: uuid.UUID
    digest: str | None = None
    selector: dict[str, str]
    waves: list[WavePlan]
    bake_seconds: float = Field(default=30.0, ge=0)
    converge_timeout_seconds: float = Field(default=120.0, gt=0)
    max_failures: int | None = Field(default=None, ge=0)
    max_failures_percent: float | None = Field(default=None, ge=0, le=100)
    requested_by: str | None = None
    devices: list[str] | None = Field(
        default=None,
        description="exactly these devices (each must match the selector, which may be "
        "empty: any enrolled device), e.g. those a retirement moves off a version",
    )
    device_deadline_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="how long a straggler (a device offline or unhealthy when its wave "
        "started, given the release without being waited for) may stay silent before it "
        "is shown as stale",
    )
    window: WindowSpec | None = Field(
        default=None,
        description="maintenance windows outside which no desired state is written, e.g. "
        "'Mon-Fri 02:00-04:00 Europe/Berlin' (edgeloop.contracts.windows)",
    )
    max_unavailable: int | None = Field(
        default=None,
        ge=1,
        description="disruption budget: at most this many devices of a wave activating "
        "(given the release, not yet running it) at once",
    )
    max_unavailable_percent: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="the same as a share of the wave's devices (rounded up; the stricter "
        "of the two when both are set)",
    )
    shadow: ShadowSpec | None = Field(
        default=None, description="a shadow phase before (or instead of) the waves"
    )


class _RolloutEvent(Event, ModelRef):
    rollout_id: uuid.UUID


class RolloutRefused(_RolloutEvent):
    """A rollout request that was not admitted (not validated, no devices, overlap …)."""

    subject: ClassVar[str] = s.ROLLOUT_REFUSED

    reason: str


class _WaveEvent(_RolloutEvent):
    wave: NonNegativeInt
    devices: list[str] = Field(default_factory=list)


class RolloutWaveStarted(_WaveEvent):
    """Desired state was written for a wave's devices (``devices``: the ones drawn into
    the wave, online and healthy at its start, which it judges)."""

    subject: ClassVar[str] = s.ROLLOUT_WAVE_STARTED

    stragglers: list[str] = Field(
        default_factory=list,
        description="also given the desired state by this (last) wave, but offline or "
        "unhealthy at its start: not waited for, not judged; they converge when they return",
    )


class RolloutWaveSucceeded(_WaveEvent):
    """A wave converged, baked and got a passing verdict."""

    subject: ClassVar[str] = s.ROLLOUT_WAVE_SUCCEEDED

    converged: NonNegativeInt = 0
    failed: NonNegativeInt = 0


class RolloutWaveFailed(_WaveEvent):
    """A wave exceeded its failure budget or got a failing verdict."""

    subject: ClassVar[str] = s.ROLLOUT_WAVE_FAILED

    reason: str
    converged: NonNegativeInt = 0
    failed: NonNegativeInt = 0


class RolloutCompleted(_RolloutEvent):
    """Every wave succeeded."""

    subject: ClassVar[str] = s.ROLLOUT_COMPLETED

    stragglers: list[str] = Field(
        default_factory=list,
        description="devices given the release while offline or unhealthy that did not run "
        "it yet when the rollout completed (they converge when they return)",
    )


class RolloutRolledBack(_RolloutEvent):
    """Every device of the rollout got its previous desired image back."""

    subject: ClassVar[str] = s.ROLLOUT_ROLLED_BACK

    reason: str
    automatic: bool = True


class RolloutPaused(_RolloutEvent):
    """An operator paused the rollout."""

    subject: ClassVar[str] = s.ROLLOUT_PAUSED

    actor: str | None = None


class RolloutResumed(_RolloutEvent):
    """An operator resumed the rollout."""

    subject: ClassVar[str] = s.ROLLOUT_RESUMED

    actor: str | None = None


class RolloutAborted(_RolloutEvent):
    """An operator aborted the rollout (devices keep what they have)."""

    subject: ClassVar[str] = s.ROLLOUT_ABORTED

    actor: str | None = None
    reason: str | None = None


class RolloutApprovalRequested(_RolloutEvent):
    """The model's release policy holds the rollout before ``wave`` until someone other
    than the requester approves it."""

    subject: ClassVar[str] = s.ROLLOUT_APPROVAL_REQUESTED

    wave: NonNegativeInt
    requested_by: str | None = None


class RolloutApproved(_RolloutEvent):
    """An operator approved the rollout past its gate."""

    subject: ClassVar[str] = s.ROLLOUT_APPROVED

    wave: NonNegativeInt
    actor: str
    reason: str | None = None


class RolloutShadowStarted(_RolloutEvent):
    """The challenger was given to the targeted devices beside what they run."""

    subject: ClassVar[str] = s.ROLLOUT_SHADOW_STARTED

    devices: list[str] = Field(default_factory=list)
    spec: ShadowSpec


class RolloutShadowPassed(_RolloutEvent):
    """The shadow phase ended with the challenger agreeing enough with the champion."""

    subject: ClassVar[str] = s.ROLLOUT_SHADOW_PASSED

    agreement: float | None = None
    compared: NonNegativeInt = 0
    reason: str = ""


class RolloutShadowFailed(_RolloutEvent):
    """The shadow phase ended with too little agreement (or evidence): the challenger gets
    no real wave."""

    subject: ClassVar[str] = s.ROLLOUT_SHADOW_FAILED

    agreement: float | None = None
    compared: NonNegativeInt = 0
    reason: str


class Verdict(StrEnum):
    """The monitor's judgement of a canary cohort."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


class CanaryVerdict(_RolloutEvent):
    """The monitor compared a wave's canary cohort with the baseline cohort."""

    subject: ClassVar[str] = s.ROLLOUT_CANARY_VERDICT

    wave: NonNegativeInt
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    trimmed_devices: dict[str, str] = Field(
        default_factory=dict,
        description="devices left out as outliers (the verdict would rest on them alone)",
    )


# --- devices ---------------------------------------------------------------------


class DeviceState(StrEnum):
    """Where a device is with its desired model."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    ACTIVATING = "activating"
    RUNNING = "running"
    FAILED = "failed"
    DEFERRED = "deferred"
    """Given a new model, waiting to activate it: an application holds the device's
    update lock (``error`` says so; ``deferred_since``, ``deferred_until``)."""
    OFFLINE = "offline"


class DeviceStatusReported(Event):
    """A device's reported state changed (device twin, reported half)."""

    subject: ClassVar[str] = s.DEVICE_STATUS_PREFIX

    device_id: str = Field(min_length=1, max_length=128)
    state: DeviceState
    model: str | None = None
    version: str | None = None
    digest: str | None = None
    desired_digest: str | None = None
    rollout_id: uuid.UUID | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    desired_revision: NonNegativeInt | None = Field(
        default=None, description="the desired-state revision the device has applied"
    )
    deferred_since: AwareDatetime | None = Field(
        default=None, description="deferred: since when its update lock keeps it waiting"
    )
    deferred_until: AwareDatetime | None = Field(
        default=None, description="deferred: when it activates anyway (its maximum deferral)"
    )

    def bus_subject(self) -> str:
        """``device.status.<device>``."""
        return s.device_status_subject(self.device_id)


CONFIDENCE_EDGES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
"""The bins of every agent's confidence histogram (windows merge them by addition)."""
LATENCY_MS_EDGES: tuple[float, ...] = (
    0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000,
)  # fmt: skip
"""The bins of every agent's latency histogram, in milliseconds."""


class Histogram(BaseModel):
    """A mergeable fixed-edge histogram (counts per bin, plus under/overflow)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    edges: list[float]
    counts: list[NonNegativeInt]


class ShadowFlip(BaseModel):
    """Inputs the champion predicted as ``champion`` and the challenger as ``challenger``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    champion: str
    challenger: str
    count: NonNegativeInt


class ShadowComparison(BaseModel):
    """How a challenger's batch compares with the champion on the same inputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rollout_id: uuid.UUID | None = None
    champion_version: str = Field(min_length=1, max_length=128)
    champion_digest: str | None = None
    compared: NonNegativeInt = 0
    agreed: NonNegativeInt = 0
    flips: list[ShadowFlip] = Field(default_factory=list)
    champion_prediction_counts: dict[str, NonNegativeInt] = Field(default_factory=dict)
    champion_latency_ms_histogram: Histogram | None = None
    sampled_out: NonNegativeInt = 0
    skipped_budget: NonNegativeInt = 0
    overhead: float = Field(default=0.0, ge=0)


class TelemetryBatch(Event, ModelRef):
    """Many inferences of one device in one bus message (DESIGN §6: batching)."""

    subject: ClassVar[str] = s.TELEMETRY_PREFIX

    device_id: str = Field(min_length=1, max_length=128)
    digest: str | None = None
    window_start: AwareDatetime
    window_end: AwareDatetime
    count: NonNegativeInt
    errors: NonNegativeInt = 0
    low_confidence: NonNegativeInt = 0
    feature_names: list[str] = Field(default_factory=list)
    feature_histograms: list[Histogram] = Field(default_factory=list)
    prediction_counts: dict[str, NonNegativeInt] = Field(default_factory=dict)
    confidence_histogram: Histogram | None = None
    confidence_by_prediction: dict[str, Histogram] = Field(
        default_factory=dict,
        description="predicted class → its confidence histogram on CONFIDENCE_EDGES "
        "(label-free accuracy estimation); empty from older agents",
    )
    latency_ms_histogram: Histogram | None = None
    samples: list[dict[str, Any]] = Field(
        default_factory=list, description="bounded sample of raw low-confidence inputs"
    )
    dropped_batches: NonNegativeInt = 0
    corrupt_batches: NonNegativeInt = Field(
        default=0,
        description="batches the device found unreadable in its offline buffer (set aside)",
    )
    group: str | None = Field(
        default=None,
        description="the device's group: its value of the gateway's group label (monitor windows)",
    )
    shadow: ShadowComparison | None = Field(
        default=None,
        description="set on a challenger's batch (a shadow model, never acted on): its "
        "comparison with the champion on the same inputs",
    )

    def bus_subject(self) -> str:
        """``device.telemetry.<model>.<device>``."""
        return s.telemetry_subject(self.model, self.device_id)

    def inconsistency(self) -> str | None:
        """Why the batch's counts cannot all be true (None when they agree).

        A window's counts bound each other: errors, low-confidence inferences,
        predictions and the confidence and latency histograms count at most ``count``;
        a feature histogram counts every inference that did not fail (``count - errors``
        to ``count``). The gateway refuses such a batch at entry; the monitor checks
        again what reaches it from the bus.
        """
        count = self.count
        if self.errors > count or self.low_confidence > count:
            return "more errors or low-confidence inferences than inferences"
        predicted = sum(self.prediction_counts.values())
        if predicted > count:
            return f"{predicted} predictions for {count} inferences"
        extra = (("confidence", self.confidence_histogram), ("latency", self.latency_ms_histogram))
        for what, h in extra:
            if h is not None and sum(h.counts) > count:
                return f"the {what} histogram counts {sum(h.counts)} of {count} inferences"
        for label, h in self.confidence_by_prediction.items():
            if sum(h.counts) > self.prediction_counts.get(label, 0):
                return (
                    f"the confidence histogram of prediction {label!r} counts {sum(h.counts)} "
                    f"of {self.prediction_counts.get(label, 0)} such predictions"
                )
        for i, h in enumerate(self.feature_histograms):
            n = sum(h.counts)
            if not count - self.errors <= n <= count:
                name = self.feature_names[i] if i < len(self.feature_names) else f"#{i}"
                return f"feature {name} counts {n} of {count} inferences ({self.errors} failed)"
        if self.shadow is not None:
            return _shadow_inconsistency(self.shadow, count)
        return None


def _shadow_inconsistency(shadow: ShadowComparison, count: int) -> str | None:
    """Why a challenger batch's comparison cannot be true (None when it agrees)."""
    if shadow.compared != count:
        return f"a shadow batch compares {shadow.compared} inputs but counts {count}"
    flipped = sum(f.count for f in shadow.flips)
    if shadow.agreed + flipped > shadow.compared:
        return f"{shadow.agreed} agreed and {flipped} flipped of {shadow.compared} compared"
    if sum(shadow.champion_prediction_counts.values()) > count:
        return "more champion predictions than compared inputs"
    h = shadow.champion_latency_ms_histogram
    if h is not None and sum(h.counts) > count:
        return f"the champion latency histogram counts {sum(h.counts)} of {count} inferences"
    return None


# --- monitor -----------------------------------------------------------------------


class AlarmKind(StrEnum):
    """What an alarm is about."""

    DRIFT = "drift"
    KPI = "kpi"


class AlarmRaised(Event, ModelRef):
    """A drift or KPI rule fired."""

    subject: ClassVar[str] = s.ALARM_RAISED

    alarm_id: uuid.UUID
    kind: AlarmKind
    rule: str
    severity: Literal["info", "warning", "critical"] = "warning"
    group: str | None = None
    window_start: AwareDatetime | None = None
    window_end: AwareDatetime | None = None
    scores: dict[str, float] = Field(default_factory=dict)
    message: str = ""


class AlarmResolved(Event, ModelRef):
    """An alarm's condition cleared (after hysteresis) or it was resolved by hand."""

    subject: ClassVar[str] = s.ALARM_RESOLVED

    alarm_id: uuid.UUID
    rule: str
    resolved_by: str | None = None


class DatasetSelection(BaseModel):
    """Which stored samples to retrain on, and how to export them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kinds: list[Literal["low-confidence", "random", "misclassified", "labelled"]]
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    sample_count: NonNegativeInt = 0
    export_command: str | None = None


class RetrainRequested(Event, ModelRef):
    """An alarm asks for a new version trained on the selected data (closes the loop)."""

    subject: ClassVar[str] = s.RETRAIN_REQUESTED

    request_id: uuid.UUID
    alarm_id: uuid.UUID | None = None
    reason: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    dataset: DatasetSelection


LIFECYCLE_EVENTS: tuple[type[Event], ...] = (
    ModelCommitted,
    ImageBuilt,
    ImageBuildFailed,
    ValidationPassed,
    ValidationFailed,
    RolloutRequested,
    RolloutRefused,
    RolloutWaveStarted,
    RolloutWaveSucceeded,
    RolloutWaveFailed,
    RolloutCompleted,
    RolloutRolledBack,
    RolloutPaused,
    RolloutResumed,
    RolloutAborted,
    RolloutApprovalRequested,
    RolloutApproved,
    RolloutShadowStarted,
    RolloutShadowPassed,
    RolloutShadowFailed,
    CanaryVerdict,
    AlarmRaised,
    AlarmResolved,
    RetrainRequested,
)

EVENTS_BY_SUBJECT: dict[str, type[Event]] = {e.subject: e for e in LIFECYCLE_EVENTS}
