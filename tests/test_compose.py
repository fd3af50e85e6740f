"""docker-compose.yml: valid for Compose, complete (infrastructure, every service built
from its Dockerfile, the gateway and a fleet), healthchecked, secrets as files only, and
a Prometheus scrape target for every service."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bcrypt
import pytest
import yaml

from edgeloop.devstack.keys import compose_secrets
from edgeloop.kit.api import token_hash
from edgeloop.kit.settings import MIN_SECRET_LENGTH
from edgeloop.kit.tokens import SERVICE_ROLES, parse_service_token_hashes

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = {
    "registry": "edgeloop.registry",
    "builder": "edgeloop.builder",
    "validator": "edgeloop.validator",
    "deployer": "edgeloop.deployer",
    "monitor": "edgeloop.monitor",
    "gateway": "edgeloop.gateway",
    "notifier": "edgeloop.notifier",
}
INFRA = ("nats", "postgres", "oci-registry", "jaeger", "prometheus")
#: The services with an HTTP API (they accept the admin token).
API_SERVICES = ("registry", "deployer", "monitor", "gateway", "notifier")
#: what the console's pages show (it does not show the notifier's subscriptions yet)
CONSOLE_APIS = ("registry", "deployer", "monitor", "gateway")
SECRET_NAMES = re.compile(r"TOKEN|KEY$|SECRET|PASSWORD|DATABASE_URL")


def _compose() -> list[str]:
    if (
        shutil.which("docker")
        and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed (make system-deps)")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The file as Compose resolves it (anchors merged, paths absolute)."""
    done = subprocess.run(
        [*_compose(), "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(yaml.safe_load(done.stdout))


def test_compose_config_passes_and_has_every_part(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {
        *PLATFORM,
        *INFRA,
        "fleet",
        "nats-metrics",
        "console",
        "db-init",
        "bus-init",
    }
    assert services["nats"]["command"] == ["-c", "/run/secrets/nats.conf"]
    assert services["nats"]["secrets"][0]["target"] == "nats.conf"


def test_the_topology_is_declared_once_by_the_bootstrap_user(
    config: dict[str, Any], tmp_path: Path
) -> None:
    """Services' own NATS users may only look at the streams (issue 16): a one-shot
    ``bus-init`` declares them as the bootstrap user, and every service waits for it."""
    init = config["services"]["bus-init"]
    assert init["command"] == ["python", "-m", "edgeloop.kit.bootstrap"]
    assert init["environment"]["EDGELOOP_BOOTSTRAP_NATS_USER"] == "bootstrap"
    (secret,) = init["secrets"]
    assert secret["target"] == "EDGELOOP_BOOTSTRAP_NATS_PASSWORD"
    compose_secrets(tmp_path)
    password = (tmp_path / "compose" / "nats-bootstrap-password").read_text().strip()
    server = (tmp_path / "compose" / "nats.conf").read_text()
    entry = server[server.index('"user": "bootstrap"') :]
    digest = entry.split('"password": "', 1)[1].split('"', 1)[0]
    assert bcrypt.checkpw(password.encode(), digest.encode())
    for name in PLATFORM:
        wait = config["services"][name]["depends_on"]["bus-init"]
        assert wait["condition"] == "service_completed_successfully", name


def test_every_service_connects_to_nats_as_its_own_user(
    config: dict[str, Any], tmp_path: Path
) -> None:
    compose_secrets(tmp_path)
    server = (tmp_path / "compose" / "nats.conf").read_text()
    assert "jetstream" in server
    assert 'store_dir: "/data"' in server
    for name in PLATFORM:
        svc = config["services"][name]
        assert svc["environment"][f"EDGELOOP_{name.upper()}_NATS_USER"] == name
        (secret,) = [
            s for s in svc["secrets"] if s.get("target") == f"EDGELOOP_{name.upper()}_NATS_PASSWORD"
        ]
        source = Path(config["secrets"][secret["source"]]["file"]).name
        password = (tmp_path / "compose" / source).read_text().strip()
        # the server holds a hash of that password, for that user, with its rights only
        entry = server[server.index(f'"user": "{name}"') :]
        digest = entry.split('"password": "', 1)[1].split('"', 1)[0]
        assert bcrypt.checkpw(password.encode(), digest.encode()), name
        assert password not in server
        assert entry.index('"permissions"') < entry.index("}\n  }")


def test_every_service_connects_to_postgresql_as_its_own_role(config: dict[str, Any]) -> None:
    """db-init (the bootstrap, as the admin) creates each service's role; the services wait
    for it, connect as their role and get the audit key; only db-init has the admin DSN."""
    services = config["services"]
    init = services["db-init"]
    assert init["command"] == ["python", "-m", "edgeloop.kit.dbroles"]
    init_targets = {s["target"] for s in init["secrets"]}
    assert "EDGELOOP_DATABASE_URL" in init_targets
    for name in PLATFORM:
        svc = services[name]
        assert svc["depends_on"]["db-init"]["condition"] == "service_completed_successfully"
        assert svc["environment"][f"EDGELOOP_{name.upper()}_DATABASE_USER"] == f"edgeloop_{name}"
        password = f"EDGELOOP_{name.upper()}_DATABASE_PASSWORD"
        (own,) = [s for s in svc["secrets"] if s.get("target") == password]
        (same,) = [s for s in init["secrets"] if s.get("target") == password]
        assert own["source"] == same["source"], name
        targets = {s.get("target") or s["source"] for s in svc["secrets"]}
        assert "EDGELOOP_AUDIT_KEY" in targets, name
        assert "EDGELOOP_DATABASE_URL" not in targets, name  # not the admin's DSN
        assert not {t for t in targets if t.endswith("_DATABASE_PASSWORD")} - {password}


def test_every_service_is_built_from_its_dockerfile_in_the_workspace(
    config: dict[str, Any],
) -> None:
    for name, module in [
        *PLATFORM.items(),
        ("fleet", "edgeloop.edge.fleet"),
        ("console", "edgeloop.console"),
    ]:
        build = config["services"][name]["build"]
        assert Path(build["context"]) == ROOT
        dockerfile = ROOT / build["dockerfile"]
        text = dockerfile.read_text()
        assert f'"-m", "{module}"' in text, f"{dockerfile} does not run {module}"
        assert importlib.util.find_spec(module) is not None
        assert "uv sync --locked" in text
        assert re.search(r"^USER 65534", text, re.M), f"{dockerfile} runs as root"


def test_services_wait_for_healthy_dependencies_and_have_healthchecks(
    config: dict[str, Any],
) -> None:
    services = config["services"]
    for name in [*PLATFORM, "fleet", "console", "nats", "postgres", "oci-registry", "prometheus"]:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in PLATFORM:
        deps = services[name]["depends_on"]
        for infra in ("nats", "postgres", "oci-registry"):
            assert deps[infra]["condition"] == "service_healthy", (name, infra)
    assert services["fleet"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert services["deployer"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    for api in CONSOLE_APIS:  # the console opens once the APIs it shows answer
        assert services["console"]["depends_on"][api]["condition"] == "service_healthy"
    assert not services["console"].get("secrets"), "the console holds no secret"


def test_secrets_are_files_never_environment_values(config: dict[str, Any]) -> None:
    for name, svc in config["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if str(value).startswith("/run/secrets/"):
                continue  # the path of a secret's file, not the secret
            if key.endswith("DATABASE_URL") and urlsplit(str(value)).password is None:
                continue  # where the database is; each service's role has its password
            assert not SECRET_NAMES.search(key), f"{name} gets {key} from the environment"
    for secret in config["secrets"].values():
        assert Path(secret["file"]).parent == ROOT / ".edgeloop" / "compose"
    assert "POSTGRES_PASSWORD" not in config["services"]["postgres"]["environment"]


def test_make_keys_writes_every_secret_compose_mounts(
    config: dict[str, Any], tmp_path: Path
) -> None:
    written = compose_secrets(tmp_path)
    names = {Path(secret["file"]).name for secret in config["secrets"].values()}
    assert {p.name for p in written} == names
    assert (tmp_path / "compose").stat().st_mode & 0o777 == 0o700
    url = (tmp_path / "compose" / "database-url").read_text()
    assert (tmp_path / "db-password").read_text().strip() in url


def test_prometheus_scrapes_every_service(config: dict[str, Any]) -> None:
    mount = config["services"]["prometheus"]["volumes"][0]
    source = Path(mount["source"] if isinstance(mount, dict) else mount.split(":")[0])
    # the directory `make up` takes its alert rules from, at the image's configuration path
    assert source == ROOT / "deploy" / "prometheus"
    assert (
        mount["target"] if isinstance(mount, dict) else mount.split(":")[1]
    ) == "/etc/prometheus"
    scrape = yaml.safe_load((source / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["alerts.yml"]
    targets = {
        t
        for job in scrape["scrape_configs"]
        for group in job["static_configs"]
        for t in group["targets"]
    }
    for name in [*PLATFORM, "fleet"]:
        env = config["services"][name]["environment"]
        port = next(v for k, v in env.items() if k.endswith("_HTTP_PORT"))
        assert f"{name}:{port}" in targets, f"{name} is not scraped"
    # NATS's figures, through the exporter that reads its monitoring endpoint
    exporter = config["services"]["nats-metrics"]
    assert exporter["command"] == ["python", "-m", "edgeloop.kit.natsmetrics"]
    assert exporter["environment"]["EDGELOOP_NATS_METRICS_URLS"] == "http://nats:8222"
    assert f"nats-metrics:{exporter['environment']['EDGELOOP_NATS_METRICS_HTTP_PORT']}" in targets


#: The APIs (the services that accept the admin token) and where they take it.
ADMIN_TOKEN_AT = {name: f"EDGELOOP_{name.upper()}_API_TOKENS" for name in API_SERVICES}
#: Each calling service's own token and the settings it fills.
OWN_TOKEN_AT = {
    "validator": {"EDGELOOP_VALIDATOR_REGISTRY_TOKEN"},
    "deployer": {"EDGELOOP_DEPLOYER_REGISTRY_TOKEN", "EDGELOOP_DEPLOYER_GATEWAY_TOKEN"},
    "monitor": {"EDGELOOP_MONITOR_REGISTRY_TOKEN"},
    "fleet": {"api-token"},  # where the fleet looks for its token
}


def _mounts(svc: dict[str, Any]) -> dict[str, set[str]]:
    """Per secret a service mounts, the targets it mounts it as."""
    out: dict[str, set[str]] = {}
    for secret in svc.get("secrets") or []:
        out.setdefault(secret["source"], set()).add(secret.get("target") or secret["source"])
    return out


def test_each_service_calls_with_its_own_token_and_only_apis_hold_the_admin_one(
    config: dict[str, Any], tmp_path: Path
) -> None:
    """Issue 16: no service calls an API with the admin token. Each calling service mounts
    a token of its own (and no other's), the admin token is mounted only where an API
    accepts it, and db-init gets the services' token hashes, never a token."""
    compose_secrets(tmp_path)
    files = tmp_path / "compose"
    source = {name: Path(s["file"]).name for name, s in config["secrets"].items()}
    token_secrets = {n for n, f in source.items() if f == "api-token" or "token" in f}
    admin = next(n for n, f in source.items() if f == "api-token")
    tokens = {n: (files / source[n]).read_text().strip() for n in token_secrets}
    holders: dict[str, set[str]] = {}
    for name, svc in config["services"].items():
        for secret, targets in _mounts(svc).items():
            if secret in token_secrets:
                holders.setdefault(secret, set()).add(name)
                if secret == admin:
                    assert targets == {ADMIN_TOKEN_AT[name]}, name
                elif name != "db-init":
                    assert targets == OWN_TOKEN_AT[name], name
                    assert secret == f"service_token_{name}", (name, secret)
    assert holders.pop(admin) == set(API_SERVICES)
    assert holders.pop("service_token_hashes") == {"db-init"}
    assert holders == {f"service_token_{name}": {name} for name in SERVICE_ROLES}
    # every token a service calls with is its own
    for name, svc in config["services"].items():
        for secret, targets in _mounts(svc).items():
            if any(t.endswith("_TOKEN") or t == "api-token" for t in targets):
                assert secret == f"service_token_{name}", (name, secret)

    # distinct, long enough; db-init's file holds their SHA-256 and no token
    own = {n: tokens[f"service_token_{n}"] for n in SERVICE_ROLES}
    assert len({*own.values(), tokens[admin]}) == len(own) + 1
    assert min(len(t) for t in tokens.values() if t) >= MIN_SECRET_LENGTH
    hashes = tokens["service_token_hashes"]
    assert {(t.service, t.hash) for t in parse_service_token_hashes(hashes)} == {
        (n, token_hash(t)) for n, t in own.items()
    }
    assert not [t for t in [*own.values(), tokens[admin]] if t in hashes]
