"""Each API's ``/docs`` renders its operations in Chromium with no route to the internet
(an edge site, an air-gapped plant): Swagger UI's scripts and styles come from the
service itself, never from a CDN.

Drives Debian's ``chromium`` (``make setup`` installs it) with Playwright; every request
that is not to 127.0.0.1 is refused, as on a machine without internet. A screenshot of
each page is left in the test's directory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Route
from playwright.async_api import TimeoutError as PageTimeout

from edgeloop.devstack.servers import NatsServer, free_port
from edgeloop.notifier.app import build as build_notifier
from edgeloop.notifier.config import NotifierSettings
from tests.deploy_harness import TOKEN, DeployStack, monitor_beside

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
async def apis(
    deploy: DeployStack, nats_private: NatsServer, private_dsn: str, registry_url: str
) -> AsyncIterator[dict[str, str]]:
    """Base URL of each service's HTTP API: registry, gateway, deployer, monitor,
    notifier."""
    port, notifier_port = free_port(), free_port()
    monitor = monitor_beside(deploy, nats_private.url, private_dsn, registry_url, port)
    notifier = build_notifier(
        NotifierSettings(
            nats_url=nats_private.url,
            database_url=private_dsn,
            api_tokens=TOKEN,
            api_port=notifier_port,
        )
    )
    async with monitor.running(), notifier.running():
        yield {
            "registry": str(deploy.registry.base_url).rstrip("/"),
            "gateway": str(deploy.edge.api.base_url).rstrip("/"),
            "deployer": str(deploy.api.base_url).rstrip("/"),
            "monitor": f"http://127.0.0.1:{port}",
            "notifier": f"http://127.0.0.1:{notifier_port}",
        }


#: An operation of each API that its page must list.
KNOWN = {
    "registry": "/api/v1/models",
    "gateway": "/v1/devices",
    "deployer": "/v1/rollouts",
    "monitor": "/v1/alarms",
    "notifier": "/v1/subscriptions",
}


async def test_every_docs_page_lists_its_operations_with_no_internet(
    browser: Browser, apis: dict[str, str], tmp_path: Path
) -> None:
    refused: list[str] = []

    async def offline(route: Route) -> None:
        # as on a machine with no route out: only this machine answers
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            await route.continue_()
        else:
            refused.append(route.request.url)
            await route.abort("internetdisconnected")

    context = await browser.new_context(viewport={"width": 1280, "height": 1600})
    await context.route("**/*", offline)
    try:
        for name, base in apis.items():
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                spec = (await client.get("/openapi.json")).json()  # public, as /docs
            operations = sum(
                1
                for item in spec["paths"].values()
                for method in item
                if method in ("get", "put", "post", "delete", "patch")
            )
            page = await context.new_page()
            await page.goto(f"{base}/docs", wait_until="load")
            known = page.locator(f".opblock-summary-path[data-path='{KNOWN[name]}']")
            try:
                await known.first.wait_for(timeout=20_000)
            except PageTimeout:
                raise AssertionError(
                    f"{name}'s /docs lists no {KNOWN[name]} with no internet; "
                    f"requests refused: {refused}"
                ) from None
            finally:
                await page.screenshot(path=str(tmp_path / f"{name}-docs.png"), full_page=True)
            listed = await page.locator(".opblock").count()
            assert listed == operations, f"{name}: {listed} operations listed of {operations}"
            await page.close()
    finally:
        await context.close()
    assert not refused, f"the docs pages asked the internet for {refused}"

    # the pages' assets need no token, and their prefix opens nothing else
    async with httpx.AsyncClient(base_url=apis["registry"], timeout=10) as anonymous:
        assert (await anonymous.get("/docs/assets/swagger-ui.css")).status_code == 200
        assert (await anonymous.get("/api/v1/models")).status_code == 401
        sneaky = await anonymous.get("/docs/assets/%2e%2e/%2e%2e/api/v1/models")
        assert sneaky.status_code == 404, sneaky.text
