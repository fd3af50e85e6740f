"""The whole loop on one machine, against the stack ``make up`` runs:

    make up      # in one terminal
    make demo    # in another (or: python -m examples.demo)

1. start 50 simulated devices (in this process) labelled ``fleet=iris-demo-<run>``;
2. give the model a release policy: validated versions roll out by themselves to the
   demo fleet, a canary wave first;
3. train a scikit-learn classifier on iris and register it as ``iris-demo-<run>@1``;
4. the builder packages v1, the validator validates it, the deployer rolls it out
   (canary wave, then everyone);
5. drift is injected into the devices' inputs; the monitor raises an alarm and asks for
   retraining (``retrain.requested``);
6. the example trainer (``examples.retrain``) exports the selected samples, retrains and
   registers v2 with its lineage;
7. v2 is built, validated, rolled out as a canary, judged against v1 and promoted.

Every lifecycle event of the demo's model is printed as it happens, with the time since
the start and where to look.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import RetrainRequested
from edgeloop.contracts.stackfile import load_stack_json, state_dir
from edgeloop.edge.fleet import Fleet, FleetOptions
from examples.platform import client
from examples.retrain import handle
from examples.sklearn_models import classifier

DRIFT = "feature=2,shift=3,fraction=1.0"
"""Petal length moves three standard deviations: a sensor recalibrated in the field."""


@dataclass
class Story:
    """What has happened so far, fed by the lifecycle events of the demo's model."""

    model: str
    started: float = field(default_factory=time.monotonic)
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    steps: list[tuple[str, float]] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str, *, look: str | None = None) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)
        if look:
            print(f"{'':11}→ {look}", flush=True)

    def step(self, title: str) -> None:
        self.steps.append((title, self.elapsed()))
        print(f"\n== {title}", flush=True)

    def add(self, subject: str, event: dict[str, Any]) -> None:
        if any(e.get("event_id") == event.get("event_id") for _, e in self.seen):
            return  # the same event delivered again (a consumer's reconnect): told once
        self.seen.append((subject, event))
        self.changed.set()
        self.say(_describe(subject, event), look=_where(subject, event, self.model))

    async def wait(
        self, subject: str, within: float, *, since: int = 0, **match: Any
    ) -> dict[str, Any]:
        """The first event on ``subject`` whose fields match, among those seen from
        position ``since`` on (waiting for it)."""
        deadline = time.monotonic() + within
        while True:
            for subj, event in self.seen[since:]:
                if subj == subject and all(event.get(k) == v for k, v in match.items()):
                    return event
            failed = _failure(self.seen, match.get("version"))
            if failed:
                raise RuntimeError(failed)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {subject} {match or ''} within {within:.0f} s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


def _describe(subject: str, e: dict[str, Any]) -> str:
    ref = f"{e.get('model')}@{e.get('version')}"
    if subject == s.MODEL_COMMITTED:
        return f"model.committed        {ref} registered"
    if subject == s.IMAGE_BUILT:
        return f"image.built            {ref} → {e['image']} ({e.get('size', 0) // 1024} KiB)"
    if subject == s.VALIDATION_PASSED:
        metrics = ", ".join(f"{k} {v:.3g}" for k, v in sorted(e.get("metrics", {}).items())[:4])
        return f"validation.passed      {ref} ({metrics})"
    if subject == s.ROLLOUT_REQUESTED:
        to = ",".join(f"{k}={v}" for k, v in sorted(e["selector"].items()))
        return f"rollout.requested      {ref} by {e.get('requested_by')} to {to}"
    if subject in (s.ROLLOUT_WAVE_STARTED, s.ROLLOUT_WAVE_SUCCEEDED):
        what = subject.rsplit(".", 1)[1]
        return f"rollout.wave.{what:<9} {ref} wave {e['wave']}: {len(e['devices'])} devices"
    if subject == s.ROLLOUT_CANARY_VERDICT:
        why = "; ".join(e.get("reasons", [])[:2])
        return f"canary verdict         {ref} wave {e['wave']}: {e['verdict']} {why}".rstrip()
    # one alarm per rule that fires (feature drift and prediction drift are two rules,
    # often firing on the same window), each with its own retrain request: say which
    if subject == s.ALARM_RAISED:
        return f"alarm.raised           {ref} {e['rule']} (alarm {_short(e)}): {e['message']}"
    if subject == s.RETRAIN_REQUESTED:
        d = e["dataset"]
        rule = (e.get("evidence") or {}).get("rule", "?")
        return (
            f"retrain.requested      {ref} for {rule} (alarm {_short(e)}): "
            f"{d.get('sample_count')} samples selected"
        )
    return f"{subject:<22} {ref} {e.get('reason') or ''}".rstrip()


