"""NATS's key figures as Prometheus metrics, read from nats-server's monitoring endpoint.

The pinned nats-server (2.15) serves its figures as JSON only (``/varz``, ``/jsz``): no
Prometheus format. This collector reads them at each scrape, from every server it is
given (a cluster's nodes), and renders them as ``nats_*`` metrics labelled with the
server's name, so the figures are never older than the scrape. ``python -m
edgeloop.kit.natsmetrics`` serves them on the kit's health endpoint (``/metrics``,
``/readyz`` ready while a server answers); ``make up`` and Compose run it as
``nats_metrics``.

Settings (``EDGELOOP_NATS_METRICS_…``): ``URLS`` the monitoring URLs, comma separated
(``http://127.0.0.1:8222``); ``HTTP_HOST``/``HTTP_PORT`` where to serve.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgeloop.kit.http import HealthServer

log = logging.getLogger(__name__)

# No proxy: an http_proxy in the environment must not intercept the server's own port.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

#: /varz figures: (metric, key, help, counter?)
VARZ: tuple[tuple[str, str, str, bool], ...] = (
    ("nats_connections", "connections", "Client connections open", False),
    ("nats_total_connections", "total_connections", "Client connections since start", True),
    ("nats_subscriptions", "subscriptions", "Subscriptions", False),
    ("nats_slow_consumers", "slow_consumers", "Slow consumers since start", True),
    ("nats_in_msgs", "in_msgs", "Messages received", True),
    ("nats_out_msgs", "out_msgs", "Messages sent", True),
    ("nats_in_bytes", "in_bytes", "Bytes received", True),
    ("nats_out_bytes", "out_bytes", "Bytes sent", True),
    ("nats_mem_bytes", "mem", "Resident memory of the server", False),
    ("nats_cpu_percent", "cpu", "CPU use of the server (percent of one core)", False),
)
#: /jsz figures of the server as a whole
JSZ: tuple[tuple[str, str, str], ...] = (
    ("nats_jetstream_streams", "streams", "Streams on this server"),
    ("nats_jetstream_consumers", "consumers", "Consumers on this server"),
    ("nats_jetstream_messages", "messages", "Messages stored on this server"),
    ("nats_jetstream_bytes", "bytes", "Bytes stored on this server"),
)
#: per stream (its ``state``)
STREAM: tuple[tuple[str, str, str], ...] = (
    ("nats_stream_messages", "messages", "Messages in the stream"),
    ("nats_stream_bytes", "bytes", "Bytes in the stream"),
    ("nats_stream_consumers", "consumer_count", "Consumers of the stream"),
)
#: per consumer
CONSUMER: tuple[tuple[str, str, str], ...] = (
    ("nats_consumer_num_pending", "num_pending", "Messages not yet delivered (the lag)"),
    ("nats_consumer_num_ack_pending", "num_ack_pending", "Delivered, not yet acknowledged"),
    ("nats_consumer_num_redelivered", "num_redelivered", "Redelivered, not yet acknowledged"),
    ("nats_consumer_num_waiting", "num_waiting", "Pull requests waiting"),
)


def _get(url: str, timeout: float) -> dict[str, Any]:
    with _opener.open(url, timeout=timeout) as resp:
        return dict(json.loads(resp.read()))


def _answers(url: str) -> bool:
    try:
        with _opener.open(f"{url}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class NatsCollector(Collector):
    """Collects ``/varz`` and ``/jsz`` of each server in ``urls`` at every scrape.

    A server that does not answer gives ``nats_up 0`` (labelled with its URL) and no other
    figure; the others are still collected.
    """

    def __init__(self, urls: list[str], timeout: float = 3.0) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = timeout

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Every figure of every server (``prometheus_client`` calls it per scrape)."""
        up = GaugeMetricFamily("nats_up", "1 if the server's monitoring answered", labels=["url"])
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

        def family(
            name: str, doc: str, labels: list[str], counter: bool = False
        ) -> GaugeMetricFamily | CounterMetricFamily:
            if name not in families:
                kind = CounterMetricFamily if counter else GaugeMetricFamily
                families[name] = kind(name, doc, labels=labels)
            return families[name]

        for url in self.urls:
            try:
                varz = _get(f"{url}/varz", self.timeout)
                jsz = _get(f"{url}/jsz?accounts=true&streams=true&consumers=true", self.timeout)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                log.debug("NATS monitoring at %s: %s", url, exc)
                up.add_metric([url], 0)
                continue
            up.add_metric([url], 1)
            server = str(varz.get("server_name") or varz.get("server_id") or url)
            info = family("nats_server_info", "The server's version", ["server", "version"])
            info.add_metric([server, str(varz.get("version", ""))], 1)
            for name, key, doc, counter in VARZ:
                if key in varz:
                    family(name, doc, ["server"], counter).add_metric([server], varz[key])
            for name, key, doc in JSZ:
                family(name, doc, ["server"]).add_metric([server], jsz.get(key, 0))
            api = jsz.get("api") or {}
            family("nats_jetstream_api_requests", "JetStream API requests", ["server"], True)
            families["nats_jetstream_api_requests"].add_metric([server], api.get("total", 0))
            family("nats_jetstream_api_errors", "JetStream API errors", ["server"], True)
            families["nats_jetstream_api_errors"].add_metric([server], api.get("errors", 0))
            for account in jsz.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    self._stream(family, server, stream)
        yield up
        yield from families.values()

    @staticmethod
    def _stream(family: Any, server: str, stream: dict[str, Any]) -> None:
        name = str(stream.get("name", ""))
        state = stream.get("state") or {}
        for metric, key, doc in STREAM:
            family(metric, doc, ["server", "stream"]).add_metric([server, name], state.get(key, 0))
        for consumer in stream.get("consumer_detail") or []:
            labels = [server, name, str(consumer.get("name", ""))]
            for metric, key, doc in CONSUMER:
                family(metric, doc, ["server", "stream", "consumer"]).add_metric(
                    labels, consumer.get(key, 0)
                )


class NatsMetricsSettings(BaseSettings):
    """Where the NATS servers' monitoring is, and where to serve their metrics."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_NATS_METRICS_")

    urls: str
    """The servers' monitoring URLs, comma separated (``http://127.0.0.1:8222``)."""
    http_host: str = "127.0.0.1"
    """The address to serve ``/metrics``, ``/healthz`` and ``/readyz`` on."""
    http_port: int = 8080
    """The port to serve them on."""

    def url_list(self) -> list[str]:
        """``urls`` as a list."""
        return [u.strip() for u in self.urls.split(",") if u.strip()]


async def serve(settings: NatsMetricsSettings, stop: asyncio.Event) -> None:
    """Serve the metrics until ``stop`` is set."""
    collector = NatsCollector(settings.url_list())
    REGISTRY.register(collector)

    async def answers() -> tuple[bool, str]:
        """Ready while one server's monitoring answers (its metrics can be collected)."""
        down = [u for u in collector.urls if not await asyncio.to_thread(_answers, u)]
        return len(down) < len(collector.urls), f"not answering: {', '.join(down)}" if down else ""

    health = HealthServer(settings.http_host, settings.http_port, {"nats": answers})
    await health.start()
    try:
        await stop.wait()
    finally:
        await health.stop()
        REGISTRY.unregister(collector)


def main() -> None:
    """``python -m edgeloop.kit.natsmetrics``."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    settings = NatsMetricsSettings()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
