"""Reference profiles from the registry's API, cached per version."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from urllib.parse import quote

import httpx

from edgeloop.monitor.aggregate import Reference


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
        self._unknown: OrderedDict[tuple[str, str], float] = OrderedDict()
        """(model, version) → until when it is taken as unknown, oldest first."""
        self._lock = asyncio.Lock()

    async def get(self, model: str, version: str) -> Reference:
        """The reference; ``UnknownVersion`` when there is none (network errors raise)."""
        key = (model, version)
        if key not in self._cache and not self._still_unknown(key):
            async with self._lock:
                if key not in self._cache and not self._still_unknown(key):
                    ref = await self._fetch(model, version)
                    if ref is not None:
                        self._cache[key] = ref
                    else:
                        self._unknown[key] = time.monotonic() + UNKNOWN_SECONDS
                        while len(self._unknown) > MAX_UNKNOWN:
                            self._unknown.popitem(last=False)
        ref = self._cache.get(key)
        if ref is None:
            raise UnknownVersion(f"{model}@{version} is not in the registry or has no profile")
        return ref

    def _still_unknown(self, key: tuple[str, str]) -> bool:
        until = self._unknown.get(key)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._unknown[key]
        return False

    async def _fetch(self, model: str, version: str) -> Reference | None:
        async with httpx.AsyncClient(timeout=15, headers=self.headers) as client:
            resp = await client.get(
                f"{self.url}/api/v1/models/{quote(model, safe='')}/versions/"
                f"{quote(version, safe='')}",
                params={"profile": "true"},
            )
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        profile = resp.json().get("profile")
        if not profile:
            return None
        return Reference.from_profile(model, version, profile)
