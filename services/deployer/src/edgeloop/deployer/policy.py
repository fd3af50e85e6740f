"""Release policies: per model, whether each validated version is rolled out by itself
(and where, in which waves), and which wave waits for an approval.

The closed loop runs unattended up to the gate: a retrained version that passes
validation is admitted as a rollout like any other (``requested_by`` ``policy``), and a
model whose policy asks for an approval holds that rollout before the gated wave until
an operator other than the requester approves it (``rollout approve``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgeloop.contracts.events import RolloutRequested, ShadowSpec, ValidationPassed, WavePlan
from edgeloop.contracts.windows import WindowSpec
from edgeloop.kit.db import Conn

#: Who asks for the rollouts a policy starts.
POLICY_ACTOR = "policy"

#: Rollout ids of automatic rollouts derive from the validation event, so a redelivered
#: ``validation.passed`` finds the rollout it already caused.
_NAMESPACE = uuid.UUID("6f1c9a52-3b0e-4a8e-9a55-2d7c0c1e5e41")


class Approval(StrEnum):
    """Which wave of a model's rollouts waits for an approval."""

    NONE = "none"
    BEFORE_ROLLOUT = "before_rollout"
    AFTER_FIRST_WAVE = "after_first_wave"


class ReleasePolicy(BaseModel):
    """A model's release policy (``PUT /v1/policies/{model}``)."""

    model_config = ConfigDict(extra="forbid")

    auto_rollout: bool = False
    selector: dict[str, str] | None = None
    waves: list[WavePlan] | None = Field(default=None, min_length=1)
    bake_seconds: float | None = Field(default=None, ge=0)
    converge_timeout_seconds: float | None = Field(default=None, gt=0)
    max_failures: int | None = Field(default=None, ge=0)
    max_failures_percent: float | None = Field(default=None, ge=0, le=100)
    approval: Approval = Approval.NONE
    approval_labels: dict[str, str] | None = None
    """A rollout that reaches a device with these labels (e.g. env=prod), whichever
    labels its selector names, waits for an approval before it starts, whatever
    ``approval`` says."""
    window: WindowSpec | None = None
    """Maintenance windows of its rollouts (``Mon-Fri 02:00-04:00 Europe/Berlin``)."""
    max_unavailable: int | None = Field(default=None, ge=1)
    """Disruption budget of its rollouts: devices of a wave activating at once."""
    max_unavailable_percent: float | None = Field(default=None, gt=0, le=100)
    shadow_first: ShadowSpec | None = None
    """Every rollout of the model (automatic or not) first runs the version as a
    challenger (``--shadow-first 1h``); only a passing shadow phase leads to a real wave."""

    @field_validator("shadow_first")
    @classmethod
    def _then_waves(cls, spec: ShadowSpec | None) -> ShadowSpec | None:
        return spec.model_copy(update={"then_waves": True}) if spec is not None else None

    def check(self) -> str | None:
        """Why the policy cannot work, or None."""
        if self.auto_rollout and not self.selector:
            return "an automatic rollout needs a selector (which devices get new versions)"
        return None

    def approval_wave(
        self,
        waves: int,
        selector: dict[str, str] | None = None,
        devices: Iterable[dict[str, str]] = (),
    ) -> int | None:
        """The wave of a rollout with ``waves`` waves (to ``selector``; ``devices``: the
        enrolment labels of the devices it reaches) that waits for an approval. A
        destination gate applies when one of the devices has its labels (or the selector
        names them): a selector that reaches production by another label is gated too."""
        labels = self.approval_labels or {}
        if labels and any(
            all(dest.get(k) == v for k, v in labels.items()) for dest in (selector or {}, *devices)
        ):
            return 0
        if self.approval is Approval.BEFORE_ROLLOUT:
            return 0
        if self.approval is Approval.AFTER_FIRST_WAVE and waves > 1:
            return 1
        return None

    def request(
        self, validated: ValidationPassed, default_waves: list[WavePlan]
    ) -> RolloutRequested:
        """The rollout this policy asks for when ``validated`` passed."""
        extra = {
            k: v
            for k, v in {
                "bake_seconds": self.bake_seconds,
                "converge_timeout_seconds": self.converge_timeout_seconds,
                "window": self.window,
                "max_unavailable": self.max_unavailable,
                "max_unavailable_percent": self.max_unavailable_percent,
            }.items()
            if v is not None
        }
        return RolloutRequested(
            rollout_id=uuid.uuid5(_NAMESPACE, str(validated.event_id)),
            model=validated.model,
            version=validated.version,
            digest=validated.digest,
            selector=dict(self.selector or {}),
            waves=list(self.waves or default_waves),
            max_failures=self.max_failures,
            max_failures_percent=self.max_failures_percent,
            requested_by=POLICY_ACTOR,
            **extra,
        )


async def load_policy(conn: Conn, model: str) -> ReleasePolicy | None:
    """The model's policy, or None (no automatic rollouts, no gate)."""
    row = await conn.fetchrow("SELECT * FROM policies WHERE model = $1", model)
    if row is None:
        return None
    return ReleasePolicy(
        auto_rollout=row["auto_rollout"],
        selector=json.loads(row["selector"]) if row["selector"] else None,
        waves=[WavePlan.model_validate(w) for w in json.loads(row["waves"])]
        if row["waves"]
        else None,
        bake_seconds=row["bake_seconds"],
        converge_timeout_seconds=row["converge_timeout_seconds"],
        max_failures=row["max_failures"],
        max_failures_percent=row["max_failures_percent"],
        approval=Approval(row["approval"]),
        approval_labels=json.loads(row["approval_labels"]) if row["approval_labels"] else None,
        window=row["window_spec"],
        max_unavailable=row["max_unavailable"],
        max_unavailable_percent=row["max_unavailable_percent"],
        shadow_first=ShadowSpec.model_validate_json(row["shadow_first"])
        if row["shadow_first"]
        else None,
    )


async def save_policy(conn: Conn, model: str, policy: ReleasePolicy, actor: str) -> None:
    """Create or replace the model's policy."""
    await conn.execute(
        """INSERT INTO policies (model, auto_rollout, selector, waves, bake_seconds,
               converge_timeout_seconds, max_failures, max_failures_percent, approval,
               updated_by, updated_at, approval_labels, window_spec, max_unavailable,
               max_unavailable_percent, shadow_first)
           VALUES ($1, $2, $3::jsonb, $4::jsonb, $5, $6, $7, $8, $9, $10, now(), $11::jsonb,
                   $12, $13, $14, $15::jsonb)
           ON CONFLICT (model) DO UPDATE SET auto_rollout = $2, selector = $3::jsonb,
               waves = $4::jsonb, bake_seconds = $5, converge_timeout_seconds = $6,
               max_failures = $7, max_failures_percent = $8, approval = $9,
               updated_by = $10, updated_at = now(), approval_labels = $11::jsonb,
               window_spec = $12, max_unavailable = $13, max_unavailable_percent = $14,
               shadow_first = $15::jsonb""",
        model,
        policy.auto_rollout,
        json.dumps(policy.selector) if policy.selector else None,
        json.dumps([w.model_dump(exclude_none=True) for w in policy.waves])
        if policy.waves
        else None,
        policy.bake_seconds,
        policy.converge_timeout_seconds,
        policy.max_failures,
        policy.max_failures_percent,
        policy.approval.value,
        actor,
        json.dumps(policy.approval_labels) if policy.approval_labels else None,
        policy.window,
        policy.max_unavailable,
        policy.max_unavailable_percent,
        policy.shadow_first.model_dump_json() if policy.shadow_first else None,
    )
