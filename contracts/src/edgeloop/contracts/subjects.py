"""Every subject, stream, KV bucket and durable consumer name, in one place.

No handler spells a subject as a literal: it imports it from here.
"""

from __future__ import annotations

from typing import Final

# --- streams -----------------------------------------------------------------
STREAM_LIFECYCLE: Final = "LIFECYCLE"
STREAM_TELEMETRY: Final = "TELEMETRY"
STREAM_DEVICE: Final = "DEVICE"
STREAM_DLQ: Final = "DLQ"

# --- KV buckets (device twin) -------------------------------------------------
KV_DESIRED: Final = "desired"
KV_REPORTED: Final = "reported"

# --- lifecycle subjects ----------------------------------------------------------
MODEL_COMMITTED: Final = "model.committed"
IMAGE_BUILT: Final = "image.built"
IMAGE_BUILD_FAILED: Final = "image.build_failed"
VALIDATION_PASSED: Final = "validation.passed"
VALIDATION_FAILED: Final = "validation.failed"
ROLLOUT_REQUESTED: Final = "rollout.requested"
ROLLOUT_REFUSED: Final = "rollout.refused"
ROLLOUT_WAVE_STARTED: Final = "rollout.wave.started"
ROLLOUT_WAVE_SUCCEEDED: Final = "rollout.wave.succeeded"
ROLLOUT_WAVE_FAILED: Final = "rollout.wave.failed"
ROLLOUT_COMPLETED: Final = "rollout.completed"
ROLLOUT_ROLLED_BACK: Final = "rollout.rolled_back"
ROLLOUT_PAUSED: Final = "rollout.paused"
ROLLOUT_RESUMED: Final = "rollout.resumed"
ROLLOUT_ABORTED: Final = "rollout.aborted"
ROLLOUT_CANARY_VERDICT: Final = "rollout.canary.verdict"
ROLLOUT_APPROVAL_REQUESTED: Final = "rollout.approval.requested"
ROLLOUT_APPROVED: Final = "rollout.approved"
ROLLOUT_SHADOW_STARTED: Final = "rollout.shadow.started"
ROLLOUT_SHADOW_PASSED: Final = "rollout.shadow.passed"
ROLLOUT_SHADOW_FAILED: Final = "rollout.shadow.failed"
RETRAIN_REQUESTED: Final = "retrain.requested"
ALARM_RAISED: Final = "alarm.raised"
ALARM_RESOLVED: Final = "alarm.resolved"

LIFECYCLE_SUBJECTS: Final = (
    "model.>",
    "image.>",
    "validation.>",
    "rollout.>",
    "retrain.>",
    "alarm.>",
)

# --- device subjects ---------------------------------------------------------------
TELEMETRY_PREFIX: Final = "device.telemetry"
DEVICE_STATUS_PREFIX: Final = "device.status"
TELEMETRY_SUBJECTS: Final = (f"{TELEMETRY_PREFIX}.>",)
#: The TELEMETRY stream stores ``device.telemetry.<model>.<device>`` as
#: ``device.telemetry.<model>.<device>.<partition>``, the partition a stable hash of the
#: model and device tokens; consumers that scale out take partitions, not messages.
TELEMETRY_PARTITIONS: Final = 8
DEVICE_SUBJECTS: Final = (f"{DEVICE_STATUS_PREFIX}.>",)

# --- dead letters -------------------------------------------------------------------
DLQ_PREFIX: Final = "dlq"
DLQ_SUBJECTS: Final = (f"{DLQ_PREFIX}.>",)

# --- durable consumers (one per service and subscription; replicas share it) ----------
CONSUMER_BUILDER: Final = "builder"
CONSUMER_VALIDATOR: Final = "validator"
CONSUMER_DEPLOYER: Final = "deployer"
CONSUMER_DEPLOYER_VERDICTS: Final = "deployer-verdicts"
CONSUMER_DEPLOYER_RELEASES: Final = "deployer-releases"
CONSUMER_MONITOR_TELEMETRY: Final = "monitor-telemetry"
CONSUMER_MONITOR_STATUS: Final = "monitor-status"
CONSUMER_REGISTRY_RETRAIN: Final = "registry-retrain"
CONSUMER_NOTIFIER: Final = "notifier"


def _token(value: str) -> str:
    """Make ``value`` safe as one subject token (no dots, spaces or wildcards)."""
    if not value:
        raise ValueError("a subject token cannot be empty")
    bad = set(". *>\t\r\n")
    return "".join("_" if ch in bad else ch for ch in value)


def telemetry_partition_subjects() -> tuple[str, str]:
    """The TELEMETRY stream's subject transform: (published subjects, stored subjects)."""
    return (
        f"{TELEMETRY_PREFIX}.*.*",
        f"{TELEMETRY_PREFIX}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
        f".{{{{partition({TELEMETRY_PARTITIONS},1,2)}}}}",
    )


def telemetry_partition(k: int) -> str:
    """The stored subjects of telemetry partition ``k``."""
    return f"{TELEMETRY_PREFIX}.*.*.{k}"


def stored_telemetry(model: str, device_id: str) -> str:
    """The subjects one device's telemetry for ``model`` is stored under (any partition)."""
    return f"{telemetry_subject(model, device_id)}.*"


def telemetry_subject(model: str, device_id: str) -> str:
    """``device.telemetry.<model>.<device>``: partitionable by subject."""
    return f"{TELEMETRY_PREFIX}.{_token(model)}.{_token(device_id)}"


def device_status_subject(device_id: str) -> str:
    """``device.status.<device>``."""
    return f"{DEVICE_STATUS_PREFIX}.{_token(device_id)}"


def dlq_subject(subject: str) -> str:
    """``dlq.<original subject>``."""
    return f"{DLQ_PREFIX}.{subject}"


def kv_key(device_id: str) -> str:
    """KV keys may hold ``[-/_=.a-zA-Z0-9]``; anything else becomes ``_``."""
    allowed = set("-/_=.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    if not device_id:
        raise ValueError("a device id cannot be empty")
    return "".join(ch if ch in allowed else "_" for ch in device_id)
