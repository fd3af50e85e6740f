"""Wiring of the validator service."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from edgeloop.kit.oci import OciClient
from edgeloop.kit.oci.image import read_layer_file
from edgeloop.kit.oci.signing import load_public_key
from edgeloop.kit.service import Service, configure_logging
from edgeloop.validator.config import ValidatorSettings
from edgeloop.validator.handlers import register_handlers
from edgeloop.validator.service import Validator, _repo

MIGRATIONS = Path(__file__).resolve().parents[3] / "migrations"


class RegistryChampions:
    """The champion alias from the registry's API; its image from this service's reports."""

    def __init__(self, svc: Service, oci: OciClient, api: str, token: str) -> None:
        self.svc = svc
        self.oci = oci
        self.api = api.rstrip("/")
        self.token = token

    async def champion_model(self, model: str) -> tuple[str, bytes] | None:
        async with httpx.AsyncClient(timeout=10) as client:
            resp = await client.get(
                f"{self.api}/api/v1/models/{model}/aliases/champion",
                headers={"Authorization": f"Bearer {self.token}"},
            )
        if resp.status_code == 404:
            return None
        resp.raise_for_status()  # unreachable or failing registry: retried by the kit
        version = str(resp.json()["version"])
        row = await self.svc.pool.fetchrow(
            "SELECT image, digest FROM reports WHERE model = $1 AND version = $2", model, version
        )
        if row is None:
            return None  # a champion this validator never saw: nothing to compare with
        onnx = await read_layer_file(
            self.oci, _repo(row["image"]), row["digest"], "model/model.onnx"
        )
        return version, onnx


def build(settings: ValidatorSettings) -> Service:
    """The validator service, ready to ``run()``."""
    svc = Service("validator", settings, migrations=MIGRATIONS)
    oci = OciClient(settings.oci_registry_url)
    validator = Validator(
        oci,
        load_public_key(settings.public_key),
        RegistryChampions(
            svc, oci, settings.registry_api, settings.registry_token.get_secret_value()
        ),
        tolerance=settings.regression_tolerance,
        min_accuracy=settings.min_accuracy,
        threads=[int(t) for t in settings.profile_threads.split(",") if t.strip()],
        runs=settings.profile_runs,
    )
    backoff = tuple(float(x) for x in settings.retry_backoff.split(",") if x.strip())
    register_handlers(svc, validator, settings.max_attempts, backoff)
    return svc


def main() -> None:
    """``python -m edgeloop.validator``."""
    settings = ValidatorSettings()
    configure_logging(settings.log_level)
    asyncio.run(build(settings).run())