def _short(e: dict[str, Any]) -> str:
    return str(e.get("alarm_id") or "-")[:8]


def _where(subject: str, e: dict[str, Any], model: str) -> str | None:
    ref = f"{e.get('model')}@{e.get('version')}"
    return {
        s.MODEL_COMMITTED: f"edgeloop models show {ref}",
        s.VALIDATION_PASSED: f"edgeloop models show {ref}  (validation report)",
        s.ROLLOUT_REQUESTED: f"edgeloop rollout status {e.get('rollout_id')} --watch",
        s.ROLLOUT_COMPLETED: f"edgeloop devices list --selector fleet={model}",
        s.ALARM_RAISED: f"edgeloop alarms list --open; edgeloop monitor report {ref} -o r.html",
        s.RETRAIN_REQUESTED: f"edgeloop data export {model} --kind all -o samples.parquet",
    }.get(subject)


def _failure(seen: list[tuple[str, dict[str, Any]]], version: str | None) -> str | None:
    for subject, e in seen:
        if version is not None and e.get("version") != version:
            continue
        if subject in (s.IMAGE_BUILD_FAILED, s.VALIDATION_FAILED, s.ROLLOUT_REFUSED):
            return f"{subject}: {e.get('reason') or e.get('reasons')}"
        if subject == s.ROLLOUT_ROLLED_BACK:
            return f"rollout of {e['model']}@{e['version']} rolled back: {e['reason']}"
    return None


class Platform:
    """The running stack's HTTP APIs (from ``stack.json``)."""

    def __init__(self, stack: dict[str, Any], token: str) -> None:
        # each rides out a service restarting or its database down (503, Retry-After),
        # as any client of the platform should
        self.registry = client(stack["registry_api"], token)
        self.deployer = client(stack["deployer_api"], token)
        self.monitor = client(stack["monitor_api"], token)

    async def close(self) -> None:
        for api in (self.registry, self.deployer, self.monitor):
            await api.aclose()


