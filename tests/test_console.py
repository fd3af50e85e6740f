"""The ops console in Chromium against a real stack: the registry, the gateway with real
agents, the deployer as its own process, the monitor, a trace collector, on private NATS
and PostgreSQL (one stack for the module). People sign in with tokens the registry
issued (operators alice and bob, viewer vera, admin ada); the console calls the APIs with them.

Each test leaves a screenshot of what it checked in its directory (``tmp_path``).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from edgeloop.console.app import serving
from edgeloop.devstack.nats_auth import NatsAuth
from edgeloop.devstack.servers import NatsServer, Postgres, free_port
from edgeloop.devstack.testing import eventually
from edgeloop.devstack.traces import Collector
from tests.deploy_harness import DeployStack, console_beside, deploy_stack, monitor_beside
from tests.modelzoo import classifier

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@dataclass
class Console:
    """The stack, the console's URL and the people's tokens."""

    stack: DeployStack
    url: str
    tokens: dict[str, str]
    group: list[str]
    """Devices labelled ``group=a-<unique>`` (running agents)."""
    gated: list[str]
    """Devices labelled ``group=b-<unique>`` (running agents)."""
    monitor_dsn: str
    monitor_url: str

    def as_user(self, name: str) -> httpx.AsyncClient:
        """A client of the deployer's API with ``name``'s token."""
        return httpx.AsyncClient(
            base_url=str(self.stack.api.base_url),
            headers={"Authorization": f"Bearer {self.tokens[name]}"},
            timeout=30,
        )


@pytest.fixture(scope="module")
async def console(
    tmp_path_factory: pytest.TempPathFactory,
    nats_auth: NatsAuth,
    postgres: Postgres,
    registry_url: str,
) -> AsyncIterator[Console]:
    root = tmp_path_factory.mktemp("console")
    unique = uuid.uuid4().hex[:8]
    nats = NatsServer(root / "nats", auth=nats_auth).start()
    nats_auth.bootstrap(nats.url)
    dsn = await asyncio.to_thread(postgres.create_database, f"t_{unique}")
    collector = Collector()
    await collector.start()
    with pytest.MonkeyPatch.context() as mp:
        # every service of the stack (the deployer's process too) sends its spans here
        mp.setenv("EDGELOOP_OTLP_ENDPOINT", collector.otlp_endpoint)
        try:
            async with deploy_stack(nats.url, dsn, registry_url, root, unique) as st:
                monitor_port = free_port()
                monitor = monitor_beside(st, nats.url, dsn, registry_url, monitor_port)
                async with monitor.running():
                    tokens = {}
                    for name, role in (
                        ("alice", "operator"),
                        ("bob", "operator"),
                        ("vera", "viewer"),
                        ("ada", "admin"),  # what `make up`'s own token is
                    ):
                        resp = await st.registry.post(
                            "/api/v1/tokens", json={"name": f"{name}-{unique}", "role": role}
                        )
                        assert resp.status_code == 201, resp.text
                        tokens[name] = resp.json()["token"]
                    group = await st.devices(3, {"group": f"a-{unique}"}, prefix="a")
                    gated = await st.devices(2, {"group": f"b-{unique}"}, prefix="b")
                    settings = console_beside(
                        st,
                        monitor_port,
                        traces_api=collector.query_url,
                        nats_monitor_url=nats.monitor_url,
                        live_poll_seconds=0.2,
                    )
                    async with serving(settings) as url:
                        yield Console(
                            st, url, tokens, group, gated, dsn, f"http://127.0.0.1:{monitor_port}"
                        )
                    for agent in list(st.agents.values()):
                        await st.edge.stop_agent(agent)
        finally:
            await collector.stop()
            nats.stop()


async def sign_in(browser: Browser, console: Console, who: str) -> tuple[BrowserContext, Page]:
    """A browser of its own, signed in as ``who``; on the overview."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(f"{console.url}/")
    assert "/signin" in page.url  # no session: the sign-in form
    await page.fill("#token", console.tokens[who])
    await page.click("#signin")
    await expect(page.locator("#who")).to_contain_text(who)
    return context, page


