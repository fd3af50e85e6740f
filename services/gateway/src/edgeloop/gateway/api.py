"""The gateway's HTTP API (FastAPI; OpenAPI at ``/docs``): enrolment and the device
registry. Thin: parse, call the store or the CA, answer."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, Field

from edgeloop.contracts.names import check_device_id, check_labels
from edgeloop.contracts.signing import fingerprint, load_public_key
from edgeloop.gateway.devices import DeviceStore
from edgeloop.gateway.pki import CertificateAuthority
from edgeloop.kit.api import Actor, DeviceWriter, new_api


class EnrollBody(BaseModel):
    """Body of ``POST /v1/devices/{id}/enroll``."""

    labels: dict[str, str] = Field(default_factory=dict)


def parse_selector(text: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` → dict (422 on a malformed pair)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise HTTPException(422, f"selector takes k=v[,k=v…], got {part!r}")
        out[key] = value
    return check_labels(out)


def create_api(
    store: DeviceStore,
    ca: CertificateAuthority,
    tokens: frozenset[str],
    *,
    gateway_address: str,
    signing_public_key: bytes | None,
) -> FastAPI:
    """The ASGI app."""
    api = new_api(
        title="edgeloop gateway",
        version="1",
        description="Device enrolment (mTLS certificates) and the device registry.",
    )
    api.state.tokens = tokens
    api.state.pool = lambda: store.pool

    @api.post("/v1/devices/{device_id}/enroll", status_code=201)
    async def enroll(device_id: str, body: EnrollBody, who: DeviceWriter) -> dict[str, Any]:
        """Issue the device's certificate (replacing any earlier one) and its bundle."""
        check_device_id(device_id)  # InvalidName: 422 naming the rule
        labels = check_labels(body.labels)
        issued = ca.issue_device(device_id)
        record = await store.enroll(device_id, labels, issued, actor=who)
        return {
            "device_id": device_id,
            "labels": record.labels,
            "certificate": issued.cert_pem.decode(),
            "private_key": issued.key_pem.decode(),
            "ca_certificate": ca.cert_pem.decode(),
            "gateway_address": gateway_address,
            "signing_public_key": signing_public_key.decode() if signing_public_key else None,
            # the device pins this key: its fingerprint, for checking it out of band
            "signing_key_fingerprint": (
                fingerprint(load_public_key(signing_public_key)) if signing_public_key else None
            ),
            "fingerprint": issued.fingerprint,
            "expires_at": issued.not_after.isoformat(),
            "enrolled_by": who,
        }

    @api.get("/v1/devices")
    async def list_devices(
        _: Actor,
        selector: str | None = None,
        online: bool | None = None,
        limit: int = Query(1000, ge=1, le=10_000),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        """Devices whose labels match the selector."""
        records = await store.list(
            parse_selector(selector), online=online, limit=limit, offset=offset
        )
        return {"devices": [r.as_dict() for r in records]}

    @api.get("/v1/device-counts")
    async def count(_: Actor, selector: str | None = None) -> dict[str, int]:
        """How many devices whose labels match the selector are online and offline."""
        return await store.counts(parse_selector(selector))

    @api.get("/v1/devices/{device_id}")
    async def show(device_id: str, _: Actor) -> dict[str, Any]:
        """One device."""
        record = await store.get(device_id)
        if record is None:
            raise HTTPException(404, f"device {device_id} is not enrolled")
        return record.as_dict()

    @api.post("/v1/devices/{device_id}/revoke")
    async def revoke(device_id: str, who: DeviceWriter) -> dict[str, Any]:
        """Refuse the device's certificate: its live sessions end within a second, its
        artifact fetches and next sessions are refused."""
        if not await store.revoke(device_id, actor=who):
            raise HTTPException(404, f"device {device_id} is not enrolled")
        return {"device_id": device_id, "revoked": True}

    return api
