"""Headless Chromium for the browser tests (Debian's ``chromium``, driven by Playwright
with no browser download of its own); the ``browser`` fixture is in ``conftest.py``."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, async_playwright

#: Debian's browser (``make setup`` installs the ``chromium`` package).
CHROMIUM = shutil.which("chromium") or shutil.which("/usr/bin/chromium")

#: What Chromium does on its own (updates, sync, …) would be refused by this machine's
#: closed network at every start: off, with the sandbox that needs a non-root user.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Headless Chromium (the test is skipped where no Chromium is installed)."""
    if CHROMIUM is None:
        pytest.skip(
            "no Chromium found (chromium not on PATH, no /usr/bin/chromium): `make setup` "
            "installs Debian's chromium package"
        )
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()