async def validated(console: Console, model: str) -> None:
    await console.stack.validated(model, "1", classifier("iris").onnx)


async def completed_rollout(console: Console, model: str, group: str) -> str:
    """A validated ``model``@1 rolled out in one wave to the devices of ``group`` (a or
    b), completed; the rollout's id."""
    st = console.stack
    await validated(console, model)
    code, body = await st.start(
        model, "1", {"group": f"{group}-{st.unique}"}, waves=[{"percent": 100}], bake_seconds=0
    )
    assert code == 201, body
    await st.wait_rollout(body["rollout_id"], "completed")
    return str(body["rollout_id"])


async def test_sign_in_shows_the_overview(
    browser: Browser, console: Console, tmp_path: Path
) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"{console.url}/signin")
    await page.fill("#token", "elt_not-a-token-of-anyone-at-all-xyz")
    await page.click("#signin")
    await expect(page.locator("#error")).to_contain_text("invalid API token")
    await context.close()

    context, page = await sign_in(browser, console, "alice")
    try:
        await expect(page.locator("#role")).to_have_text("operator")
        for service in ("registry", "deployer", "monitor", "gateway", "traces", "nats"):
            await expect(page.locator(f"#health li[data-service={service}]")).to_have_class("ok")
        await expect(page.locator("#online")).to_have_text("5")
        await expect(page.locator("#dlq-depth")).to_have_text("0")
        cookies = {c["name"]: c for c in await context.cookies()}
        session = cookies["edgeloop_console"]
        assert session["httpOnly"]
        assert session["sameSite"] == "Strict"
        assert console.tokens["alice"] not in session["value"]  # the token stays server-side
        await page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
    finally:
        await context.close()


async def test_waves_advance_live_while_a_rollout_runs(
    browser: Browser, console: Console, tmp_path: Path
) -> None:
    model = f"live{console.stack.unique}"
    await validated(console, model)
    context, page = await sign_in(browser, console, "alice")
    try:
        async with console.as_user("alice") as alice:
            resp = await alice.post(
                "/v1/rollouts",
                json={
                    "model": model,
                    "version": "1",
                    "selector": {"group": f"a-{console.stack.unique}"},
                    "waves": [{"count": 1}, {"percent": 100}],
                    "bake_seconds": 2,
                },
            )
        assert resp.status_code == 201, resp.text
        rid = resp.json()["rollout_id"]
        await page.goto(f"{console.url}/rollouts/{rid}")
        await page.evaluate("window.__same_page = true")  # gone if the page reloads
        first = page.locator("#waves tr[data-wave='0']")
        await expect(first).not_to_have_attribute("data-state", "succeeded")
        await page.screenshot(path=str(tmp_path / "rollout-wave-0.png"), full_page=True)
        last = page.locator("#waves tr[data-wave='1']")
        await expect(last).to_have_attribute("data-state", "succeeded", timeout=90_000)
        await expect(page.locator("#rollout-state")).to_have_text("completed", timeout=30_000)
        await expect(last.locator(".converged")).to_contain_text("2")
        assert await page.evaluate("window.__same_page === true")
        assert int(await page.locator("#live").get_attribute("data-updates") or 0) >= 2
        await page.screenshot(path=str(tmp_path / "rollout-completed.png"), full_page=True)
    finally:
        await context.close()