async def _follow(nc: NATS, story: Story) -> None:
    """Every lifecycle event of the demo's model, as it is stored."""
    js = nc.jetstream()
    sub = await js.subscribe(
        ">",
        stream=s.STREAM_LIFECYCLE,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
    )
    async for msg in sub.messages:
        event = json.loads(msg.data)
        if event.get("model") == story.model:
            story.add(msg.subject, event)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The story; the timings of its steps."""
    stack = load_stack_json()
    if not stack:
        sys.exit("no running stack: start one with `make up` (in another terminal) first")
    token = os.environ.get("EDGELOOP_API_TOKEN") or (state_dir() / "api-token").read_text().strip()
    run_id = time.strftime("%H%M%S")
    model = f"iris-demo-{run_id}"
    story = Story(model)
    platform = Platform(stack, token)
    nc = await nats.connect(stack["nats_url"])
    follower = asyncio.create_task(_follow(nc, story))
    stop = asyncio.Event()
    fleet_task: asyncio.Task[None] | None = None
    try:
        story.step(f"1. {args.devices} simulated devices join (label fleet={model})")
        fleet = Fleet(
            FleetOptions(
                devices=args.devices,
                gateway_api=stack["gateway_api"],
                token=token,
                state_dir=Path(tempfile.mkdtemp(prefix="edgeloop-demo-")),
                prefix=f"demo{run_id}",
                labels={"fleet": model},
                telemetry_seconds=1.0,
                infer_seconds=0.2,
            )
        )
        await asyncio.to_thread(fleet.prepare)
        fleet_task = asyncio.create_task(fleet.run(stop, out=None))
        story.say(
            f"{args.devices} devices enrolled and connecting",
            look=f"edgeloop devices list --selector fleet={model}",
        )

        story.step("2. release policy: validated versions roll out by themselves, canary first")
        policy = {
            "auto_rollout": True,
            "selector": {"fleet": model},
            "waves": [{"percent": 10}, {"percent": 100}],
            "bake_seconds": args.bake,
            "max_failures_percent": 10,
        }
        (await platform.deployer.put(f"/v1/policies/{model}", json=policy)).raise_for_status()
        # The simulated sensors draw each feature from its reference histogram on its own,
        # which moves the predicted class mix by a PSI of about 0.25 (real inputs keep
        # their joint distribution): the demo's rule on predictions allows for that.
        rules = {"prediction_psi": 0.6}
        (await platform.monitor.put(f"/v1/rules/{model}", json=rules)).raise_for_status()
        story.say(
            f"policy set: waves 10%, 100%, bake {args.bake:g} s",
            look=f"edgeloop rollout policy show {model}; edgeloop monitor rules show {model}",
        )

        story.step(f"3. train a classifier on scikit-learn's iris and register {model}@1")
        files = await asyncio.to_thread(classifier, "iris")
        resp = await platform.registry.post(
            f"/api/v1/models/{model}/versions",
            files={
                "model": ("model.onnx", files.onnx),
                "suite": ("suite.npz", files.suite),
                "reference": ("reference.npz", files.reference),
            },
            data={"params": json.dumps({"threshold.accuracy": "0.85"})},
        )
        resp.raise_for_status()

        story.step("4. build, validate, canary rollout of v1")
        await story.wait(s.ROLLOUT_COMPLETED, args.timeout, version="1")

        story.step(f"5. drift injected into every device's inputs ({DRIFT})")
        injected = len(story.seen)
        fleet.set_drift(DRIFT)
        request = await story.wait(s.RETRAIN_REQUESTED, args.timeout, since=injected, version="1")

        story.step(
            "6. the example trainer collects the selected window's data, retrains, registers v2"
        )
        body = await handle(
            RetrainRequested.model_validate(request), "iris", platform.registry, platform.monitor
        )
        story.say(
            f"registered {model}@{body['version']} (parent {model}@1), answering the retrain "
            f"request of alarm {_short(request)} ({request['evidence'].get('rule')})",
            look=f"edgeloop models show {model}@{body['version']}",
        )

        story.step("7. build, validate, canary rollout of v2; promoted when the canary holds")
        await story.wait(s.ROLLOUT_COMPLETED, args.timeout, version=body["version"])
        report = state_dir() / f"{model}-report.html"
        resp = await platform.monitor.get("/v1/report", params={"model": model, "version": "1"})
        if resp.status_code == 200:
            report.write_text(resp.text)
        story.step(f"done in {story.elapsed():.1f} s")
        for title, at in story.steps[:-1]:
            print(f"  {at:6.1f} s  {title}")
        print(f"\n  drift report of v1: {report}")
        print(f"  lineage:            edgeloop models show {model}@{body['version']}")
        print(f"  one trace each:     edgeloop trace {model}@1; edgeloop trace {model}@2")
        print(f"  rollouts:           edgeloop rollouts list --model {model}")
        return {
            "model": model,
            "seconds": round(story.elapsed(), 1),
            "steps": {title: round(at, 1) for title, at in story.steps},
            "events": [[subject, e.get("version")] for subject, e in story.seen],
        }
    finally:
        stop.set()
        if fleet_task is not None:
            await asyncio.gather(fleet_task, return_exceptions=True)
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await nc.close()
        await platform.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point (``argv``: the options, default the command line's)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--bake", type=float, default=15.0, help="seconds each wave is watched")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per step at most")
    parser.add_argument("--json", type=Path, help="write the timings here")
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(run(args))
    except (RuntimeError, TimeoutError) as exc:
        sys.exit(f"\nthe demo stopped: {exc}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
