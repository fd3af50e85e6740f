"""NATS's figures as Prometheus metrics, read from a real nats-server's monitoring
endpoint (the pinned server has no Prometheus format of its own)."""

from __future__ import annotations

import uuid

import nats
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgeloop.devstack.servers import NatsServer, free_port
from edgeloop.kit.natsmetrics import NatsCollector


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_stream_and_consumer_figures_and_a_server_that_does_not_answer(
    nats_private: NatsServer,
) -> None:
    stream, durable = f"T{uuid.uuid4().hex[:8]}", "lagging"
    nc = await nats.connect(nats_private.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
        await js.add_consumer(stream, durable_name=durable)
        for i in range(3):
            await js.publish(f"{stream.lower()}.{i}", b"x")
    finally:
        await nc.close()
    gone = f"http://127.0.0.1:{free_port()}"
    registry = CollectorRegistry()
    registry.register(NatsCollector([nats_private.monitor_url, gone], timeout=2))

    samples = _samples(registry)

    assert samples[("nats_up", frozenset({("url", nats_private.monitor_url)}))] == 1
    assert samples[("nats_up", frozenset({("url", gone)}))] == 0
    (server,) = {dict(labels)["server"] for name, labels in samples if name == "nats_server_info"}
    of_stream = frozenset({("server", server), ("stream", stream)})
    assert samples[("nats_stream_messages", of_stream)] == 3
    assert samples[("nats_stream_consumers", of_stream)] == 1
    of_consumer = frozenset(of_stream | {("consumer", durable)})
    assert samples[("nats_consumer_num_pending", of_consumer)] == 3  # the consumer's lag
    assert samples[("nats_connections", frozenset({("server", server)}))] >= 0
    assert samples[("nats_in_msgs_total", frozenset({("server", server)}))] >= 3
    # the platform's streams, declared by the bootstrap
    assert ("nats_stream_messages", frozenset({("server", server), ("stream", "DLQ")})) in samples
