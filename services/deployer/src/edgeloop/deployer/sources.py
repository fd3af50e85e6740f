"""What the deployer asks other services: the registry (is this version validated, and
which image is it) and the gateway's device registry (which devices a selector matches,
and which of them are online).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from edgeloop.deployer.plan import Presence


class Refused(Exception):
    """A rollout request that cannot be admitted, with the HTTP status that says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class NotYet(Refused):
    """Not admissible yet but may become so (the version is still being validated)."""


@dataclass(frozen=True)
class ValidatedImage:
    """A version that passed validation, and the image to deploy."""

    model: str
    version: str
    image: str
    digest: str
    model_digest: str | None
    trace_parent: str | None = None
    """The version's trace (its registration's span)."""


class Registry:
    """The registry's HTTP API."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    async def version(self, model: str, version: str) -> dict[str, Any]:
        """The registry's record of ``model@version``; ``Refused`` (404) when unknown.

        Transport errors and 5xx propagate (they are retried).
        """
        async with httpx.AsyncClient(timeout=15, headers=self.headers) as client:
            resp = await client.get(self._version_url(model, version))
        if resp.status_code == 404:
            raise Refused(404, f"model {model} has no version {version} in the registry")
        resp.raise_for_status()
        return dict(resp.json())

    async def set_stage(self, model: str, version: str, verb: str, **body: Any) -> dict[str, Any]:
        """``POST …/{verb}`` (deprecate, retire) on the version; its record after.

        ``httpx.HTTPStatusError`` when the registry refuses, transport errors propagate.
        """
        async with httpx.AsyncClient(timeout=15, headers=self.headers) as client:
            resp = await client.post(f"{self._version_url(model, version)}/{verb}", json=body)
        resp.raise_for_status()
        return dict(resp.json())

    def _version_url(self, model: str, version: str) -> str:
        name, ver = quote(model, safe=""), quote(version, safe="")
        return f"{self.url}/api/v1/models/{name}/versions/{ver}"

    async def validated_image(self, model: str, version: str) -> ValidatedImage:
        """The validated image of ``model@version``; ``Refused``/``NotYet`` otherwise.

        Transport errors and 5xx propagate (they are retried).
        """
        record = await self.version(model, version)
        if record.get("stage", "active") != "active":
            why = f": {record['stage_reason']}" if record.get("stage_reason") else ""
            raise Refused(
                409,
                f"{model}@{version} is {record['stage']}{why}; new rollouts of it are "
                "refused (roll out a newer version)",
            )
        state = record.get("validation_state")
        detail = record.get("validation_detail") or {}
        build = record.get("build_detail") or {}
        if state == "failed":
            reasons = "; ".join(detail.get("reasons") or []) or "no reason recorded"
            raise Refused(409, f"{model}@{version} failed validation: {reasons}")
        if state != "passed":
            raise NotYet(
                409,
                f"{model}@{version} is not validated yet (build {record.get('build_state')}, "
                f"validation {state}); only validated versions can be rolled out",
            )
        image, digest = build.get("image"), detail.get("digest") or build.get("digest")
        if not image or not digest:
            raise Refused(409, f"{model}@{version} is validated but has no image recorded")
        return ValidatedImage(
            model, version, image, digest, record.get("model_digest"), record.get("trace_parent")
        )


class Monitor:
    """The monitor's HTTP API (shadow comparisons)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    async def shadow(self, model: str, version: str, rollout_id: uuid.UUID) -> dict[str, Any]:
        """The monitor's comparison of the challenger ``model@version`` with the champions
        of one shadow rollout (``GET /v1/shadow``); errors propagate (retried)."""
        async with httpx.AsyncClient(timeout=15, headers=self.headers) as client:
            resp = await client.get(
                f"{self.url}/v1/shadow",
                params={"model": model, "version": version, "rollout_id": str(rollout_id)},
            )
        resp.raise_for_status()
        return dict(resp.json())


class Devices:
    """The gateway's device registry."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    async def running(self, model: str, version: str) -> list[str]:
        """Ids of the enrolled devices running ``model@version`` by their last report (the
        device twin's reported half, as the gateway keeps it: offline devices count)."""
        return sorted(
            d["device_id"]
            for d in await self.enrolled({})
            if d.get("model") == model and d.get("version") == version
        )

    async def presence(
        self, selector: dict[str, str], device_ids: Iterable[str]
    ) -> dict[str, Presence]:
        """Online state, last-seen time and last report of each of ``device_ids`` that is
        still enrolled (a revoked device is missing)."""
        wanted = set(device_ids)
        return {
            d["device_id"]: presence_of(d)
            for d in await self.enrolled(selector)
            if d["device_id"] in wanted
        }

    async def enrolled(self, selector: dict[str, str]) -> list[dict[str, Any]]:
        """The enrolled (not revoked) devices whose labels match ``selector``."""
        text = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        out: list[dict[str, Any]] = []
        page, offset = 10_000, 0
        async with httpx.AsyncClient(timeout=30, headers=self.headers) as client:
            while True:
                resp = await client.get(
                    f"{self.url}/v1/devices",
                    params={"selector": text, "limit": page, "offset": offset},
                )
                resp.raise_for_status()
                devices = resp.json()["devices"]
                offset += len(devices)
                out.extend(d for d in devices if not d.get("revoked"))
                if len(devices) < page:
                    return out


def presence_of(device: dict[str, Any]) -> Presence:
    """A device of the gateway's ``/v1/devices`` as :class:`Presence`."""
    seen = device.get("last_seen")
    return Presence(
        online=bool(device.get("online")),
        last_seen=datetime.fromisoformat(seen) if seen else None,
        state=device.get("state"),
        error=device.get("error"),
    )
