"""Fuzzing the bus consumers (DESIGN §4, §4a): each service, as its own process on private
NATS and PostgreSQL, is sent malformed events on every subject it consumes — random
bytes, truncated JSON, JSON of the wrong shape, wrong types, missing fields and event
ids, unknown fields, huge fields, deep nesting, bad UTF-8, NUL characters, NaN and
Infinity, out-of-range numbers, one event id on many events, lying headers.

It must stay up and ready throughout, dead-letter every one of them (one dead letter per
malformed event, the payload byte for byte, a reason that says what is wrong), count
malformed telemetry for the device its subject names, and then still process a valid
event, once, even when it is delivered twice.

``make test`` sends 500 events per service; ``make fuzz`` 10,000 (marker ``fuzz``);
``EDGELOOP_FUZZ_SEED`` repeats a run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import nats as nats_py
import pytest
from nats.js import JetStreamContext

from edgeloop.contracts import subjects as s
from edgeloop.contracts.access import SERVICES as ACCESS
from edgeloop.contracts.events import (
    ArtifactRef,
    CanaryVerdict,
    DatasetSelection,
    Event,
    ImageBuildFailed,
    ImageBuilt,
    ModelCommitted,
    RetrainRequested,
    RolloutRequested,
    RolloutWaveFailed,
    RolloutWaveStarted,
    RolloutWaveSucceeded,
    TelemetryBatch,
    ValidationFailed,
    ValidationPassed,
    Verdict,
    WavePlan,
)
from edgeloop.devstack.servers import NatsServer, free_port
from edgeloop.devstack.testing import api_up, eventually, stream_messages
from edgeloop.devstack.up import ServiceProcess
from edgeloop.kit import dlq
from edgeloop.kit.outbox import MSG_ID_HEADER
from tests.deploy_harness import register_version
from tests.edge_harness import PRIVATE, PUBLIC, TOKEN
from tests.fuzz import MALFORMED_PREFIX, Malformed, MalformedEvents, fuzz_seed
from tests.modelzoo import classifier
from tests.watch import Readiness, ready, tracebacks

pytestmark = pytest.mark.slow

DIGEST = "sha256:" + "ab" * 32
FUZZ_DEVICES = 4
#: malformed events published at once (each js.publish waits for its ack)
PIPELINE = 128


@dataclass
class Run:
    """One service under fuzz and what the test knows about it."""

    name: str
    proc: ServiceProcess
    js: JetStreamContext
    dsn: str
    unique: str
    api: httpx.AsyncClient
    """Its HTTP API (the registry's, the deployer's, the monitor's)."""
    subjects: dict[str, Event] = field(default_factory=dict)
    """Published subject → a valid event of the type consumed there."""


def _now() -> datetime:
    return datetime.now(UTC)


def _examples(name: str, unique: str) -> dict[str, Event]:
    """For each subject the service consumes, a valid event of its type."""
    model, version, rollout = f"fz{unique}", "1", uuid.uuid4()
    ref = {"model": model, "version": version}
    built = ImageBuilt(**ref, image=f"127.0.0.1:1/fz{unique}", digest=DIGEST, size=10)
    passed = ValidationPassed(
        **ref, image=built.image, digest=DIGEST, metrics={"accuracy": 0.9}, report={"a": 1}
    )
    if name == "registry":
        return {
            s.IMAGE_BUILT: built,
            s.IMAGE_BUILD_FAILED: ImageBuildFailed(**ref, reason="no space left"),
            s.VALIDATION_PASSED: passed,
            s.VALIDATION_FAILED: ValidationFailed(**ref, reasons=["accuracy 0.5 < 0.9"]),
            s.RETRAIN_REQUESTED: RetrainRequested(
                **ref,
                request_id=uuid.uuid4(),
                reason="drift",
                evidence={"psi": 0.4},
                dataset=DatasetSelection(kinds=["low-confidence"]),
            ),
        }
    if name == "builder":
        artifact = ArtifactRef(digest=DIGEST, size=10, media_type="application/onnx")
        return {
            s.MODEL_COMMITTED: ModelCommitted(
                **ref, repository=f"fz{unique}/models/{model}", model_artifact=artifact
            )
        }
    if name == "validator":
        return {s.IMAGE_BUILT: built}
    if name == "deployer":
        return {
            s.ROLLOUT_REQUESTED: RolloutRequested(
                **ref, rollout_id=rollout, selector={"site": "a"}, waves=[WavePlan(count=1)]
            ),
            s.VALIDATION_PASSED: passed,
            s.ROLLOUT_CANARY_VERDICT: CanaryVerdict(
                **ref, rollout_id=rollout, wave=0, verdict=Verdict.PASS, reasons=["ok"]
            ),
        }
    assert name == "monitor"
    wave = {**ref, "rollout_id": rollout, "wave": 1, "devices": ["d1", "d2"]}
    examples: dict[str, Event] = {
        s.ROLLOUT_WAVE_STARTED: RolloutWaveStarted(**wave),
        s.ROLLOUT_WAVE_SUCCEEDED: RolloutWaveSucceeded(**wave, converged=2),
        s.ROLLOUT_WAVE_FAILED: RolloutWaveFailed(**wave, reason="verdict fail"),
    }
    for i in range(FUZZ_DEVICES):
        batch = _telemetry(model, version, f"fz{i}-{unique}")
        examples[batch.bus_subject()] = batch
    return examples


def _telemetry(model: str, version: str, device: str) -> TelemetryBatch:
    return TelemetryBatch(
        model=model,
        version=version,
        device_id=device,
        window_start=_now() - timedelta(seconds=10),
        window_end=_now(),
        count=10,
        errors=1,
        low_confidence=2,
        prediction_counts={"a": 6, "b": 3},
        samples=[{"features": [1.0, 2.0], "prediction": "a", "confidence": 0.2}],
    )


# --- the services ----------------------------------------------------------------------


async def _not_found_server() -> tuple[asyncio.Server, str]:
    """An HTTP server that answers 404 to everything (a registry without the version)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while await reader.readline() not in (b"\r\n", b""):
                pass
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def _process(
    name: str, root: Path, nats_url: str, dsn: str, registry_url: str, own: dict[str, str]
) -> ServiceProcess:
    prefix = f"EDGELOOP_{name.upper()}_"
    health = free_port()
    env = {
        "EDGELOOP_NATS_URL": nats_url,
        "EDGELOOP_DATABASE_URL": dsn,
        "EDGELOOP_OCI_REGISTRY_URL": registry_url,
        f"{prefix}HTTP_PORT": str(health),
        **{prefix + k: v for k, v in own.items()},
    }
    return ServiceProcess(name, f"edgeloop.{name}", health, env, root / f"{name}.log")


def _settings(name: str, unique: str, api_port: int, registry_stub: str) -> dict[str, str]:
    """The service's own settings (``EDGELOOP_<NAME>_…`` without the prefix)."""
    nowhere = f"http://127.0.0.1:{free_port()}"  # a dependency that does not answer
    api = {"API_TOKENS": TOKEN, "API_PORT": str(api_port)}
    if name == "registry":
        return {**api, "REPOSITORY_PREFIX": f"fz{unique}/models"}
    if name == "builder":
        return {
            "SIGNING_KEY": PRIVATE.decode(),
            "IMAGE_PREFIX": f"fz{unique}/images",
            "MAX_ATTEMPTS": "1",
        }
    if name == "validator":
        return {
            "PUBLIC_KEY": PUBLIC.decode(),
            "REGISTRY_API": nowhere,
            "REGISTRY_TOKEN": TOKEN,
            "MAX_ATTEMPTS": "1",
            "PROFILE_RUNS": "5",
        }
    if name == "deployer":
        return {
            **api,
            "REGISTRY_API": nowhere,
            "REGISTRY_TOKEN": TOKEN,
            "GATEWAY_API": nowhere,
            "GATEWAY_TOKEN": TOKEN,
            "INSTANCE_ID": f"fz-{unique}",
            "MAX_ATTEMPTS": "1",
        }
    assert name == "monitor"
    return {**api, "REGISTRY_API": registry_stub, "REGISTRY_TOKEN": TOKEN}


async def _up(run: Run) -> None:
    """Until the service is ready (and its API answers, if it has one)."""
    url, api = run.proc.ready_url, run.api
    await eventually(lambda: ready(api, url), within=120, what=f"{run.name} ready")
    if run.name not in ("builder", "validator"):  # those two have no API
        await eventually(lambda: api_up(api), within=30, what=f"{run.name} API")


@contextlib.asynccontextmanager
async def running(
    names: tuple[str, ...], nats: NatsServer, dsn: str, registry_url: str, root: Path, unique: str
) -> AsyncIterator[list[Run]]:
    """``python -m edgeloop.<name>`` of each service, started together on the test's own
    NATS and database, ready."""
    stub, stub_url = await _not_found_server()
    nc = await nats_py.connect(nats.url)  # the admin: publishes as any service would
    ports = {name: free_port() for name in names}
    procs = [
        _process(name, root, nats.url, dsn, registry_url, _settings(name, unique, port, stub_url))
        for name, port in ports.items()
    ]
    try:
        async with contextlib.AsyncExitStack() as clients:
            runs = []
            for proc in procs:
                proc.start()
                client = await clients.enter_async_context(
                    httpx.AsyncClient(
                        base_url=f"http://127.0.0.1:{ports[proc.name]}",
                        headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=30,
                    )
                )
                runs.append(
                    Run(
                        proc.name,
                        proc,
                        nc.jetstream(),
                        dsn,
                        unique,
                        client,
                        _examples(proc.name, unique),
                    )
                )
            for run in runs:
                await _up(run)
            yield runs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(proc.proc.wait, 30)  # type: ignore[union-attr]
            proc.kill()
        await nc.close()
        stub.close()


# --- the valid event afterwards: its effect, once ------------------------------------------


async def _twice(js: JetStreamContext, event: Event, subject: str | None = None) -> None:
    """Publish ``event`` and then the same event again under another message id (as a
    producer re-sending after the duplicate window would): the stream keeps both."""
    subject = subject or event.subject
    await js.publish(subject, event.to_json(), headers={MSG_ID_HEADER: str(event.event_id)})
    await js.publish(subject, event.to_json(), headers={MSG_ID_HEADER: f"again-{event.event_id}"})


async def _count(dsn: str, sql: str, *args: object) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


async def _events(js: JetStreamContext, subject: str, model: str) -> int:
    """How many events on ``subject`` are about ``model`` (the malformed ones sent there
    are not: they are not even all JSON)."""
    msgs = await stream_messages(js, s.STREAM_LIFECYCLE, subject)
    return sum(1 for msg in msgs if f'"model":"{model}"'.encode() in msg.data)


async def valid_event_once(run: Run) -> None:
    """A valid event, delivered twice, has its effect once."""
    # a model of the service's own: in the short run the others see its events too (the
    # registry's registration is built, validated and projected by them, as in production)
    js, dsn, model = run.js, run.dsn, f"ok{run.name}{run.unique}"
    ref = {"model": model, "version": "1"}
    once: list[tuple[str, Callable[[], Awaitable[int]]]] = []
    if run.name == "registry":
        await register_version(run.api, model, "1", classifier("iris").onnx)
        retrain = RetrainRequested(
            **ref, request_id=uuid.uuid4(), reason="drift", dataset=DatasetSelection(kinds=[])
        )
        await _twice(js, retrain)
        sql = "SELECT count(*) FROM registry.retrain_requests WHERE model = $1"
        once.append(("retrain requests", lambda: _count(dsn, sql, model)))
    elif run.name == "builder":
        # its artifact is not in the registry: with one attempt, the build fails at once
        artifact = ArtifactRef(digest=DIGEST, size=10, media_type="application/onnx")
        await _twice(
            js, ModelCommitted(**ref, repository=f"fz{run.unique}/m", model_artifact=artifact)
        )
        sql = "SELECT count(*) FROM builder.builds WHERE model = $1"
        once.append(("builds", lambda: _count(dsn, sql, model)))
        once.append(("image.build_failed", lambda: _events(js, s.IMAGE_BUILD_FAILED, model)))
    elif run.name == "validator":
        # its image is not in the registry: with one attempt, the validation fails at once
        image = f"127.0.0.1:1/fz{run.unique}/{model}"
        await _twice(js, ImageBuilt(**ref, image=image, digest=DIGEST, size=10))
        sql = "SELECT count(*) FROM validator.reports WHERE model = $1"
        once.append(("reports", lambda: _count(dsn, sql, model)))
        once.append(("validation.failed", lambda: _events(js, s.VALIDATION_FAILED, model)))
    elif run.name == "deployer":
        # the registry does not answer: with one attempt, the request is refused at once
        req = RolloutRequested(
            **ref, rollout_id=uuid.uuid4(), selector={"a": "b"}, waves=[WavePlan(count=1)]
        )
        await _twice(js, req)
        sql = "SELECT count(*) FROM deployer.rollouts WHERE model = $1"
        once.append(("rollouts", lambda: _count(dsn, sql, model)))
        once.append(("rollout.refused", lambda: _events(js, s.ROLLOUT_REFUSED, model)))
    else:
        # a version the registry does not know: counted once against the device
        device = f"ok-{run.unique}"
        batch = _telemetry(model, "1", device)
        await _twice(js, batch, batch.bus_subject())
        sql = (
            "SELECT coalesce(sum(count), 0) FROM monitor.rejections "
            "WHERE device_id = $1 AND code = 'unknown_model'"
        )
        once.append(("rejections", lambda: _count(dsn, sql, device)))
    for what, count in once:
        await eventually(count, what=f"{run.name}: the valid event's {what}")
    await drained(js)
    for what, count in once:
        assert await count() == 1, f"{run.name}: the valid event's {what} twice"


async def _idle(js: JetStreamContext) -> bool:
    """Whether no durable has anything pending or unacknowledged."""
    for stream in (s.STREAM_LIFECYCLE, s.STREAM_TELEMETRY):
        for info in await js.consumers_info(stream):
            if info.num_pending or info.num_ack_pending or info.num_redelivered:
                return False
    return True


async def drained(js: JetStreamContext, within: float = 60) -> None:
    """Until every durable has nothing pending or unacknowledged."""
    await eventually(lambda: _idle(js), within=within, what="the consumers drained")


# --- the fuzz -------------------------------------------------------------------------------


async def publish_malformed(
    js: JetStreamContext, items: list[tuple[str, Malformed]]
) -> dict[tuple[str, int], tuple[str, Malformed]]:
    """Publish pipelined; (stream, stream sequence) → (subject, event) of each stored."""
    stored: dict[tuple[str, int], tuple[str, Malformed]] = {}
    for start in range(0, len(items), PIPELINE):
        chunk = items[start : start + PIPELINE]
        acks = await asyncio.gather(
            *(
                js.publish(
                    subject, m.payload, headers={**m.headers, MSG_ID_HEADER: uuid.uuid4().hex}
                )
                for subject, m in chunk
            )
        )
        for ack, item in zip(acks, chunk, strict=True):
            assert not ack.duplicate
            stored[(ack.stream, ack.seq)] = item
    return stored


def _key(letter: dlq.DeadLetter) -> tuple[str, int]:
    """(stream, sequence) of a dead letter's original."""
    telemetry = letter.subject.startswith(s.TELEMETRY_PREFIX)
    return (s.STREAM_TELEMETRY if telemetry else s.STREAM_LIFECYCLE, letter.stream_seq)


#: durable consumer → the service it belongs to
OWNER = {durable: name for name, access in ACCESS.items() for durable in access.durables}


async def settled(js: JetStreamContext, expected: int, *, within: float) -> None:
    """Until the DLQ holds ``expected`` dead letters, or the services stopped adding to it
    with nothing left in hand (then the comparison says what is missing)."""
    deadline = time.monotonic() + within
    last, still = -1, 0
    while time.monotonic() < deadline:
        count = (await js.stream_info(s.STREAM_DLQ)).state.messages
        if count >= expected:
            return
        still = still + 1 if count == last and await _idle(js) else 0
        if still >= 5:
            return
        last = count
        await asyncio.sleep(1)


def _draw(run: Run, rng: random.Random, n: int, max_payload: int) -> list[tuple[str, Malformed]]:
    """``n`` malformed events over the subjects ``run`` consumes, and a few as large as the
    server takes (each a megabyte)."""
    examples = list(run.subjects.values())
    makers = {
        subject: MalformedEvents(rng, example, [e for e in examples if e is not example])
        for subject, example in run.subjects.items()
    }
    subjects = sorted(makers)
    items = [(subject, makers[subject].draw()) for subject in rng.choices(subjects, k=n)]
    for _ in range(max(1, n // 2000)):
        subject = rng.choice(subjects)
        items.append((subject, makers[subject].at_the_limit(max_payload)))
    return items


def _covers(run: Run) -> None:
    """The test sends to every subject the service consumes (``contracts.access``)."""
    for pattern in ACCESS[run.name].consumes:
        prefix = pattern.removesuffix(">")
        assert any(subj == pattern or subj.startswith(prefix) for subj in run.subjects), pattern


async def fuzz_consumers(runs: list[Run], per_service: int, seed: int) -> None:
    """``per_service`` malformed events to each of ``runs`` (on one NATS server), all
    published together; every consumer of a subject dead-letters each one sent there."""
    rng = random.Random(seed)
    js = runs[0].js
    max_payload = js._nc.max_payload  # nats-py keeps the connection only privately
    items: list[tuple[str, Malformed]] = []
    for run in runs:
        _covers(run)
        items += _draw(run, rng, per_service, max_payload)
    rng.shuffle(items)
    names = ", ".join(r.name for r in runs)
    where = f"{names} (seed {seed})"
    logs = {run.name: run.proc.log_path.stat().st_size for run in runs}

    def consumers(subject: str) -> list[str]:
        return [r.name for r in runs if subject in r.subjects]

    started = time.monotonic()
    async with contextlib.AsyncExitStack() as watching:
        readiness = [await watching.enter_async_context(Readiness(r.proc)) for r in runs]
        stored = await publish_malformed(js, items)
        published = time.monotonic() - started
        expected = {(key, name) for key, (subj, _) in stored.items() for name in consumers(subj)}
        await settled(js, len(expected), within=120 + len(expected) / 50)
        dead_at = time.monotonic() - started
        letters = await dlq.read(js)
        got = {(_key(letter), OWNER.get(letter.consumer, "?")) for letter in letters}
        missing = collections.Counter(
            (name, stored[key][1].category) for key, name in expected - got
        )
        assert not missing, f"{where}: not dead-lettered (service, category): {dict(missing)}"
        await drained(js)
        for run in runs:
            await valid_event_once(run)
    elapsed = time.monotonic() - started

    letters = await dlq.read(js)
    assert len(letters) == len(expected), (
        f"{where}: {len(letters)} dead letters for {len(expected)} expected"
    )
    seen: set[tuple[tuple[str, int], str]] = set()
    bad: list[str] = []
    per_consumer: collections.Counter[str] = collections.Counter()
    for letter in letters:
        key = (_key(letter), OWNER.get(letter.consumer, "?"))
        assert key in expected, f"{where}: a dead letter nobody expected: {letter.summary()}"
        assert key not in seen, f"{where}: dead-lettered twice: {letter.summary()}"
        seen.add(key)
        subject, m = stored[key[0]]
        per_consumer[letter.consumer] += 1
        whole = letter.payload == m.payload or (  # cut to fit the DLQ: it says so
            letter.truncated == len(m.payload)
            and m.payload.startswith(letter.payload)
            and "payload cut from" in letter.reason
        )
        ok = (
            whole
            and letter.subject.startswith(subject)
            and letter.reason.startswith(MALFORMED_PREFIX)
            and re.search(m.expect, letter.reason, re.IGNORECASE) is not None
            and letter.deliveries == 1
        )
        if not ok:
            bad.append(f"{m.category} on {subject}: {letter.reason!r} (wanted {m.expect!r})")
    assert not bad, f"{where}: {len(bad)} dead letters not as expected, e.g. {bad[:5]}"

    if any(r.name == "monitor" for r in runs):
        # malformed telemetry is counted for the device its subject names
        per_device = collections.Counter(
            subj.split(".")[3] for subj, _ in stored.values() if subj.startswith("device.")
        )
        sql = (
            "SELECT coalesce(sum(count), 0) FROM monitor.rejections "
            "WHERE device_id = $1 AND code = 'malformed'"
        )
        for device, n in per_device.items():
            assert await _count(runs[0].dsn, sql, device) == n, f"{where}: {device}"

    for run, watch in zip(runs, readiness, strict=True):
        assert watch.checks > 0
        assert not watch.failures, f"{where}: {run.name} not ready at {watch.failures[:5]}"
        assert run.proc.running, f"{where}: {run.name} exited"
        found = tracebacks(run.proc.log_path, since=logs[run.name])
        assert not found, f"{where}: {len(found)} tracebacks in {run.name}'s log: {found[0]}"

    for run in runs:
        sent = collections.Counter(
            m.category for subj, m in stored.values() if subj in run.subjects
        )
        mine = {c: n for c, n in per_consumer.items() if OWNER.get(c) == run.name}
        print(
            f"{run.name}: {sum(sent.values())} malformed events on {len(run.subjects)} "
            f"subjects, {sum(mine.values())} dead letters {mine}; per category "
            f"{dict(sorted(sent.items()))}"
        )
    print(
        f"{names}: {len(stored)} malformed events published in {published:.1f}s, "
        f"{len(expected)} dead letters after {dead_at:.1f}s ({len(expected) / dead_at:.0f}/s), "
        f"valid events once after {elapsed:.1f}s; readiness checked "
        f"{sum(w.checks for w in readiness)} times, never failing"
    )


SERVICES = ("registry", "builder", "validator", "deployer", "monitor")


async def test_malformed_events_are_dead_lettered_with_their_reason(
    nats_private: NatsServer, private_dsn: str, registry_url: str, tmp_path: Path, unique: str
) -> None:
    """The short run (``make test``): the five services together, 500 events each."""
    seed = fuzz_seed("every consumer, 500 malformed events per service")
    async with running(SERVICES, nats_private, private_dsn, registry_url, tmp_path, unique) as runs:
        await fuzz_consumers(runs, 500, seed)


@pytest.mark.fuzz
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("service", SERVICES)
async def test_10000_malformed_events_per_consumer(
    service: str,
    nats_private: NatsServer,
    private_dsn: str,
    registry_url: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """The full run (``make fuzz``): one service at a time, 10,000 events."""
    seed = fuzz_seed(f"{service}'s consumers, 10,000 malformed events")
    async with running(
        (service,), nats_private, private_dsn, registry_url, tmp_path, unique
    ) as runs:
        await fuzz_consumers(runs, 10_000, seed)