async def test_a_second_operator_approves_a_gated_rollout_from_the_page(
    browser: Browser, console: Console, tmp_path: Path
) -> None:
    st = console.stack
    model = f"gated{st.unique}"
    await validated(console, model)
    resp = await st.api.put(f"/v1/policies/{model}", json={"approval": "before_rollout"})
    assert resp.status_code == 200, resp.text
    async with console.as_user("alice") as alice:
        resp = await alice.post(
            "/v1/rollouts",
            json={
                "model": model,
                "version": "1",
                "selector": {"group": f"b-{st.unique}"},
                "waves": [{"percent": 100}],
                "bake_seconds": 0,
            },
        )
    assert resp.status_code == 201, resp.text
    rid = resp.json()["rollout_id"]
    await st.wait_rollout(rid, "awaiting_approval")

    context, page = await sign_in(browser, console, "alice")
    try:
        await page.goto(f"{console.url}/rollouts/{rid}")
        await page.click("#actions button[data-action=approve]")
        await expect(page.locator("#refused")).to_contain_text(
            "approval must come from someone else"
        )
        await page.screenshot(path=str(tmp_path / "requester-refused.png"), full_page=True)
    finally:
        await context.close()
    assert (await st.rollout(rid))["state"] == "awaiting_approval"

    context, page = await sign_in(browser, console, "bob")
    try:
        await page.goto(f"{console.url}/rollouts/{rid}")
        await page.click("#actions button[data-action=approve]")
        await expect(page.locator("#done")).to_contain_text("approve")
        await expect(page.locator("#rollout-state")).to_have_text(
            re.compile("running|completed"), timeout=30_000
        )
        await page.screenshot(path=str(tmp_path / "approved.png"), full_page=True)
    finally:
        await context.close()
    done = await st.wait_rollout(rid, "completed")
    assert done["approved_by"] == f"bob-{st.unique}"


async def raise_alarm(console: Console, model: str) -> str:
    """An alarm as the monitor raises it (its row; the console reads it from the API)."""
    alarm_id = str(uuid.uuid4())
    conn = await asyncpg.connect(console.monitor_dsn)
    try:
        await conn.execute(
            """INSERT INTO monitor.alarms (alarm_id, model, version, rule, kind, state,
                   message, scores, window_start, window_end)
               VALUES ($1, $2, '1', 'drift.psi', 'drift', 'raised',
                   'feature 2 drifted: PSI 0.41 > 0.2', '{}',
                   now() - interval '1 minute', now())""",
            uuid.UUID(alarm_id),
            model,
        )
    finally:
        await conn.close()
    return alarm_id


async def seed_drift(console: Console, model: str) -> int:
    """Three judged windows of ``model``@1 (feature f0's PSI rising past the threshold)
    and a stored low-confidence sample, as the monitor leaves them; the sample's id."""
    conn = await asyncpg.connect(console.monitor_dsn)
    try:
        for i, psi in enumerate((0.05, 0.12, 0.41)):
            scores = {"features": {"f0": {"psi": psi}}, "kpis": {"error_rate": 0.01 * i}}
            await conn.execute(
                """INSERT INTO monitor.windows (model, version, grp, window_start, window_end,
                       aggregate, count, evaluated, scores)
                   VALUES ($1, '1', 'site=a', now() - make_interval(mins => 10 - $2),
                       now() - make_interval(mins => 9 - $2), '{}', 500, true, $3::jsonb)""",
                model,
                i,
                json.dumps(scores),
            )
        sample: int = await conn.fetchval(
            """INSERT INTO monitor.samples (model, version, device_id, features, prediction,
                   confidence, at)
               VALUES ($1, '1', 'a00', '[1.0, 2.0]', '2', 0.31, now()) RETURNING sample_id""",
            model,
        )
    finally:
        await conn.close()
    return sample


async def test_monitoring_acks_an_alarm_charts_drift_and_labels_a_sample(
    browser: Browser, console: Console, tmp_path: Path
) -> None:
    model = f"ack{console.stack.unique}"
    alarm_id = await raise_alarm(console, model)
    sample = await seed_drift(console, model)
    context, page = await sign_in(browser, console, "alice")
    try:
        await expect(page.locator("#open-alarms")).to_contain_text("PSI 0.41")
        await page.goto(f"{console.url}/monitoring")
        row = page.locator(f"#alarms tr[data-alarm='{alarm_id}']")
        await row.locator("button[data-action=ack]").click()
        await expect(page.locator("#done")).to_contain_text("acknowledged")
        await expect(row.locator(".alarm-state")).to_contain_text(
            f"acknowledged by alice-{console.stack.unique}"
        )
        await page.screenshot(path=str(tmp_path / "alarm-acked.png"), full_page=True)

        # the PSI of each window with the rule's threshold; the sample gets its label
        await page.goto(f"{console.url}/monitoring?model={model}&version=1")
        chart = page.locator("#psi-charts figure[data-feature=f0] svg")
        await expect(chart.locator("polyline")).to_have_count(1)
        assert len((await chart.locator("polyline").get_attribute("points") or "").split()) == 3
        await expect(chart.locator("line[stroke-dasharray]")).to_have_count(1)  # threshold
        await expect(chart).to_contain_text("threshold 0.25")
        await expect(page.locator("#kpis")).to_contain_text("error_rate")
        labelled = page.locator(f"#samples tr[data-sample='{sample}']")
        await labelled.locator("input[name=label]").fill("1")
        await labelled.locator("button[data-action=label]").click()
        await expect(page.locator("#done")).to_contain_text("labelled")
        await expect(labelled).to_contain_text(f"by alice-{console.stack.unique}")
        await page.screenshot(path=str(tmp_path / "monitoring-drift.png"), full_page=True)
    finally:
        await context.close()


