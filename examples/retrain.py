"""The closed loop's last step, as an example trainer: it waits for ``retrain.requested``,
exports the samples the monitor selected, retrains the scikit-learn model on the old
training data plus the new samples, converts it with skl2onnx and registers the new
version with its lineage (``parent``, ``retrain_request_id``). The builder and the
validator take it from there.

    python -m examples.retrain --dataset iris          # against `make up`'s stack

New samples carry their manual label when an operator gave one (``edgeloop data label``);
the others get the current model's prediction (self-training: the new version learns the
shifted inputs' region, and its reference profile now covers them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from typing import Any

import httpx
import nats
import numpy as np
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import RetrainRequested
from edgeloop.contracts.stackfile import load_stack_json, state_dir
from examples.platform import client
from examples.sklearn_models import logistic, logistic_onnx, npz, split

log = logging.getLogger("examples.retrain")
DURABLE = "example-retrainer"
REFERENCE_ROWS = 300
"""The newest random samples that make the new version's reference profile."""
MIN_REFERENCE_ROWS = 100
COLLECT_RANDOM = 600
"""Random samples to collect before retraining (at most ``MAX_COLLECT`` seconds)."""
MAX_COLLECT = 60.0


def retrain(
    dataset: str, samples: list[dict[str, Any]], *, seed: int = 0
) -> tuple[bytes, bytes, bytes, int]:
    """(model.onnx, suite.npz, reference.npz, new rows used) trained on the bundled
    dataset's training split plus ``samples``."""
    s = split(dataset, seed=seed)
    x_train, y_train = s.x_train, s.y_train
    rows = [r for r in samples if len(r["features"]) == x_train.shape[1]]
    if rows:
        x_new = np.asarray([r["features"] for r in rows], dtype=np.float32)
        labels = [r.get("label") for r in rows]
        guessed = logistic(x_train, y_train).predict(x_new)  # the old model's answers
        y_new = np.asarray(
            [
                int(lab) if lab is not None else int(g)
                for lab, g in zip(labels, guessed, strict=True)
            ]
        )
        x_train = np.concatenate([x_train, x_new])
        y_train = np.concatenate([y_train, y_new])
    # The new version's reference profile is what the devices see now: the latest
    # random share of their inputs (low-confidence samples are not representative),
    # when there are enough of them; else the training data.
    recent = sorted((r for r in rows if r.get("kind") == "random"), key=lambda r: r["at"])
    x_ref = (
        np.asarray([r["features"] for r in recent[-REFERENCE_ROWS:]], dtype=np.float32)
        if len(recent) >= MIN_REFERENCE_ROWS
        else x_train
    )
    return (
        logistic_onnx(logistic(x_train, y_train), x_train),
        npz(X=s.x_val, y=s.y_val),
        npz(X=x_ref, feature_names=np.array(s.feature_names, dtype=str)),
        len(rows),
    )


async def handle(
    request: RetrainRequested,
    dataset: str,
    registry: httpx.AsyncClient,
    monitor: httpx.AsyncClient,
    *,
    collect_seconds: float = MAX_COLLECT,
) -> dict[str, Any]:
    """Export, retrain, register: the registry's answer for the new version.

    An early alarm comes when the new inputs have only begun: the trainer collects until
    the selection holds ``COLLECT_RANDOM`` samples of the random share (what the devices
    see now), for at most ``collect_seconds``."""
    params: dict[str, Any] = {"model": request.model, "kind": "all"}
    if request.dataset.since:
        params["since"] = request.dataset.since.isoformat()
    deadline = asyncio.get_running_loop().time() + collect_seconds
    while True:
        resp = await monitor.get("/v1/samples", params=params)
        resp.raise_for_status()
        randoms = sum(1 for r in resp.json()["samples"] if r.get("kind") == "random")
        if randoms >= COLLECT_RANDOM or asyncio.get_running_loop().time() >= deadline:
            break
        log.info("collecting: %d of %d random samples so far", randoms, COLLECT_RANDOM)
        await asyncio.sleep(2.0)
    samples = resp.json()["samples"]
    onnx, suite, reference, used = await asyncio.to_thread(retrain, dataset, samples)
    for attempt in range(1, 6):
        try:
            resp = await registry.post(
                f"/api/v1/models/{request.model}/versions",
                files={
                    "model": ("model.onnx", onnx),
                    "suite": ("suite.npz", suite),
                    "reference": ("reference.npz", reference),
                },
                data={
                    "parent": f"{request.model}@{request.version}",
                    "retrain_request_id": str(request.request_id),
                    "params": json.dumps({"retrained_on_samples": str(used)}),
                },
            )
            break
        except httpx.TransportError:
            # the registry went away mid-request: registering again is safe (the same
            # retraining request gives the same version)
            if attempt == 5:
                raise
            await asyncio.sleep(2.0)
    resp.raise_for_status()
    body = dict(resp.json())
    log.info(
        "retrain request %s: %s@%s registered (parent %s, %d new samples)",
        request.request_id,
        request.model,
        body["version"],
        request.version,
        used,
    )
    return body


async def run(args: argparse.Namespace) -> None:
    """Consume ``retrain.requested`` until interrupted."""
    stack = load_stack_json()
    token = os.environ.get("EDGELOOP_API_TOKEN") or (state_dir() / "api-token").read_text().strip()
    nc = await nats.connect(args.nats or stack.get("nats_url", "nats://127.0.0.1:14222"))
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        s.RETRAIN_REQUESTED,
        durable=DURABLE,
        stream=s.STREAM_LIFECYCLE,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT, ack_wait=300
        ),
    )
    async with (
        client(stack.get("registry_api", "http://127.0.0.1:18100"), token) as registry,
        client(stack.get("monitor_api", "http://127.0.0.1:18400"), token) as monitor,
    ):
        log.info("waiting for retrain.requested (model %s)", args.model or "any")
        while True:
            try:
                msgs = await sub.fetch(1, timeout=5)
            except TimeoutError:
                continue
            for msg in msgs:
                request = RetrainRequested.model_validate_json(msg.data)
                if args.model and request.model != args.model:
                    await msg.ack()
                    continue
                try:
                    await handle(
                        request,
                        args.dataset,
                        registry,
                        monitor,
                        collect_seconds=args.collect_seconds,
                    )
                except httpx.HTTPError as exc:
                    log.warning("retraining failed (will be redelivered): %s", exc)
                    await msg.nak(delay=10)
                    continue
                await msg.ack()


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="iris", help="the bundled dataset of the model")
    parser.add_argument("--model", default=None, help="only this model's requests")
    parser.add_argument("--nats", default=None, help="NATS URL (default: from make up)")
    parser.add_argument(
        "--collect-seconds",
        type=float,
        default=MAX_COLLECT,
        help="how long to wait for new data after an alarm at most",
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
