"""OpenTelemetry set-up: OTLP exporter from settings, W3C context in NATS headers."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

_asyncpg_instrumented = False


def setup_tracing(
    service_name: str, otlp_endpoint: str | None, *, trace_sql: bool = False
) -> TracerProvider | None:
    """A tracer provider for ``service_name`` exporting by OTLP/gRPC, when configured.

    With no endpoint there is nowhere to send spans, so none are recorded (the global
    no-op provider): trace context still travels in message headers, at no cost. With
    ``trace_sql``, PostgreSQL calls are traced too (asyncpg instrumentation, once per
    process; a span per query, so off unless asked for).
    """
    global _asyncpg_instrumented
    if not otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True), schedule_delay_millis=1000
        )
    )
    if trace_sql and not _asyncpg_instrumented:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().instrument(  # type: ignore[no-untyped-call]
            tracer_provider=provider
        )
        _asyncpg_instrumented = True
    return provider


def inject_headers() -> dict[str, str]:
    """The current trace context as NATS headers (``traceparent``/``tracestate``)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def tracer(provider: TracerProvider | None, name: str) -> trace.Tracer:
    """A tracer of ``provider`` (the global, no-op one when tracing is off)."""
    return (provider or trace.get_tracer_provider()).get_tracer(name)


def parent_context(trace_parent: str | None) -> Context:
    """The context of a stored ``traceparent`` (empty: a new trace)."""
    return propagate.extract({"traceparent": trace_parent} if trace_parent else {})


def current_trace_id() -> str | None:
    """Hex trace id of the current span, for structured logs."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """An OTel context from message headers (for spans started outside FastStream)."""
    return propagate.extract(dict(headers or {}))