async def test_a_versions_trace_waterfall_shows_the_device_activations(
    browser: Browser, console: Console, tmp_path: Path
) -> None:
    st = console.stack
    model = f"traced{st.unique}"
    await completed_rollout(console, model, "a")
    context, page = await sign_in(browser, console, "vera")
    try:
        activations = page.locator(
            "#waterfall g.span[data-service=gateway][data-name^='activate on']"
        )

        # from the list of models to the version's page
        await page.goto(f"{console.url}/models")
        await page.click(f"#models a:text-is('{model}')")
        await page.click("#versions a:text-is('1')")
        await expect(page.locator("#image")).to_contain_text("@sha256:")

        async def three() -> bool:
            await page.goto(f"{console.url}/models/{model}/versions/1")
            return await activations.count() >= 3

        await eventually(three, within=30, what="3 activation spans on the page")
        await expect(page.locator("#waterfall g.span[data-service=registry]").first).to_be_visible()
        await expect(page.locator("#waterfall g.span[data-service=deployer]").first).to_be_visible()
        await page.screenshot(path=str(tmp_path / "trace-waterfall.png"), full_page=True)

        # the devices it reached: filtered by label, each with its history
        await page.goto(f"{console.url}/devices?selector=group%3Da-{st.unique}&online=yes")
        await expect(page.locator("#devices tr")).to_have_count(1 + len(console.group))
        await page.click(f"#devices a:text('{console.group[0]}')")
        await expect(page.locator("#history")).to_contain_text(f"{model}@1")
        await page.screenshot(path=str(tmp_path / "device.png"), full_page=True)
    finally:
        await context.close()


async def test_a_viewer_sees_no_write_buttons_and_a_forged_post_is_refused(
    browser: Browser, console: Console, tmp_path: Path
) -> None:
    st = console.stack
    model = f"viewer{st.unique}"
    rid = await completed_rollout(console, model, "b")
    alarm_id = await raise_alarm(console, model)

    # an operator has the buttons there …
    context, page = await sign_in(browser, console, "alice")
    await page.goto(f"{console.url}/rollouts/{rid}")
    await expect(page.locator("#actions button[data-action=rollback]")).to_be_visible()
    await context.close()

    # … a viewer has none
    context, page = await sign_in(browser, console, "vera")
    try:
        await page.goto(f"{console.url}/rollouts/{rid}")
        await expect(page.locator("#waves")).to_be_visible()
        assert await page.locator("main form[method=post]").count() == 0
        await page.screenshot(path=str(tmp_path / "viewer-rollout.png"), full_page=True)
        await page.goto(f"{console.url}/monitoring")
        await expect(page.locator(f"#alarms tr[data-alarm='{alarm_id}']")).to_be_visible()
        assert await page.locator("main form[method=post]").count() == 0
        await page.screenshot(path=str(tmp_path / "viewer-monitoring.png"), full_page=True)

        # forged POSTs with the viewer's session: no CSRF token, a wrong one, the right one
        csrf = await page.locator("header input[name=csrf]").get_attribute("value")
        assert csrf
        for form, why in (
            ({}, "CSRF"),
            ({"csrf": "forged"}, "CSRF"),
            ({"csrf": csrf}, "role viewer"),
        ):
            resp = await page.request.post(f"{console.url}/rollouts/{rid}/rollback", form=form)
            assert resp.status == 403, (form, await resp.text())
            assert why in await resp.text()
            resp = await page.request.post(f"{console.url}/alarms/{alarm_id}/ack", form=form)
            assert resp.status == 403, (form, await resp.text())
    finally:
        await context.close()

    # a forged POST with no session at all (another site's form)
    async with httpx.AsyncClient(base_url=console.url) as anonymous:
        resp = await anonymous.post(f"/rollouts/{rid}/rollback", data={"csrf": csrf})
        assert resp.status_code == 403
    assert (await st.rollout(rid))["state"] == "completed"
    conn = await asyncpg.connect(console.monitor_dsn)
    try:
        state = await conn.fetchval(
            "SELECT state FROM monitor.alarms WHERE alarm_id = $1", uuid.UUID(alarm_id)
        )
    finally:
        await conn.close()
    assert state == "raised"


