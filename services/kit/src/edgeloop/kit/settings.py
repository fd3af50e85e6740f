"""Settings base every service builds on (pydantic-settings, one env prefix per service).

Infrastructure URLs are shared by every service and read from ``EDGELOOP_NATS_URL``,
``EDGELOOP_DATABASE_URL`` …; a service may override one for itself with its own prefix
(``EDGELOOP_BUILDER_NATS_URL``). Secrets have no default, and a placeholder secret is
refused at start (the full-stack-fastapi-template rule), and so is one shorter than
:data:`MIN_SECRET_LENGTH` — each entry of a comma-separated secret (``api_tokens``) on its
own. A refusal names the setting and the rule, never the value (errors hide the input).
Any setting can also come from a file named like its variable in ``/run/secrets``
(Docker and Kubernetes secrets: ``/run/secrets/EDGELOOP_BUILDER_SIGNING_KEY``), so
secrets need not be in the environment; the environment wins where both are set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgeloop.contracts.stackfile import with_credentials

PLACEHOLDER_SECRETS = frozenset({"changeme", "changethis", "secret", "password", "placeholder"})

#: The shortest secret a service accepts (an API token, a password, a key; each entry of
#: a comma-separated list): 24 characters, 144 random bits as ``secrets.token_urlsafe(18)``
#: makes them (``make up`` and ``make keys`` generate 32).
MIN_SECRET_LENGTH = 24


@dataclass(frozen=True)
class SecretRule:
    """How a secret setting is checked at start (``Annotated`` metadata of the field)."""

    min_length: int = MIN_SECRET_LENGTH
    """Its shortest accepted length (each entry's, for a list)."""
    comma_list: bool = False
    """A comma-separated list of secrets (API tokens): each entry is checked alone."""


SecretList = Annotated[SecretStr, SecretRule(comma_list=True)]
"""A secret setting holding comma-separated secrets, each checked on its own."""

#: Fields every service shares, readable from the common ``EDGELOOP_`` prefix too.
SHARED_FIELDS = (
    "nats_url",
    "nats_replicas",
    "database_url",
    "audit_key",
    "oci_registry_url",
    "otlp_endpoint",
    "trace_sql",
    "log_level",
)


#: Where container platforms mount secret files.
SECRETS_DIR = "/run/secrets"


class ServiceSettings(BaseSettings):
    """Base settings of an edgeloop service.

    Subclass it per service with ``model_config = SettingsConfigDict(env_prefix=...)``.
    """

    model_config = SettingsConfigDict(
        env_prefix="EDGELOOP_",
        extra="ignore",
        # a refusal must not print what was refused (a secret, a DSN with a password)
        hide_input_in_errors=True,
        secrets_dir=SECRETS_DIR if os.path.isdir(SECRETS_DIR) else None,
    )

    service_name: ClassVar[str] = "service"

    nats_url: str = "nats://127.0.0.1:14222"
    """NATS server URL(s), comma separated for a cluster."""
    nats_replicas: int = Field(default=1, ge=1, le=5)
    """Replicas of every stream and KV bucket the service declares (1 on a lone server,
    3 on a 3-node cluster: a quorum then survives one node down)."""
    nats_user: str | None = None
    """The NATS user this service connects as: its own, allowed only its subjects
    (``edgeloop.contracts.access``). Unset: no credentials (a server without users)."""
    nats_password: SecretStr | None = None
    """That user's password."""
    database_url: str = "postgresql://postgres@127.0.0.1:15432/edgeloop"
    """PostgreSQL DSN; the service keeps its tables in its own schema."""
    database_user: str | None = None
    """The PostgreSQL role this service connects as, in place of the DSN's user: its own,
    given only its schema by the bootstrap (``edgeloop.kit.dbroles``). Unset: the DSN's
    user (a superuser works as before roles existed)."""
    database_password: SecretStr | None = None
    """That role's password."""
    audit_key: Annotated[SecretStr | None, SecretRule(min_length=32)] = None
    """The key of the audit chain's HMAC (``EDGELOOP_AUDIT_KEY``, the same for every
    service, held outside the database): each audit record this service writes carries
    one, and the registry's ``audit verify`` checks them. Unset: no MAC (hashes only)."""
    oci_registry_url: str = "http://127.0.0.1:15000"
    """Base URL of the OCI (Distribution) registry that holds every byte."""
    otlp_endpoint: str | None = None
    """OTLP/gRPC endpoint for traces (e.g. http://127.0.0.1:4317); unset: no export."""
    trace_sql: bool = False
    """Trace every PostgreSQL query too (a span each; for debugging)."""
    log_level: str = "INFO"
    """Python logging level."""
    http_host: str = "127.0.0.1"
    """Address of the health/metrics HTTP endpoint."""
    http_port: int = 0
    """Port of the health/metrics endpoint (0: any free port)."""
    db_pool_min: int = 1
    """Minimum PostgreSQL connections in the pool."""
    db_pool_max: int = 10
    """Maximum PostgreSQL connections in the pool."""
    relay_batch: int = 256
    """Outbox rows the relay publishes per round trip."""
    relay_poll_seconds: float = 1.0
    """How often the relay looks for unsent rows when no notification arrives."""
    graceful_timeout: float = 15.0
    """Seconds to let in-flight messages finish on SIGTERM."""
    retention_seconds: float = 7 * 86400.0
    """Inbox rows and sent outbox rows older than this are deleted (0: never). At least
    an hour: an inbox row must outlive every copy of its event that can still arrive."""
    prune_every_seconds: float = 3600.0
    """How often the retention sweep runs."""
    loop_max_failures: int = 5
    """A supervised loop that fails this many times in a row (not counting outages of
    PostgreSQL or NATS) is dead: ``/readyz`` fails."""
    loop_stable_seconds: float = 30.0
    """A loop that ran this long is healthy again (its failure count starts over)."""
    loop_exit_seconds: float = 60.0
    """A loop dead this long makes the process exit (status 70), so its supervisor
    (``make up``, Compose, Kubernetes) starts it afresh."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Let shared fields also be read from the common ``EDGELOOP_`` prefix."""
        super().__pydantic_init_subclass__(**kwargs)
        prefix = str(cls.model_config.get("env_prefix", "EDGELOOP_"))
        changed = False
        for name in SHARED_FIELDS:
            info: FieldInfo | None = cls.model_fields.get(name)
            if info is None or prefix == "EDGELOOP_":
                continue
            info.validation_alias = AliasChoices(
                f"{prefix}{name}".upper(), f"EDGELOOP_{name}".upper(), name
            )
            changed = True
        if changed:
            cls.model_config["populate_by_name"] = True
            cls.model_rebuild(force=True)

    def database_dsn(self) -> str:
        """The DSN the service connects with: ``database_url`` as ``database_user``."""
        if not self.database_user:
            return self.database_url
        password = self.database_password.get_secret_value() if self.database_password else None
        return with_credentials(self.database_url, self.database_user, password)

    @model_validator(mode="after")
    def _retention_long_enough(self) -> ServiceSettings:
        from edgeloop.kit.retention import MIN_RETENTION_SECONDS

        if 0 < self.retention_seconds < MIN_RETENTION_SECONDS:
            raise ValueError(
                f"retention_seconds={self.retention_seconds:.0f} is shorter than "
                f"{MIN_RETENTION_SECONDS:.0f} s: a pruned inbox row could let a late copy of "
                "its event through; set at least that, or 0 to keep every row"
            )
        return self

    @model_validator(mode="after")
    def _refuse_weak_secrets(self) -> ServiceSettings:
        prefix = str(type(self).model_config.get("env_prefix", "EDGELOOP_"))
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if not isinstance(value, SecretStr):
                continue
            rule = next((m for m in info.metadata if isinstance(m, SecretRule)), SecretRule())
            # a shared secret (the audit key) is usually set once for every service
            setting = f"{'EDGELOOP_' if name in SHARED_FIELDS else prefix}{name}".upper()
            problem = weak_secret(value.get_secret_value(), rule)
            if problem:
                raise ValueError(f"{setting} ({name}) {problem}")
        return self


class TopologySettings(BaseSettings):
    """Limits of the platform's streams (``EDGELOOP_…``, the shared prefix only).

    Every service declares the topology at start and brings the streams to its idea of
    it, so these must be the same for all of them: they have no per-service prefix.
    """

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_", extra="ignore")

    dlq_max_bytes: int = 1 << 30
    """Most bytes the DLQ stream keeps; beyond it the oldest dead letters are dropped
    (counted by the registry: ``edgeloop_dlq_dropped_total``)."""
    dlq_max_age_seconds: float = 90 * 24 * 3600.0
    """How long the DLQ stream keeps a dead letter."""


def weak_secret(value: str, rule: SecretRule | None = None) -> str | None:
    """What is wrong with secret ``value`` under ``rule`` (default: one secret of at least
    :data:`MIN_SECRET_LENGTH` characters): which entry, for a list, and the rule it
    breaks, never quoting it; ``None`` when it passes."""
    rule = rule or SecretRule()
    what = "every entry of this comma-separated list" if rule.comma_list else "it"
    needs = (
        f"{what} must be a generated secret of at least {rule.min_length} characters, not a "
        f"placeholder ({', '.join(sorted(PLACEHOLDER_SECRETS))}); e.g. "
        "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
    )
    entries = value.split(",") if rule.comma_list else [value]
    if not value.strip():
        return f"is empty: {needs}"
    for i, entry in enumerate(entries, 1):
        where = f"entry {i} of {len(entries)} " if rule.comma_list else ""
        text = entry.strip()
        if not text:
            broken = "is empty"
        elif text.lower() in PLACEHOLDER_SECRETS:
            broken = "is a placeholder"
        elif len(text) < rule.min_length:
            broken = f"is shorter than {rule.min_length} characters"
        else:
            continue
        return f"{where}{broken}: {needs}"
    return None


def secret_field(description: str) -> Any:
    """A required secret: no default, never logged (``SecretStr``)."""
    return Field(..., description=description)


class ApiServiceSettings(ServiceSettings):
    """Settings of a service that also serves an HTTP API (FastAPI, bearer tokens).

    Subclasses set their own ``api_port`` default.
    """

    api_tokens: SecretList = secret_field(
        "Comma-separated admin API tokens (the installation's operator; services and people "
        "otherwise hold issued tokens with a role); a request must bear one of these or an "
        "issued token (Authorization: Bearer …)"
    )
    api_host: str = "127.0.0.1"
    """Address of the HTTP API."""
    api_port: int = 0
    """Port of the HTTP API (OpenAPI at /docs)."""

    def tokens(self) -> frozenset[str]:
        """The accepted API tokens."""
        return frozenset(
            t.strip() for t in self.api_tokens.get_secret_value().split(",") if t.strip()
        )
