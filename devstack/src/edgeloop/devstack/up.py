"""``make up``: the whole platform on this machine, embedded by default.

Starts NATS, PostgreSQL and the OCI registry with their state under ``.edgeloop/`` (a
second run keeps the data), or uses the external ones named by ``EDGELOOP_NATS_URL``,
``EDGELOOP_DATABASE_URL`` and ``EDGELOOP_OCI_REGISTRY_URL``; then every service that
exists as its own process. Services and embedded servers alike are supervised: one that
dies is reaped and started again with back-off (a server on the same port with the same
data; the services reconnect to it on their own). Writes
``.edgeloop/stack.json`` (what ``edgeloop status`` reads) and ``.edgeloop/up.pid``,
prints the endpoints, and on Ctrl-C / SIGTERM (``make down``) stops the services, then
the servers.

Environment: ``EDGELOOP_STATE_DIR`` (default ``.edgeloop``); ports
``EDGELOOP_NATS_PORT`` (14222), ``EDGELOOP_NATS_MONITOR_PORT`` (18222),
``EDGELOOP_PG_PORT`` (15432), ``EDGELOOP_OCI_REGISTRY_PORT`` (15000),
``EDGELOOP_REGISTRY_API_PORT`` (18100), ``EDGELOOP_NOTIFIER_API_PORT`` (18600),
``EDGELOOP_PROMETHEUS_PORT`` (19090; Prometheus scrapes every service and NATS, with
``deploy/prometheus/alerts.yml``; see ``edgeloop.devstack.prometheus``) and
``EDGELOOP_FIRST_HTTP_PORT`` (18080, the services' health ports count up from it).
``EDGELOOP_NATS_CLUSTER=3`` runs a 3-node NATS cluster instead of one server (the first
node on the NATS ports above, the others on free ones; state in ``nats-cluster/n<i>``),
with every stream and bucket on 3 nodes (``EDGELOOP_NATS_REPLICAS``); services get every
node's URL. ``EDGELOOP_SERVICE_REPLICAS=2``
``EDGELOOP_REGISTRY_API_PORT`` (18100), ``EDGELOOP_CONSOLE_PORT`` (18500, the console's
pages and its health) and ``EDGELOOP_FIRST_HTTP_PORT`` (18080, the
services' health ports count up from it). ``EDGELOOP_NATS_CLUSTER=3`` runs a 3-node NATS
cluster instead of one server (the first node on the NATS ports above, the others on
free ones; state in ``nats-cluster/n<i>``), with every stream and bucket on 3 nodes
(``EDGELOOP_NATS_REPLICAS``); services get every node's URL. ``EDGELOOP_SERVICE_REPLICAS=2``
runs a second process of every platform service (``<name>-2``, sharing its durable
consumers, partitions and tables; its HTTP APIs on free ports), started once the first
ones are ready.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import psutil

from edgeloop.contracts.access import SERVICES as SERVICE_ACCESS
from edgeloop.contracts.stackfile import redact, state_dir
from edgeloop.devstack.keys import (
    database_env,
    generated_secret,
    nats_users,
    service_tokens,
    signing_keys,
)
from edgeloop.devstack.nats_auth import NatsAuth
from edgeloop.devstack.prometheus import Prometheus, Target
from edgeloop.devstack.servers import (
    ManagedProcess,
    NatsCluster,
    NatsServer,
    OciRegistry,
    Postgres,
    http_ok,
    reap_group,
    signal_group,
)

#: (name, module) of every service, in start order; a service starts when its module
#: is importable (later issues add theirs). ``python -m <module>`` runs it.
SERVICES: tuple[tuple[str, str], ...] = (
    ("registry", "edgeloop.registry"),
    ("builder", "edgeloop.builder"),
    ("validator", "edgeloop.validator"),
    ("deployer", "edgeloop.deployer"),
    ("monitor", "edgeloop.monitor"),
    ("gateway", "edgeloop.gateway"),
    ("fleet", "edgeloop.edge.fleet"),
    # the trace collector (OTLP in, Jaeger-shaped queries out), unless an
    # EDGELOOP_OTLP_ENDPOINT sends the traces elsewhere
    ("traces", "edgeloop.devstack.traces"),
    # NATS's figures in Prometheus's format, for Prometheus (embedded NATS, or
    # EDGELOOP_NATS_METRICS_URLS naming the monitoring endpoints)
    ("nats_metrics", "edgeloop.kit.natsmetrics"),
    # webhooks for lifecycle events (edgeloop notify …)
    ("notifier", "edgeloop.notifier"),
    # the operators' web pages, over the APIs above (each person signs in with a token)
    ("console", "edgeloop.console"),
)

NATS_PORT = 14222
NATS_MONITOR_PORT = 18222
PG_PORT = 15432
OCI_REGISTRY_PORT = 15000
REGISTRY_API_PORT = 18100
GATEWAY_API_PORT = 18200
DEPLOYER_API_PORT = 18300
MONITOR_API_PORT = 18400
NOTIFIER_API_PORT = 18600
GATEWAY_GRPC_PORT = 18443
TRACES_OTLP_PORT = 14317
PROMETHEUS_PORT = 19090
CONSOLE_PORT = 18500
FLEET_DEVICES = 5
FIRST_HTTP_PORT = 18080
DATABASE = "edgeloop"
#: a service stopped with SIGTERM gets this long before SIGKILL
SERVICE_STOP_TIMEOUT = 20.0
#: a process that ran this long is stable again: its back-off starts over
STABLE_AFTER = 60.0
MAX_BACKOFF = 30.0


def _port(env: str, default: int) -> int:
    value = os.environ.get(env)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        sys.exit(f"{env}={value!r} is not a port number")


def _nats_nodes(root: Path, auth: NatsAuth) -> list[NatsServer]:
    """Start NATS: one server, or the cluster ``EDGELOOP_NATS_CLUSTER`` sizes (healthy
    on return); the first node listens on the NATS ports."""
    port = _port("EDGELOOP_NATS_PORT", NATS_PORT)
    monitor_port = _port("EDGELOOP_NATS_MONITOR_PORT", NATS_MONITOR_PORT)
    size = _count("EDGELOOP_NATS_CLUSTER")
    if size <= 1:
        return [NatsServer(root / "nats", port, monitor_port, auth=auth).start()]
    cluster = NatsCluster(
        root / "nats-cluster", size, auth=auth, port=port, monitor_port=monitor_port
    )
    return cluster.start().nodes


def _count(env: str) -> int:
    value = os.environ.get(env) or "1"
    if not value.isdigit():
        sys.exit(f"{env}={value!r} is not a count")
    return int(value)


def _replica_env(name: str, k: int, own: dict[str, str], gateway_address: str) -> dict[str, str]:
    """What replica ``k`` (2, 3 …) of service ``name`` changes in its environment: its
    HTTP APIs on free ports (clients use the first replica's), a gateway its gRPC port
    too, while telling devices the first one's address; and a name of its own where the
    service names itself by the host (the deployer owning rollouts, the gateway owning
    sessions): two replicas on one host under one name would both drive one rollout."""
    env = {key: "0" for key in own if key.endswith(("_API_PORT", "_GRPC_PORT"))}
    host = socket.gethostname()
    if name == "gateway":
        env["EDGELOOP_GATEWAY_PUBLIC_ADDRESS"] = gateway_address
        env["EDGELOOP_GATEWAY_GATEWAY_ID"] = f"{host}-{k}"
    if name == "deployer":
        env["EDGELOOP_DEPLOYER_INSTANCE_ID"] = f"{host}-deployer-{k}"
    return env


def _prometheus(root: Path, services: list[ServiceProcess]) -> Prometheus | None:
    """Prometheus on ``EDGELOOP_PROMETHEUS_PORT`` (19090), started, scraping every one of
    ``services`` (replicas too, started yet or not) but the trace collector, which has no
    metrics; None, with a warning, where Debian's prometheus is not installed."""
    prometheus_binary = Path(Prometheus.binary)
    if not prometheus_binary.exists():
        print(f"  ! {prometheus_binary} not found: no Prometheus (`make setup` installs it)")
        return None
    jobs = {"fleet": "fleet", "nats_metrics": "nats"}
    targets = [
        Target(jobs.get(svc.name, "edgeloop"), f"127.0.0.1:{svc.http_port}", svc.name)
        for svc in services
        if svc.name != "traces"
    ]
    port = _port("EDGELOOP_PROMETHEUS_PORT", PROMETHEUS_PORT)
    return Prometheus(root / "prometheus", targets, port).start()


def _console_env(endpoints: dict[str, Any], port: int) -> dict[str, str]:
    """The console's settings: where the APIs are (it holds no secret: each person signs
    in with their own token)."""
    env = {
        "EDGELOOP_CONSOLE_PORT": str(port),
        "EDGELOOP_CONSOLE_REGISTRY_API": endpoints["registry_api"],
        "EDGELOOP_CONSOLE_DEPLOYER_API": endpoints["deployer_api"],
        "EDGELOOP_CONSOLE_MONITOR_API": endpoints["monitor_api"],
        "EDGELOOP_CONSOLE_GATEWAY_API": endpoints["gateway_api"],
    }
    if endpoints.get("traces_api"):
        env["EDGELOOP_CONSOLE_TRACES_API"] = endpoints["traces_api"]
    if endpoints.get("nats_monitor_url"):
        env["EDGELOOP_CONSOLE_NATS_MONITOR_URL"] = endpoints["nats_monitor_url"]
    return env


def running_pid(root: Path | None = None) -> int | None:
    """The pid of the ``make up`` that runs with state in ``root``, if one does.

    A pid file whose process is gone, or is some other program by now, does not count.
    """
    pid_file = (root or state_dir()) / "up.pid"
    try:
        pid = int(pid_file.read_text())
        proc = psutil.Process(pid)
        alive = proc.status() != psutil.STATUS_ZOMBIE
        ours = any(arg.endswith("edgeloop.devstack.up") for arg in proc.cmdline())
    except (FileNotFoundError, ValueError, psutil.Error):
        return None
    return pid if alive and ours else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


@dataclass
class ServiceProcess:
    """One service: ``python -m <module>`` in its own process group."""

    name: str
    module: str
    http_port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def health_url(self) -> str:
        """``/healthz`` on the service's HTTP port."""
        return f"http://127.0.0.1:{self.http_port}/healthz"

    @property
    def ready_url(self) -> str:
        """``/readyz`` on the service's HTTP port."""
        return f"http://127.0.0.1:{self.http_port}/readyz"

    @property
    def pid(self) -> int | None:
        """The process id of its latest start."""
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Start the process, its output appended to ``log_path``."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # its own group: Ctrl-C reaches the supervisor, which stops services
                # before the servers they use; a stop also reaches what it spawned
                start_new_session=True,
            )

    def poll(self) -> int | None:
        """Its exit status once it exited (reaped with its process group), else None."""
        return reap_group(self.proc) if self.proc else None

    def terminate(self) -> None:
        """SIGTERM to its process group (it may still be running on return)."""
        if self.running and self.proc is not None:
            signal_group(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL its process group and reap it."""
        if self.running and self.proc is not None:
            signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(10)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.poll() is None


class Process(Protocol):
    """What the supervisor needs of a process: a service or an embedded server."""

    name: str
    log_path: Path

    @property
    def pid(self) -> int | None:
        """Its process id."""

    def start(self) -> object:
        """Start it (a server: and wait until it answers)."""

    def poll(self) -> int | None:
        """Its exit status once it exited and was reaped; None while it runs."""


P = TypeVar("P", bound=Process)


@dataclass
class Supervised(Generic[P]):
    """A process ``make up`` keeps running.

    When it exits it is reaped and started again after a back-off of 1 s doubling to
    30 s, which starts over once it ran ``STABLE_AFTER`` seconds. ``restarts`` counts
    every start after the first; ``last_exit`` is the status of its latest exit.
    """

    process: P
    restarts: int = 0
    last_exit: int | None = None
    crashes: int = 0  # in a row: the back-off's exponent
    next_start: float = 0.0  # while it waits to be started again
    started_at: float = field(default_factory=time.monotonic)

    @property
    def state(self) -> str:
        """``running``, or ``restarting`` while it waits out its back-off."""
        return "restarting" if self.next_start else "running"

    def check(self) -> bool:
        """Note an exit, or start it again once its back-off is over.

        Returns:
            Whether its state changed (it exited, or was started again): ``stack.json``
            is then out of date.
        """
        now = time.monotonic()
        if not self.next_start:
            code = self.process.poll()
            if code is None:
                if now - self.started_at > STABLE_AFTER:
                    self.crashes = 0
                return False
            self._exited(code, now)
            return True
        if now < self.next_start:
            return False
        self.restarts += 1
        try:
            self.process.start()
        except (RuntimeError, OSError) as exc:  # it did not come up: back off again
            print(f"  ! {self.process.name} did not start: {str(exc).splitlines()[0]}", flush=True)
            self._exited(self.process.poll(), time.monotonic())
            return True
        self.next_start = 0.0
        self.started_at = time.monotonic()
        print(f"  + {self.process.name} restarted (pid {self.process.pid})", flush=True)
        return True

    def _exited(self, code: int | None, now: float) -> None:
        delay = min(2.0**self.crashes, MAX_BACKOFF)
        self.crashes += 1
        self.last_exit = code
        self.next_start = now + delay
        print(
            f"  ! {self.process.name} exited with {code}; restart in {delay:.0f}s "
            f"(log: {self.process.log_path})",
            flush=True,
        )

    def as_dict(self) -> dict[str, Any]:
        """Its entry in ``stack.json``."""
        return {
            "pid": self.process.pid,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "log": str(self.process.log_path),
        }


def stop_services(services: list[ServiceProcess], timeout: float = SERVICE_STOP_TIMEOUT) -> None:
    """SIGTERM every service at once, wait up to ``timeout`` s for all, SIGKILL the rest."""
    for svc in services:
        svc.terminate()
    deadline = time.monotonic() + timeout
    while any(svc.running for svc in services) and time.monotonic() < deadline:
        time.sleep(0.1)
    for svc in services:
        svc.kill()


class _Signals:
    """SIGINT/SIGTERM set a flag the supervisor checks between steps."""

    def __init__(self) -> None:
        self.stopping = False
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True


def _stack_info(
    endpoints: dict[str, Any],
    services: list[Supervised[ServiceProcess]],
    infrastructure: list[Supervised[ManagedProcess]],
    root: Path,
) -> dict[str, Any]:
    return {
        **endpoints,
        "state_dir": str(root),
        "pid": os.getpid(),
        "infrastructure": {
            s.process.name: s.as_dict() | s.process.status_urls() for s in infrastructure
        },
        "services": {
            s.process.name: {
                "module": s.process.module,
                "health_url": s.process.health_url,
                "ready_url": s.process.ready_url,
                **s.as_dict(),
            }
            for s in services
        },
    }


def _print_endpoints(endpoints: dict[str, Any], services: list[ServiceProcess], root: Path) -> None:
    lines = [
        "edgeloop is up:",
        f"  NATS (JetStream)  {redact(endpoints['nats_url'])}   (a user per service)",
        f"  PostgreSQL        {endpoints['database_url']}",
        f"  OCI registry      {endpoints['registry_url']}",
    ]
    lines += [f"  {s.name:17} {s.health_url}   (log {s.log_path})" for s in services]
    if not services:
        lines.append("  (no services yet)")
    lines += [
        f"  registry API      {endpoints['registry_api']}/docs",
        f"  gateway API       {endpoints['gateway_api']}/docs   (devices: edgeloop devices list)",
        f"  gateway (gRPC)    {endpoints['gateway_address']}   (mTLS; edgeloop devices enroll ID)",
        f"  deployer API      {endpoints['deployer_api']}/docs   (edgeloop rollouts list)",
        f"  monitor API       {endpoints['monitor_api']}/docs   (alarms, drift windows, rules)",
        f"  notifier API      {endpoints['notifier_api']}/docs   (edgeloop notify add|list)",
        f"  traces            {endpoints.get('traces_api', '-')}   (edgeloop trace NAME@VERSION)",
        f"  Prometheus        {endpoints.get('prometheus_url', '-')}   (targets, alerts: /alerts)",
        f"  API token         export EDGELOOP_API_TOKEN=$(cat {root / 'api-token'})",
        f"  console           {endpoints['console']}   (sign in with the API token above)",
        f"  state             {root}  (stack.json, logs/)",
        "check it:   .venv/bin/edgeloop status      stop it:   Ctrl-C or `make down`",
    ]
    print("\n".join(lines), flush=True)


def main() -> None:
    """Run the stack until SIGINT/SIGTERM."""
    root = state_dir()
    root.mkdir(parents=True, exist_ok=True)
    pid_file = root / "up.pid"
    other = running_pid(root)
    if other is not None:
        sys.exit(f"edgeloop is already running (pid {other}); stop it with `make down`")
    signals = _Signals()
    pid_file.write_text(f"{os.getpid()}\n")

    servers: list[ManagedProcess] = []
    services: list[ServiceProcess] = []
    try:
        nats_url = os.environ.get("EDGELOOP_NATS_URL")
        nats_monitors = os.environ.get("EDGELOOP_NATS_METRICS_URLS", "")
        endpoints: dict[str, Any] = {}
        # Each service connects to the embedded server as its own user, allowed only its
        # subjects; the tools (CLI, examples) get the admin's URL from stack.json.
        auth: NatsAuth | None = None
        replicas: dict[str, str] = {}
        if not nats_url:
            auth = nats_users(root)
            nodes = _nats_nodes(root, auth)
            servers.extend(nodes)
            nats_url = ",".join(node.url for node in nodes)
            endpoints["nats_monitor_url"] = nodes[0].monitor_url
            nats_monitors = ",".join(node.monitor_url for node in nodes)
            if len(nodes) > 1:
                replicas["EDGELOOP_NATS_REPLICAS"] = str(min(len(nodes), 3))
            # the topology is declared once, by the one user allowed to
            auth.bootstrap(nats_url, replicas=min(len(nodes), 3))
        if signals.stopping:
            return
        database_url = os.environ.get("EDGELOOP_DATABASE_URL")
        if not database_url:
            pg = Postgres(root / "pg", _port("EDGELOOP_PG_PORT", PG_PORT))
            servers.append(pg.start())
            database_url = pg.create_database(DATABASE)
        # each service connects as its own role, given only its schema (the bootstrap)
        own_database = database_env(root, database_url)
        if signals.stopping:
            return
        registry_url = os.environ.get("EDGELOOP_OCI_REGISTRY_URL")
        if not registry_url:
            reg = OciRegistry(
                root / "registry", _port("EDGELOOP_OCI_REGISTRY_PORT", OCI_REGISTRY_PORT)
            )
            servers.append(reg.start())
            registry_url = reg.url
        if signals.stopping:
            return

        # the operator's token (admin): accepted by every API, held by no service; each
        # service calls the APIs with its own (service:<name>, installed by the bootstrap)
        api_token = generated_secret(root / "api-token")
        caller = service_tokens(root)
        private_pem, public_pem = signing_keys(root)
        registry_api = f"http://127.0.0.1:{_port('EDGELOOP_REGISTRY_API_PORT', REGISTRY_API_PORT)}"
        gateway_api = f"http://127.0.0.1:{_port('EDGELOOP_GATEWAY_API_PORT', GATEWAY_API_PORT)}"
        gateway_address = f"127.0.0.1:{_port('EDGELOOP_GATEWAY_GRPC_PORT', GATEWAY_GRPC_PORT)}"
        deployer_api = f"http://127.0.0.1:{_port('EDGELOOP_DEPLOYER_API_PORT', DEPLOYER_API_PORT)}"
        monitor_api = f"http://127.0.0.1:{_port('EDGELOOP_MONITOR_API_PORT', MONITOR_API_PORT)}"
        notifier_api = f"http://127.0.0.1:{_port('EDGELOOP_NOTIFIER_API_PORT', NOTIFIER_API_PORT)}"
        console_port = _port("EDGELOOP_CONSOLE_PORT", CONSOLE_PORT)
        endpoints |= {
            # tools take one URL (the others are discovered from the server's INFO)
            "nats_url": auth.url(nats_url.split(",")[0]) if auth else nats_url,
            "database_url": database_url,
            "registry_url": registry_url,
            "registry_api": registry_api,
            "gateway_api": gateway_api,
            "gateway_address": gateway_address,
            "deployer_api": deployer_api,
            "monitor_api": monitor_api,
            "notifier_api": notifier_api,
            "console": f"http://127.0.0.1:{console_port}",
            "public_key": str(root / "signing-key.pub"),
        }
        external_otlp = os.environ.get("EDGELOOP_OTLP_ENDPOINT")
        otlp_port = _port("EDGELOOP_TRACES_OTLP_PORT", TRACES_OTLP_PORT)
        common = {
            "EDGELOOP_NATS_URL": nats_url,
            "EDGELOOP_DATABASE_URL": database_url,
            "EDGELOOP_OCI_REGISTRY_URL": registry_url,
            "EDGELOOP_OTLP_ENDPOINT": external_otlp or f"http://127.0.0.1:{otlp_port}",
            **replicas,
        }
        if os.environ.get("EDGELOOP_TRACES_API"):
            endpoints["traces_api"] = os.environ["EDGELOOP_TRACES_API"]
        # Each secret goes only to the service that uses it.
        own: dict[str, dict[str, str]] = {
            "registry": {
                "EDGELOOP_REGISTRY_API_TOKENS": api_token,
                "EDGELOOP_REGISTRY_API_PORT": registry_api.rsplit(":", 1)[1],
            },
            "builder": {"EDGELOOP_BUILDER_SIGNING_KEY": private_pem},
            "validator": {
                "EDGELOOP_VALIDATOR_PUBLIC_KEY": public_pem,
                "EDGELOOP_VALIDATOR_REGISTRY_API": registry_api,
                "EDGELOOP_VALIDATOR_REGISTRY_TOKEN": caller["validator"],
            },
            "deployer": {
                "EDGELOOP_DEPLOYER_API_TOKENS": api_token,
                "EDGELOOP_DEPLOYER_API_PORT": deployer_api.rsplit(":", 1)[1],
                "EDGELOOP_DEPLOYER_REGISTRY_API": registry_api,
                "EDGELOOP_DEPLOYER_REGISTRY_TOKEN": caller["deployer"],
                "EDGELOOP_DEPLOYER_GATEWAY_API": gateway_api,
                "EDGELOOP_DEPLOYER_GATEWAY_TOKEN": caller["deployer"],
                "EDGELOOP_DEPLOYER_MONITOR_API": monitor_api,
            },
            "monitor": {
                "EDGELOOP_MONITOR_API_TOKENS": api_token,
                "EDGELOOP_MONITOR_API_PORT": monitor_api.rsplit(":", 1)[1],
                "EDGELOOP_MONITOR_REGISTRY_API": registry_api,
                "EDGELOOP_MONITOR_REGISTRY_TOKEN": caller["monitor"],
                # a development stack: windows short enough to watch drift come and go
                "EDGELOOP_MONITOR_WINDOW_SECONDS": os.environ.get(
                    "EDGELOOP_MONITOR_WINDOW_SECONDS", "10"
                ),
                "EDGELOOP_MONITOR_GRACE_SECONDS": os.environ.get(
                    "EDGELOOP_MONITOR_GRACE_SECONDS", "2"
                ),
            },
            "notifier": {
                "EDGELOOP_NOTIFIER_API_TOKENS": api_token,
                "EDGELOOP_NOTIFIER_API_PORT": notifier_api.rsplit(":", 1)[1],
            },
            "gateway": {
                "EDGELOOP_GATEWAY_API_TOKENS": api_token,
                "EDGELOOP_GATEWAY_API_PORT": gateway_api.rsplit(":", 1)[1],
                "EDGELOOP_GATEWAY_GRPC_PORT": gateway_address.rsplit(":", 1)[1],
                "EDGELOOP_GATEWAY_SIGNING_PUBLIC_KEY": str(root / "signing-key.pub"),
            },
            # a small simulated fleet, enrolled through the gateway's API (its own token:
            # role operator)
            "fleet": {
                "EDGELOOP_API_TOKEN": caller["fleet"],
                "EDGELOOP_FLEET_GATEWAY_API": gateway_api,
                "EDGELOOP_FLEET_DEVICES": os.environ.get(
                    "EDGELOOP_FLEET_DEVICES", str(FLEET_DEVICES)
                ),
                "EDGELOOP_FLEET_STATE_DIR": str(root / "fleet"),
                "EDGELOOP_FLEET_LABELS": os.environ.get("EDGELOOP_FLEET_LABELS", "fleet=sim"),
            },
            "nats_metrics": {"EDGELOOP_NATS_METRICS_URLS": nats_monitors},
        }
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        replicas_of: list[tuple[ServiceProcess, ServiceProcess]] = []
        port = _port("EDGELOOP_FIRST_HTTP_PORT", FIRST_HTTP_PORT)
        for name, module in SERVICES:
            if importlib.util.find_spec(module) is None:
                continue
            if name == "traces":
                if external_otlp:
                    continue
                endpoints.setdefault("traces_api", f"http://127.0.0.1:{port}")
            if name == "nats_metrics" and not nats_monitors:
                continue  # an external NATS whose monitoring nobody named
            if name == "console":  # its health is on its pages' port
                env = _console_env(endpoints, console_port)
                services.append(
                    ServiceProcess(name, module, console_port, env, logs / "console.log")
                )
                continue
            env = {**common, **own.get(name, {}), f"EDGELOOP_{name.upper()}_HTTP_PORT": str(port)}
            if auth is not None and name in SERVICE_ACCESS:
                env |= auth.service_env(name)
            env |= own_database.get(name, {})
            services.append(ServiceProcess(name, module, port, env, logs / f"{name}.log"))
            port += 1
            if name in SERVICE_ACCESS:  # platform services (not the fleet, the collector)
                first = services[-1]
                for k in range(2, _count("EDGELOOP_SERVICE_REPLICAS") + 1):
                    extra = {**env, **_replica_env(name, k, own.get(name, {}), gateway_address)}
                    extra[f"EDGELOOP_{name.upper()}_HTTP_PORT"] = str(port)
                    log = logs / f"{name}-{k}.log"
                    replicas_of.append(
                        (first, ServiceProcess(f"{name}-{k}", module, port, extra, log))
                    )
                    port += 1
        prometheus = _prometheus(root, services + [replica for _, replica in replicas_of])
        if prometheus is not None:
            servers.append(prometheus)
            endpoints["prometheus_url"] = prometheus.url
            for svc in services:  # the console links to it
                if svc.name == "console":
                    svc.env["EDGELOOP_CONSOLE_PROMETHEUS_URL"] = prometheus.url
        for svc in services:
            svc.start()

        infrastructure = [Supervised(server) for server in servers]
        supervised = [Supervised(svc) for svc in services]
        stack_file = root / "stack.json"
        _write_json(stack_file, _stack_info(endpoints, supervised, infrastructure, root))
        _print_endpoints(endpoints, services, root)
        while not signals.stopping:
            # every one, not up to the first that changed; a dead server does not
            # restart the services: they reconnect to it on their own
            changed = [s.check() for s in infrastructure] + [s.check() for s in supervised]
            # a further replica starts once the first is ready: the first creates what is
            # created once (migrations, the gateway's CA)
            if replicas_of and http_ok(replicas_of[0][0].ready_url):
                _, replica = replicas_of.pop(0)
                replica.start()
                services.append(replica)
                supervised.append(Supervised(replica))
                changed.append(True)
            if any(changed):
                _write_json(stack_file, _stack_info(endpoints, supervised, infrastructure, root))
            time.sleep(0.2)
    finally:
        print("stopping edgeloop …", flush=True)
        stop_services(services)
        for server in reversed(servers):
            server.stop()
        (root / "stack.json").unlink(missing_ok=True)
        pid_file.unlink(missing_ok=True)
        print("stopped.", flush=True)


if __name__ == "__main__":
    main()