async def test_a_version_is_registered_and_rolled_out_from_the_pages(
    browser: Browser, console: Console, tmp_path: Path
) -> None:
    st = console.stack
    model = f"reg{st.unique}"
    files = classifier("iris")
    context, page = await sign_in(browser, console, "ada")
    try:
        # a file that is no ONNX model: the registry's refusal, on the page
        await page.goto(f"{console.url}/models")
        form = page.locator("#register")
        await form.locator("input[name=name]").fill(model)
        await form.locator("input[name=model]").set_input_files(
            {"name": "model.onnx", "mimeType": "application/octet-stream", "buffer": b"no model"}
        )
        await form.locator("button[data-action=register]").click()
        await expect(page.locator("#register-error")).to_contain_text("the registry refused it")
        await page.screenshot(path=str(tmp_path / "register-refused.png"), full_page=True)

        # the real model, its validation suite, reference sample and params
        form = page.locator("#register")
        await expect(form.locator("input[name=name]")).to_have_value(model)  # kept
        for part, data in (
            ("model", files.onnx),
            ("suite", files.suite),
            ("reference", files.reference),
        ):
            await form.locator(f"input[name={part}]").set_input_files(
                {"name": f"{part}.npz", "mimeType": "application/octet-stream", "buffer": data}
            )
        await form.locator("textarea[name=params]").fill("threshold.accuracy=0.85\nlr=0.1")
        await form.locator("summary").click()  # lineage
        await form.locator("input[name=source_commit]").fill("0a1b2c3d")
        await form.locator("button[data-action=register]").click()
        await expect(page.locator("#done")).to_contain_text(f"{model}@1 registered")
        await expect(page.locator("main")).to_contain_text("validation pending")
        await page.screenshot(path=str(tmp_path / "registered.png"), full_page=True)
        record = (await st.registry.get(f"/api/v1/models/{model}/versions/1")).json()
        assert record["created_by"] == f"ada-{st.unique}"
        assert record["params"] == {"threshold.accuracy": "0.85", "lr": "0.1"}
        assert record["source_commit"] == "0a1b2c3d"
        assert record["suite_digest"]
        assert record["reference_digest"]

        # the builder and validator's part; then the rollout from the version's page
        await st.build_and_validate(model, "1", files.onnx)
        await page.reload()
        await expect(page.locator("#image")).to_contain_text("@sha256:")
        form = page.locator("#start-rollout")
        await form.locator("input[name=selector]").fill(f"group=a-{st.unique}")
        await form.locator("input[name=waves]").fill("1,100%")
        await form.locator("input[name=bake]").fill("0s")
        await form.locator("button[data-action=start-rollout]").click()
        await expect(page).to_have_url(re.compile(r"/rollouts/[0-9a-f-]{36}\?done=start$"))
        rid = page.url.split("/rollouts/")[1].split("?")[0]
        await expect(page.locator("#rollout-state")).to_have_text("completed", timeout=90_000)
        await page.screenshot(path=str(tmp_path / "rollout-started.png"), full_page=True)
    finally:
        await context.close()
    r = await st.rollout(rid)
    assert (r["model"], r["version"], r["requested_by"]) == (model, "1", f"ada-{st.unique}")
    assert [w["size"] for w in r["wave_status"]] == [1, 2]


