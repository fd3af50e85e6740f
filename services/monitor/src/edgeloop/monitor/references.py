"""Reference profiles from the registry's API, cached per version."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import replace
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from edgeloop.contracts.calibration import REPORT_KEY, CalibrationMap
from edgeloop.monitor.aggregate import Reference

log = logging.getLogger(__name__)


class UnknownVersion(LookupError):
    """The registry has no such version, or no reference profile for it."""


#: how long a version the registry did not know is taken as unknown before it is asked again
UNKNOWN_SECONDS = 30.0
#: the unknown versions remembered at most (the oldest go first)
MAX_UNKNOWN = 1024


class References:
    """``Reference`` of a model version (fetched once; a version's profile is immutable).

    That a version is unknown is remembered only for ``UNKNOWN_SECONDS`` (it may be
    registered after its first telemetry) and for the latest ``MAX_UNKNOWN`` versions
    (telemetry names whatever versions its devices report: it must not grow the cache).
    """

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self._cache: dict[tuple[str, str], Reference] = {}
        self._pending: dict[tuple[str, str], float] = {}
        """versions cached before their validation ended → when to ask again (the
        calibration map comes with the validation report)."""
        self._unknown: OrderedDict[tuple[str, str], float] = OrderedDict()
        """(model, version) → until when it is taken as unknown, oldest first."""
        self._lock = asyncio.Lock()

    async def get(self, model: str, version: str) -> Reference:
        """The reference; ``UnknownVersion`` when there is none (network errors raise)."""
        key = (model, version)
        if self._stale(key) and not self._still_unknown(key):
            async with self._lock:
                if self._stale(key) and not self._still_unknown(key):
                    ref, pending = await self._fetch(model, version)
                    if ref is not None:
                        self._cache[key] = ref
                        if pending:
                            self._pending[key] = time.monotonic() + UNKNOWN_SECONDS
                        else:
                            self._pending.pop(key, None)
                    else:
                        self._unknown[key] = time.monotonic() + UNKNOWN_SECONDS
                        while len(self._unknown) > MAX_UNKNOWN:
                            self._unknown.popitem(last=False)
        ref = self._cache.get(key)
        if ref is None:
            raise UnknownVersion(f"{model}@{version} is not in the registry or has no profile")
        return ref

    def _stale(self, key: tuple[str, str]) -> bool:
        if key not in self._cache:
            return True
        until = self._pending.get(key)
        return until is not None and until <= time.monotonic()

    def _still_unknown(self, key: tuple[str, str]) -> bool:
        until = self._unknown.get(key)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._unknown[key]
        return False

    async def _fetch(self, model: str, version: str) -> tuple[Reference | None, bool]:
        """The reference, and whether the version's validation is still to come."""
        async with httpx.AsyncClient(timeout=15, headers=self.headers) as client:
            resp = await client.get(
                f"{self.url}/api/v1/models/{quote(model, safe='')}/versions/"
                f"{quote(version, safe='')}",
                params={"profile": "true"},
            )
        if resp.status_code == 404:
            return None, False
        resp.raise_for_status()
        record = resp.json()
        profile = record.get("profile")
        if not profile:
            return None, False
        ref = Reference.from_profile(model, version, profile)
        report = (record.get("validation_detail") or {}).get("report") or {}
        if REPORT_KEY in report:
            try:
                ref = replace(ref, calibration=CalibrationMap.model_validate(report[REPORT_KEY]))
            except ValidationError as exc:  # no estimate for this version, the rest works
                log.error("%s@%s: unusable calibration map: %s", model, version, exc)
        return ref, record.get("validation_state") not in ("passed", "failed")
