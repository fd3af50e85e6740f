"""The notifier's logic: what a delivery's body says (edgeloop's JSON or the webhook body
Alertmanager sends), how long to wait before the next attempt, and the worker that POSTs
due deliveries, signed, and records each attempt."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from typing import Any, Protocol

import httpx
from prometheus_client import Counter

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import Event
from edgeloop.contracts.webhooks import DELIVERY_HEADER, EVENT_HEADER, signed_headers
from edgeloop.notifier.store import Due, Outcome

log = logging.getLogger(__name__)

ATTEMPTS = Counter(
    "edgeloop_notifier_attempts_total", "Webhook POSTs made, by outcome", ["outcome"]
)
FINISHED = Counter(
    "edgeloop_notifier_deliveries_total",
    "Deliveries finished: delivered, or dead after the last attempt",
    ["status"],
)

#: Alertmanager's "no end time yet" (what it sends for a firing alert).
NO_END = "0001-01-01T00:00:00Z"
#: Events an operator should look at (Alertmanager severity ``warning``; others ``info``).
_WARNINGS = frozenset(
    {
        s.ROLLOUT_ROLLED_BACK,
        s.ROLLOUT_WAVE_FAILED,
        s.ROLLOUT_ABORTED,
        s.ROLLOUT_REFUSED,
        s.IMAGE_BUILD_FAILED,
        s.VALIDATION_FAILED,
    }
)
#: Fields of an event that identify what it is about (labels of an Alertmanager alert).
_IDENTITY = ("model", "version", "rollout_id", "alarm_id", "rule", "kind", "group", "wave")


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2 …): ``base``
    doubling each time, at most ``cap``."""
    return float(min(base * 2 ** (max(attempt, 1) - 1), cap))


def render(
    fmt: str,
    subject: str,
    event: Event,
    *,
    delivery_id: uuid.UUID,
    subscription_id: uuid.UUID,
) -> bytes:
    """The body of a delivery of ``event`` (published on ``subject``) in format ``fmt``;
    fixed when the delivery is created, so every attempt sends the same bytes."""
    data = event.model_dump(mode="json")
    if fmt == "alertmanager":
        doc = alertmanager(subject, data, receiver=f"edgeloop-{subscription_id}")
    else:
        doc = {
            "event": subject,
            "event_id": data["event_id"],
            "occurred_at": data["occurred_at"],
            "delivery_id": str(delivery_id),
            "subscription_id": str(subscription_id),
            "data": data,
        }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _alertname(subject: str) -> str:
    """``rollout.rolled_back`` → ``EdgeloopRolloutRolledBack``."""
    words = subject.replace(".", "_").split("_")
    return "Edgeloop" + "".join(w.capitalize() for w in words)


def alertmanager(subject: str, data: dict[str, Any], *, receiver: str) -> dict[str, Any]:
    """The body Alertmanager's webhook receiver sends (version 4) for one event: one
    alert, ``firing`` (``resolved`` for ``alarm.resolved``, with the same alert name and
    fingerprint as the alarm it resolves)."""
    resolved = subject == s.ALARM_RESOLVED
    is_alarm = subject in (s.ALARM_RAISED, s.ALARM_RESOLVED)
    name = "EdgeloopAlarm" if is_alarm else _alertname(subject)
    labels = {"alertname": name}
    labels |= {k: str(data[k]) for k in _IDENTITY if data.get(k) not in (None, "")}
    if is_alarm:  # raised and resolved carry different fields: they share these
        labels = {k: v for k, v in labels.items() if k in ("alertname", "model", "version")}
        labels |= {"alarm_id": str(data["alarm_id"]), "rule": str(data["rule"])}
    labels["severity"] = str(
        data.get("severity") or ("warning" if subject in _WARNINGS else "info")
    )
    identity = data.get("alarm_id") if is_alarm else data["event_id"]
    fingerprint = hashlib.sha256(f"{name}:{identity}".encode()).hexdigest()[:16]
    ref = f"{data['model']}@{data['version']}" if data.get("model") else ""
    why = data.get("message") or data.get("reason") or ""
    annotations = {
        "summary": f"{subject} {ref}".strip(),
        "description": str(why),
        "event_id": str(data["event_id"]),
    }
    at = str(data["occurred_at"]).replace("+00:00", "Z")
    alert = {
        "status": "resolved" if resolved else "firing",
        "labels": labels,
        "annotations": annotations,
        "startsAt": at,
        "endsAt": at if resolved else NO_END,
        "generatorURL": "",
        "fingerprint": fingerprint,
    }
    return {
        "version": "4",
        "groupKey": f"{{}}:{{alertname={name!r}}}",
        "truncatedAlerts": 0,
        "status": alert["status"],
        "receiver": receiver,
        "groupLabels": {"alertname": name},
        "commonLabels": labels,  # one alert: every label is common
        "commonAnnotations": {k: v for k, v in annotations.items() if k == "summary"},
        "externalURL": "",
        "alerts": [alert],
    }


