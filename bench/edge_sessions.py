"""A worker process of the ``connections`` benchmark: holds device sessions open.

``python -m bench.edge_sessions ADDRESS BUNDLES.json RATE`` opens one mTLS session per
device of the bundle file (``RATE`` new sessions a second), sends each device's telemetry
batch every 10 s and prints ``{"connected": …, "acked": …, "errors": …}`` every second
until its stdin closes. Several workers share the load so the load generator is not the
bottleneck of a 10,000-session run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import zlib
from pathlib import Path
from typing import Any

import grpc

from bench.edge_gateway import _batch, _channel
from edgeloop.contracts.edge.v1 import edge_pb2 as pb

PERIOD = 10.0


async def run(address: str, bundles: dict[str, dict[str, Any]], rate: float) -> None:
    """Sessions for ``bundles`` until stdin closes."""
    counts = {"connected": 0, "acked": 0, "errors": 0}
    stop = asyncio.Event()

    async def session(d: str, bundle: dict[str, Any]) -> None:
        async with _channel(address, bundle) as channel:
            call = channel.stream_stream(
                "/edgeloop.edge.v1.EdgeGateway/Connect",
                request_serializer=pb.AgentMessage.SerializeToString,
                response_deserializer=pb.GatewayMessage.FromString,
            )()
            await call.write(pb.AgentMessage(hello=pb.Hello(device_id=d)))
            await call.read()
            counts["connected"] += 1
            try:
                # spread the batches over the period, stably per device
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), zlib.crc32(d.encode()) % 1000 / 100)
                data = pb.AgentMessage(telemetry=_batch(d))
                while not stop.is_set():
                    data.telemetry.batch_id = f"{d}-{counts['acked']}"
                    await call.write(data)
                    while True:  # desired-state pushes may come before the ack
                        msg = await call.read()
                        if msg is grpc.aio.EOF:
                            raise RuntimeError("stream ended")
                        if msg.WhichOneof("kind") in ("ack", "error"):
                            break
                    if msg.WhichOneof("kind") == "ack":
                        counts["acked"] += 1
                    else:
                        counts["errors"] += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), PERIOD)
            finally:
                counts["connected"] -= 1
                call.cancel()

    async def device(d: str, bundle: dict[str, Any]) -> None:
        """A session, reconnected with back-off and jitter as the agent does."""
        delay = 1.0
        while not stop.is_set():
            try:
                await session(d, bundle)
            except Exception as exc:
                counts["errors"] += 1
                if counts["errors"] <= 3:
                    print(json.dumps({"error": f"{d}: {type(exc).__name__}: {exc}"[:300]}))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay * (0.5 + random.random()))
            delay = min(delay * 2, 30.0)

    async def report() -> None:
        while True:
            print(json.dumps(counts), flush=True)
            await asyncio.sleep(1)

    async def stdin_closed() -> None:
        await asyncio.to_thread(sys.stdin.read)
        stop.set()

    reporter = asyncio.create_task(report())
    watcher = asyncio.create_task(stdin_closed())
    tasks = []
    for d, bundle in bundles.items():
        if stop.is_set():
            break
        tasks.append(asyncio.create_task(device(d, bundle)))
        await asyncio.sleep(1 / rate)
    await watcher
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    reporter.cancel()
    print(json.dumps(counts), flush=True)


def main() -> None:
    address, path, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
    asyncio.run(run(address, json.loads(Path(path).read_text()), rate))


if __name__ == "__main__":
    main()