async def test_the_register_and_rollout_forms_follow_the_role(
    browser: Browser, console: Console, tmp_path: Path
) -> None:
    st = console.stack
    model = f"forms{st.unique}"
    onnx = classifier("iris").onnx
    await validated(console, model)
    version_page = f"{console.url}/models/{model}/versions/1"

    # an operator starts rollouts but does not register versions (models.write)
    context, page = await sign_in(browser, console, "alice")
    try:
        await page.goto(f"{console.url}/models")
        await expect(page.locator("#models")).to_be_visible()
        await expect(page.locator("#register")).to_have_count(0)
        await page.goto(version_page)
        await expect(page.locator("#start-rollout")).to_be_visible()
    finally:
        await context.close()

    context, page = await sign_in(browser, console, "vera")
    try:
        await page.goto(f"{console.url}/models")
        await expect(page.locator("#models")).to_be_visible()
        await expect(page.locator("#register")).to_have_count(0)
        await page.goto(version_page)
        await expect(page.locator("#lineage")).to_be_visible()
        assert await page.locator("main form[method=post]").count() == 0
        await page.screenshot(path=str(tmp_path / "viewer-version.png"), full_page=True)

        # forged: no CSRF token, then the viewer's own
        csrf = await page.locator("header input[name=csrf]").get_attribute("value")
        assert csrf
        upload = {"name": "model.onnx", "mimeType": "application/octet-stream", "buffer": onnx}
        for extra, why in (({}, "CSRF"), ({"csrf": csrf}, "role viewer")):
            resp = await page.request.post(
                f"{console.url}/models/register",
                multipart={"name": model, "version": "2", "model": upload, **extra},
            )
            assert resp.status == 403, await resp.text()
            assert why in await resp.text()
            resp = await page.request.post(
                f"{version_page}/rollout",
                form={"selector": f"group=a-{st.unique}", "waves": "100%", **extra},
            )
            assert resp.status == 403, await resp.text()
            assert why in await resp.text()
    finally:
        await context.close()

    async with httpx.AsyncClient(base_url=console.url) as anonymous:  # no session
        resp = await anonymous.post(
            "/models/register", data={"csrf": csrf, "name": model}, files={"model": onnx}
        )
        assert resp.status_code == 403
    versions = (await st.registry.get(f"/api/v1/models/{model}")).json()["versions"]
    assert [v["version"] for v in versions] == ["1"]
    assert (await st.api.get("/v1/rollouts", params={"model": model})).json()["rollouts"] == []