class TestEvent(Event):
    """The event ``notify test`` sends (never on the bus; its subject is ``notify.test``)."""

    __test__ = False  # not a pytest test class

    message: str = "a test delivery from edgeloop notify test"
    model: str = "edgeloop-notify-test"
    version: str = "0"


class Deliveries(Protocol):
    """What the worker needs of the store (``edgeloop.notifier.store.PgDeliveries``)."""

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Due]:
        """Lease due deliveries."""

    async def record(
        self, due: Due, owner: str, outcome: Outcome, *, retry_in: float, max_attempts: int
    ) -> str | None:
        """Log an attempt; the delivery's new status."""

    async def release(self, owner: str) -> None:
        """Drop this replica's leases."""


class Deliverer:
    """POSTs due deliveries, signed (:mod:`edgeloop.contracts.webhooks`), and records
    each attempt; a failed one is tried again after :func:`backoff`, and a delivery is
    dead after ``max_attempts``. Several replicas share the work through leases."""

    def __init__(
        self,
        store: Deliveries,
        *,
        owner: str,
        max_attempts: int,
        retry_base: float,
        retry_max: float,
        timeout: float,
        concurrency: int,
        poll_seconds: float,
        lease_seconds: float,
    ) -> None:
        self.store = store
        self.owner = owner
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.timeout = timeout
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self.lease_seconds = max(lease_seconds, timeout + 5)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look for due deliveries now (a new one was committed)."""
        self._wake.set()

    async def run(self) -> None:
        """Send due deliveries until cancelled; on the way out, give the leases back."""
        try:
            async with httpx.AsyncClient(
                timeout=self.timeout, follow_redirects=False, trust_env=False
            ) as client:
                while True:
                    self._wake.clear()
                    due = await self.store.claim(self.owner, self.concurrency, self.lease_seconds)
                    if due:
                        await asyncio.gather(*(self._send(client, d) for d in due))
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release(self.owner))

    async def _send(self, client: httpx.AsyncClient, due: Due) -> None:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "edgeloop-notifier/1",
            DELIVERY_HEADER: str(due.delivery_id),
            EVENT_HEADER: due.event,
            **signed_headers(due.secret, due.body),
        }
        started = time.perf_counter()
        try:
            resp = await client.post(due.url, content=due.body, headers=headers)
            ok = 200 <= resp.status_code < 300
            error = None if ok else f"HTTP {resp.status_code}: {resp.text[:200]}"
            outcome = Outcome(ok, resp.status_code, error, 0.0)
        except httpx.HTTPError as exc:
            outcome = Outcome(False, None, f"{type(exc).__name__}: {exc}"[:500], 0.0)
        ms = (time.perf_counter() - started) * 1000
        outcome = Outcome(outcome.ok, outcome.status_code, outcome.error, ms)
        attempt = due.attempts + 1
        status = await self.store.record(
            due,
            self.owner,
            outcome,
            retry_in=backoff(attempt, self.retry_base, self.retry_max),
            max_attempts=self.max_attempts,
        )
        if status is not None:
            ATTEMPTS.labels("ok" if outcome.ok else "failed").inc()
        if status in ("delivered", "dead"):
            FINISHED.labels(status).inc()
        if status == "dead":
            log.warning(
                "delivery %s (%s to %s) dead after %d attempts: %s",
                due.delivery_id,
                due.event,
                due.url,
                attempt,
                outcome.error,
            )
        elif status == "pending":
            log.info("delivery %s attempt %d failed: %s", due.delivery_id, attempt, outcome.error)
