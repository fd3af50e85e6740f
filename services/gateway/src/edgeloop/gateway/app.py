"""Wiring of the gateway: kit Service (NATS, PostgreSQL, health) + the device-facing
gRPC server (mTLS, health, reflection) + the HTTP API (devices, enrolment)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgeloop.contracts import subjects as s
from edgeloop.contracts.signing import key_id, load_public_key
from edgeloop.gateway.api import create_api
from edgeloop.gateway.artifacts import ArtifactCache
from edgeloop.gateway.config import GatewaySettings
from edgeloop.gateway.devices import DeviceStore
from edgeloop.gateway.pki import CertificateAuthority, server_credentials
from edgeloop.gateway.server import SERVICE, EdgeGateway
from edgeloop.kit.api import serve_api
from edgeloop.kit.oci import OciClient
from edgeloop.kit.service import Service, configure_logging
from edgeloop.kit.tracing import tracer

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parents[3] / "migrations"

GRPC_OPTIONS = [
    # The application refuses messages over max_message_bytes with an Error the device
    # can act on; gRPC's own limit is only the backstop.
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def build(settings: GatewaySettings) -> tuple[Service, asyncio.Event]:
    """The gateway service, ready to ``run()``, and an event set once gRPC serves."""
    svc = Service("gateway", settings, migrations=MIGRATIONS)
    serving = asyncio.Event()
    signing_pem = settings.signing_public_key.read_bytes() if settings.signing_public_key else None
    trusted = key_id(load_public_key(signing_pem)) if signing_pem else None
    ca = CertificateAuthority.load_or_create(settings.pki_dir)
    cert, key = server_credentials(settings.pki_dir, ca, settings.hostnames())

    @svc.background
    async def serve(service: Service) -> None:
        oci = OciClient(settings.oci_registry_url)
        store = DeviceStore(service.pool, service.schema)
        gateway = EdgeGateway(
            js=service.js,
            desired_kv=await service.js.key_value(s.KV_DESIRED),
            reported_kv=await service.js.key_value(s.KV_REPORTED),
            store=store,
            artifacts=ArtifactCache(
                oci,
                settings.cache_dir,
                trusted_key_id=trusted,
                rotations_dir=settings.signing_key_rotations,
            ),
            gateway_id=settings.gateway_id,
            heartbeat_seconds=settings.heartbeat_seconds,
            max_message_bytes=settings.max_message_bytes,
            outbound_queue=settings.outbound_queue,
            chunk_bytes=settings.chunk_bytes,
            max_sessions=settings.max_sessions,
            group_label=settings.group_label,
            max_hello_bytes=settings.max_hello_bytes,
            telemetry_policy=settings.telemetry_policy(),
            budget=settings.budget(),
            tracer=tracer(service.tracer_provider, "edgeloop.gateway"),
        )
        await gateway.start()
        server = grpc.aio.server(options=GRPC_OPTIONS)
        server.add_generic_rpc_handlers([gateway.handlers()])
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        creds = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca.cert_pem, require_client_auth=True
        )
        port = server.add_secure_port(f"{settings.grpc_host}:{settings.grpc_port}", creds)
        await server.start()
        for name in ("", SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        http_task = asyncio.create_task(
            serve_api(
                create_api(
                    store,
                    ca,
                    settings.tokens(),
                    gateway_address=settings.address(),
                    signing_public_key=signing_pem,
                ),
                settings.api_host,
                settings.api_port,
            ),
            name="gateway-api",
        )
        log.info("gateway serving gRPC on %s:%d", settings.grpc_host, port)
        serving.set()
        try:
            await http_task
        finally:
            serving.clear()
            http_task.cancel()
            await health_servicer.enter_graceful_shutdown()
            await gateway.stop()
            await server.stop(grace=5)
            with contextlib.suppress(BaseException):
                await http_task
            with contextlib.suppress(Exception):
                await oci.aclose()

    return svc, serving


def main() -> None:
    """``edgeloop-gateway`` / ``python -m edgeloop.gateway``."""
    settings = GatewaySettings()
    configure_logging(settings.log_level)
    svc, _ = build(settings)
    asyncio.run(svc.run())
