"""Prometheus for ``make up``: Debian's ``prometheus`` with a generated scrape
configuration and the alert rules shipped in ``deploy/prometheus/alerts.yml``.

It scrapes every platform service's kit endpoint (``/metrics`` on its health port, each
replica its own target, labelled ``service``), the simulated fleet, NATS's figures (served
by ``edgeloop.kit.natsmetrics``: nats-server has no Prometheus format) and itself. Jobs:
``edgeloop``, ``fleet``, ``nats``, ``prometheus``, as in ``deploy/prometheus/prometheus.yml``
(Compose), so the rules hold in both. ``EDGELOOP_PROMETHEUS_INTERVAL`` sets the scrape and
rule evaluation interval (default 15s; tests use 1s).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeloop.devstack.servers import ManagedProcess, free_port, http_ok

PROMETHEUS = "/usr/bin/prometheus"
DEFAULT_INTERVAL = "15s"
#: the repository's deploy/prometheus (this file is devstack/src/edgeloop/devstack/…)
DEPLOY_DIR = Path(__file__).resolve().parents[4] / "deploy" / "prometheus"
ALERTS = DEPLOY_DIR / "alerts.yml"


@dataclass(frozen=True)
class Target:
    """One scrape target: ``job``, ``host:port`` and the ``service`` it is."""

    job: str
    address: str
    service: str


def interval() -> str:
    """The scrape and evaluation interval (``EDGELOOP_PROMETHEUS_INTERVAL``, e.g. ``1s``)."""
    return os.environ.get("EDGELOOP_PROMETHEUS_INTERVAL") or DEFAULT_INTERVAL


def scrape_config(
    targets: Sequence[Target], rules: Sequence[Path] = (ALERTS,), every: str | None = None
) -> str:
    """A Prometheus configuration scraping ``targets`` (grouped by job), with ``rules``.

    JSON is YAML: written as JSON, no value needs quoting rules of its own.
    """
    every = every or interval()
    jobs: dict[str, list[Target]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append(target)
    config = {
        "global": {"scrape_interval": every, "evaluation_interval": every},
        "rule_files": [str(path) for path in rules],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [
                    {"targets": [t.address], "labels": {"service": t.service}} for t in members
                ],
            }
            for job, members in jobs.items()
        ],
    }
    return "# written by edgeloop.devstack.prometheus\n" + json.dumps(config, indent=2) + "\n"


class Prometheus(ManagedProcess):
    """Debian's ``prometheus`` on 127.0.0.1:``port``, its TSDB under ``data_dir``.

    Args:
        data_dir: where the configuration, the data and the log go.
        targets: what it scrapes (itself is added).
        port: its HTTP port (default: a free one).
        rules: rule files (default: the shipped alert rules).
    """

    name = "prometheus"
    binary = PROMETHEUS

    def __init__(
        self,
        data_dir: Path,
        targets: Sequence[Target],
        port: int | None = None,
        rules: Sequence[Path] = (ALERTS,),
    ) -> None:
        super().__init__(data_dir)
        self.port = port or free_port()
        self.targets = [*targets, Target("prometheus", f"127.0.0.1:{self.port}", "prometheus")]
        self.rules = tuple(rules)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the web UI, ``/api/v1/…``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        """The generated configuration."""
        return self.data_dir / "prometheus.yml"

    def prepare(self) -> None:
        if not Path(self.binary).exists():
            raise RuntimeError(
                f"{self.binary} not found: install it with `apt-get install prometheus` "
                "(`make setup` does)"
            )
        missing = [str(path) for path in self.rules if not path.exists()]
        if missing:
            raise RuntimeError(f"alert rules not found: {', '.join(missing)}")
        self.config_path.write_text(scrape_config(self.targets, self.rules))

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=7d",
            "--log.level=warn",
        ]

    def ready(self) -> bool:
        return http_ok(f"{self.url}/-/ready")

    def status_urls(self) -> dict[str, str]:
        return {"health_url": f"{self.url}/-/healthy", "ready_url": f"{self.url}/-/ready"}
