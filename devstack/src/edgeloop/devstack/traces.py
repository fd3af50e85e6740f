"""A small trace collector for the embedded stack and the tests: an OTLP/gRPC
``TraceService`` receiver that keeps the spans in memory, and an HTTP query API shaped
like Jaeger's (``GET /api/traces/{trace_id}``), so ``edgeloop trace`` reads the same
answer from this collector or from a real Jaeger.

    python -m edgeloop.devstack.traces      # OTLP on :14317, queries on :18700

``make up`` runs it when no ``EDGELOOP_OTLP_ENDPOINT`` is given and points every service
at it. Memory is bounded: past ``max_spans`` the oldest traces are forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

log = logging.getLogger(__name__)

OTLP_PORT = 14317
QUERY_PORT = 18700


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return (
        getattr(v, kind)
        if kind in ("string_value", "bool_value", "int_value", "double_value")
        else None
    )


@dataclass
class SpanStore:
    """Spans by trace id, the oldest traces dropped past ``max_spans``."""

    max_spans: int = 500_000
    traces: OrderedDict[str, list[dict[str, Any]]] = field(default_factory=OrderedDict)
    count: int = 0
    received: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, request: tpb.ExportTraceServiceRequest) -> int:
        """Keep every span of an export request; how many."""
        n = 0
        for rs in request.resource_spans:
            service = "unknown"
            for attr in rs.resource.attributes:
                if attr.key == "service.name":
                    service = str(_value(attr.value))
            for ss in rs.scope_spans:
                for span in ss.spans:
                    trace_id = span.trace_id.hex()
                    self.traces.setdefault(trace_id, []).append(
                        {
                            "trace_id": trace_id,
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex() or None,
                            "name": span.name,
                            "service": service,
                            "start_ns": span.start_time_unix_nano,
                            "end_ns": span.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "status": span.status.code,
                        }
                    )
                    n += 1
        self.count += n
        while self.count > self.max_spans and self.traces:
            _, dropped = self.traces.popitem(last=False)
            self.count -= len(dropped)
        self.received.set()
        return n

    def jaeger(self, trace_id: str) -> dict[str, Any]:
        """One trace in the shape of Jaeger's ``/api/traces/{id}`` answer."""
        spans = self.traces.get(trace_id.lower(), [])
        processes: dict[str, dict[str, str]] = {}
        out = []
        for s in spans:
            pid = processes.setdefault(
                s["service"], {"serviceName": s["service"], "pid": f"p{len(processes) + 1}"}
            )["pid"]
            out.append(
                {
                    "traceID": s["trace_id"],
                    "spanID": s["span_id"],
                    "operationName": s["name"],
                    "references": [
                        {
                            "refType": "CHILD_OF",
                            "traceID": s["trace_id"],
                            "spanID": s["parent_span_id"],
                        }
                    ]
                    if s["parent_span_id"]
                    else [],
                    "startTime": s["start_ns"] // 1000,
                    "duration": max(0, s["end_ns"] - s["start_ns"]) // 1000,
                    "tags": [{"key": k, "value": v} for k, v in s["attributes"].items()],
                    "processID": pid,
                }
            )
        procs = {p["pid"]: {"serviceName": p["serviceName"]} for p in processes.values()}
        data = [{"traceID": trace_id, "spans": out, "processes": procs}] if out else []
        return {"data": data}


class _Receiver(tgrpc.TraceServiceServicer):
    def __init__(self, store: SpanStore) -> None:
        self.store = store

    async def Export(
        self, request: tpb.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> tpb.ExportTraceServiceResponse:
        self.store.add(request)
        return tpb.ExportTraceServiceResponse()


class Collector:
    """The OTLP receiver and the query API, in this event loop."""

    def __init__(self, otlp_port: int = 0, query_port: int = 0, host: str = "127.0.0.1") -> None:
        self.store = SpanStore()
        self.host = host
        self.otlp_port = otlp_port
        self.query_port = query_port
        self._grpc: grpc.aio.Server | None = None
        self._http: asyncio.Server | None = None

    @property
    def otlp_endpoint(self) -> str:
        return f"http://{self.host}:{self.otlp_port}"

    @property
    def query_url(self) -> str:
        return f"http://{self.host}:{self.query_port}"

    async def start(self) -> None:
        self._grpc = grpc.aio.server()
        tgrpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Receiver(self.store), self._grpc
        )
        self.otlp_port = self._grpc.add_insecure_port(f"{self.host}:{self.otlp_port}")
        await self._grpc.start()
        self._http = await asyncio.start_server(self._serve, self.host, self.query_port)
        self.query_port = self._http.sockets[0].getsockname()[1]
        log.info("traces: OTLP on %s, queries on %s", self.otlp_endpoint, self.query_url)

    async def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
        if self._grpc is not None:
            await self._grpc.stop(1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            path = urlsplit(target).path
            if path.startswith("/api/traces/"):
                status, body = 200, self.store.jaeger(path.rsplit("/", 1)[1])
                if not body["data"]:
                    status = 404
            elif path in ("/healthz", "/readyz"):
                status, body = 200, {"status": "ok", "spans": self.store.count}
            else:
                status, body = 404, {"error": f"no such path {path}"}
            data = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()


async def _main() -> None:
    env = os.environ
    collector = Collector(
        int(env.get("EDGELOOP_TRACES_OTLP_PORT", OTLP_PORT)),
        # under `make up` the query API is the process's health port
        int(
            env.get("EDGELOOP_TRACES_QUERY_PORT")
            or env.get("EDGELOOP_TRACES_HTTP_PORT")
            or QUERY_PORT
        ),
    )
    await collector.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(asyncio.CancelledError):
        await stop.wait()
    await collector.stop()


def main() -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_main())


if __name__ == "__main__":
    main()
