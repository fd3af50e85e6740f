"""A worker process of the ``connections`` benchmark: holds device sessions open.

``python -m bench.edge_sessions ADDRESS BUNDLES.json RATE`` opens one mTLS session per
device of the bundle file (``RATE`` new sessions a second), sends each device's telemetry
batch every 10 s and prints ``{"connected": …, "acked": …, "errors": …}`` every second
until its stdin closes.

The sessions speak gRPC over HTTP/2 with the ``h2`` protocol library on asyncio TLS
streams: a grpcio channel costs the load generator megabytes and threads, which would
make the load generator, not the gateway, the limit of a 10,000-session run on one
machine. The gateway sees ordinary gRPC clients (each its own TLS connection, client
certificate, HTTP/2 stream ``EdgeGateway/Connect``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import sys
import tempfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events

from bench.edge_gateway import _batch
from edgeloop.contracts.edge.v1 import edge_pb2 as pb

PERIOD = 10.0
PATH = "/edgeloop.edge.v1.EdgeGateway/Connect"
_ENDS = (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)


def _context(bundle: dict[str, Any], directory: Path, device: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=bundle["ca_certificate"])
    pem = directory / f"{device}.pem"
    pem.write_text(bundle["certificate"] + bundle["private_key"])
    ctx.load_cert_chain(pem)
    ctx.set_alpn_protocols(["h2"])
    return ctx


class GrpcStream:
    """One bidirectional gRPC call on its own HTTP/2 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.stream_id = 0
        self.buffer = b""

    async def open(self, authority: str) -> None:
        self.h2.initiate_connection()
        self.stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            self.stream_id,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", PATH),
                (":authority", authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        await self._flush()

    async def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def send(self, message: bytes) -> None:
        self.h2.send_data(self.stream_id, b"\x00" + len(message).to_bytes(4, "big") + message)
        await self._flush()

    def start_reading(self) -> None:
        """Read the connection all the time, as a real client does: the server's
        keepalive PINGs are answered at once, not only when a reply is awaited (a silent
        client gets GOAWAY ping_timeout)."""
        self._incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._pump = asyncio.create_task(self._read_forever())

    async def _read_forever(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                ended = False
                for event in self.h2.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        self.h2.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                        self.buffer += event.data
                        while len(self.buffer) >= 5:
                            size = int.from_bytes(self.buffer[1:5], "big")
                            if len(self.buffer) < 5 + size:
                                break
                            self._incoming.put_nowait(self.buffer[5 : 5 + size])
                            self.buffer = self.buffer[5 + size :]
                    elif isinstance(event, _ENDS):
                        ended = True
                await self._flush()  # settings/ping acknowledgements, window updates
                if ended:
                    break
        finally:
            self._incoming.put_nowait(None)

    async def receive(self) -> AsyncIterator[pb.GatewayMessage]:
        while True:
            data = await self._incoming.get()
            if data is None:
                return
            yield pb.GatewayMessage.FromString(data)

    def close(self) -> None:
        self._pump.cancel()


async def run(address: str, bundles: dict[str, dict[str, Any]], rate: float) -> None:
    """Sessions for ``bundles`` until stdin closes."""
    counts: dict[str, Any] = {"connected": 0, "acked": 0, "errors": 0, "reasons": {}}
    stop = asyncio.Event()
    host, port = address.rsplit(":", 1)
    certs = Path(tempfile.mkdtemp(prefix="edgeloop-sessions-"))

    async def session(d: str, ctx: ssl.SSLContext) -> None:
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=ctx, server_hostname=host
        )
        call = GrpcStream(reader, writer)
        try:
            await call.open(address)
            call.start_reading()
            await call.send(pb.AgentMessage(hello=pb.Hello(device_id=d)).SerializeToString())
            incoming = call.receive()
            first = await anext(incoming)
            if first.WhichOneof("kind") != "welcome":
                raise RuntimeError(f"no welcome: {first}")
            counts["connected"] += 1
            try:
                # spread the batches over the period, stably per device
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), zlib.crc32(d.encode()) % 1000 / 100)
                data = pb.AgentMessage(telemetry=_batch(d))
                while not stop.is_set():
                    data.telemetry.batch_id = f"{d}-{counts['acked']}-{random.random()}"
                    await call.send(data.SerializeToString())
                    async for msg in incoming:  # desired state may come before the ack
                        kind = msg.WhichOneof("kind")
                        if kind == "ack":
                            counts["acked"] += 1
                            break
                        if kind == "error":
                            counts["errors"] += 1
                            break
                    else:
                        raise RuntimeError("stream ended")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), PERIOD)
            finally:
                counts["connected"] -= 1
        finally:
            if hasattr(call, "_pump"):
                call.close()
            writer.close()

    async def device(d: str, bundle: dict[str, Any]) -> None:
        """A session, reconnected with back-off and jitter as the agent does."""
        ctx = _context(bundle, certs, d)
        delay = 1.0
        while not stop.is_set():
            try:
                await session(d, ctx)
            except Exception as exc:
                counts["errors"] += 1
                reason = f"{type(exc).__name__}: {exc}"[:80]
                counts["reasons"][reason] = counts["reasons"].get(reason, 0) + 1
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
