"""Reference profiles from the registry's API, cached per version."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import httpx

from edgeloop.monitor.aggregate import Reference


class UnknownVersion(LookupError):
    """The registry has no such version, or no reference profile for it."""


class References:
    """``Reference`` of a model version (fetched once; a version's profile is immutable)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self._cache: dict[tuple[str, str], Reference | None] = {}
        self._lock = asyncio.Lock()

    async def get(self, model: str, version: str) -> Reference:
        """The reference; ``UnknownVersion`` when there is none (network errors raise)."""
        key = (model, version)
        if key not in self._cache:
            async with self._lock:
                if key not in self._cache:
                    self._cache[key] = await self._fetch(model, version)
        ref = self._cache[key]
        if ref is None:
            raise UnknownVersion(f"{model}@{version} is not in the registry or has no profile")
        return ref

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