async def test_a_release_policy_and_monitor_rules_are_set_from_the_models_page(
    browser: Browser, console: Console, tmp_path: Path
) -> None:
    st = console.stack
    model = f"policy{st.unique}"
    await st.register(model, "1", classifier("iris").onnx)
    # set with the CLI before: a maintenance window, which the form does not show
    window = "Sat-Sun 02:00-04:00 UTC"
    resp = await st.api.put(f"/v1/policies/{model}", json={"window": window})
    assert resp.status_code == 200, resp.text
    fleet = f"fleet=p-{st.unique}"

    async def stored() -> tuple[dict[str, Any], dict[str, Any]]:
        """The policy (the deployer's API) and the model's own rules (the monitor's)."""
        headers = {"Authorization": f"Bearer {console.tokens['vera']}"}
        async with httpx.AsyncClient(base_url=console.monitor_url, headers=headers) as monitor:
            rules = (await monitor.get(f"/v1/rules/{model}")).json()["own"]
        return (await st.api.get(f"/v1/policies/{model}")).json(), rules

    context, page = await sign_in(browser, console, "alice")
    try:
        await page.goto(f"{console.url}/models/{model}")
        await expect(page.locator("#policy-shown td[data-field=auto_rollout]")).to_have_text("off")
        form = page.locator("#set-policy")
        await form.locator("input[name=auto_rollout]").check()
        await form.locator("input[name=waves]").fill("10%,100%")
        await form.locator("input[name=bake]").fill("5s")
        await form.locator("input[name=max_failures]").fill("10%")
        await form.locator("button[data-action=set-policy]").click()  # no selector
        await expect(page.locator("#policy-error")).to_contain_text(
            "the deployer refused it: an automatic rollout needs a selector"
        )
        await page.screenshot(path=str(tmp_path / "policy-refused.png"), full_page=True)
        await form.locator("input[name=selector]").fill(fleet)
        await expect(form.locator("input[name=waves]")).to_have_value("10%,100%")  # kept
        await form.locator("button[data-action=set-policy]").click()
        await expect(page.locator("#done")).to_contain_text("policy set")
        shown = page.locator("#policy-shown")
        await expect(shown.locator("td[data-field=auto_rollout]")).to_have_text("on")
        await expect(shown.locator("td[data-field=selector]")).to_have_text(fleet)
        await expect(shown.locator("td[data-field=waves]")).to_have_text("10%, 100%")
        await expect(shown.locator("td[data-field=max_failures]")).to_have_text("10%")

        rules = page.locator("#set-rules textarea[name=rules]")
        await rules.fill("prediction_psi: 0.6\npredictoin_psi: 0.5")
        await page.click("#set-rules button[data-action=set-rules]")
        await expect(page.locator("#rules-error")).to_contain_text(
            "the monitor refused them: unknown rule 'predictoin_psi'"
        )
        await page.screenshot(path=str(tmp_path / "rules-refused.png"), full_page=True)
        await page.locator("#set-rules textarea[name=rules]").fill("prediction_psi: 0.6")
        await page.click("#set-rules button[data-action=set-rules]")
        await expect(page.locator("#done")).to_contain_text("rules set")
        row = page.locator("#rules-shown tr[data-rule=prediction_psi]")
        await expect(row).to_contain_text("0.6")
        await expect(row).to_contain_text("its own")
        await expect(page.locator("#rules-shown tr[data-rule=drift_psi]")).to_contain_text(
            "default"
        )
        await page.screenshot(path=str(tmp_path / "policy-and-rules-set.png"), full_page=True)
    finally:
        await context.close()
    policy, own = await stored()
    assert policy["auto_rollout"] is True
    assert policy["selector"] == {"fleet": f"p-{st.unique}"}
    assert [w["percent"] for w in policy["waves"]] == [10.0, 100.0]
    assert (policy["bake_seconds"], policy["max_failures_percent"]) == (5.0, 10.0)
    assert policy["window"] == window  # kept
    assert own == {"prediction_psi": 0.6}

    # a viewer sees both, without the forms; forged POSTs change nothing
    context, page = await sign_in(browser, console, "vera")
    try:
        await page.goto(f"{console.url}/models/{model}")
        await expect(page.locator("#policy-shown td[data-field=auto_rollout]")).to_have_text("on")
        await expect(page.locator("#rules-shown tr[data-rule=prediction_psi]")).to_be_visible()
        assert await page.locator("main form[method=post]").count() == 0
        await page.screenshot(path=str(tmp_path / "viewer-policy-and-rules.png"), full_page=True)
        csrf = await page.locator("header input[name=csrf]").get_attribute("value")
        assert csrf
        for extra, why in (({}, "CSRF"), ({"csrf": csrf}, "role viewer")):
            resp = await page.request.post(
                f"{console.url}/models/{model}/policy", form={"selector": "fleet=evil", **extra}
            )
            assert resp.status == 403, await resp.text()
            assert why in await resp.text()
            resp = await page.request.post(
                f"{console.url}/models/{model}/rules", form={"rules": "drift_psi: 9", **extra}
            )
            assert resp.status == 403, await resp.text()
            assert why in await resp.text()
    finally:
        await context.close()
    async with httpx.AsyncClient(base_url=console.url) as anonymous:  # no session
        resp = await anonymous.post(f"/models/{model}/rules", data={"csrf": csrf, "rules": ""})
        assert resp.status_code == 403
    assert await stored() == (policy, own)
