"""Settings: per-service prefix, shared infrastructure variables, secrets refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsConfigDict

from edgeloop.kit.settings import (
    MIN_SECRET_LENGTH,
    PLACEHOLDER_SECRETS,
    ApiServiceSettings,
    ServiceSettings,
    secret_field,
)


class BuilderLike(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="EDGELOOP_BUILDERX_", extra="ignore")

    signing_key: SecretStr = secret_field("Ed25519 private key")
    workers: int = 2


def test_shared_urls_come_from_the_common_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_NATS_URL", "nats://shared:4222")
    monkeypatch.setenv("EDGELOOP_BUILDERX_SIGNING_KEY", "k" * 32)
    monkeypatch.setenv("EDGELOOP_BUILDERX_WORKERS", "5")
    s = BuilderLike()
    assert s.nats_url == "nats://shared:4222"
    assert s.workers == 5


def test_service_prefix_overrides_the_shared_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_NATS_URL", "nats://shared:4222")
    monkeypatch.setenv("EDGELOOP_BUILDERX_NATS_URL", "nats://mine:4222")
    monkeypatch.setenv("EDGELOOP_BUILDERX_SIGNING_KEY", "k" * 32)
    assert BuilderLike().nats_url == "nats://mine:4222"


def test_missing_secret_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGELOOP_BUILDERX_SIGNING_KEY", raising=False)
    with pytest.raises(ValidationError, match="signing_key"):
        BuilderLike()


class ApiLike(ApiServiceSettings):
    model_config = SettingsConfigDict(env_prefix="EDGELOOP_APIX_", extra="ignore")

    registry_token: SecretStr = secret_field("a client token")


GOOD = "a-generated-token-of-32-chars-xx"
OTHER = "another-generated-token-32-chars"


@pytest.mark.parametrize(
    ("value", "why"),
    [("changeme", "is a placeholder"), ("  ", "is empty"), ("Secret", "is a placeholder")],
)
def test_placeholder_secret_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str, why: str
) -> None:
    monkeypatch.setenv("EDGELOOP_BUILDERX_SIGNING_KEY", value)
    with pytest.raises(ValidationError, match=f"EDGELOOP_BUILDERX_SIGNING_KEY .*{why}"):
        BuilderLike()


def test_a_short_single_secret_is_refused_without_printing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    short = "k" * (MIN_SECRET_LENGTH - 1)
    monkeypatch.setenv("EDGELOOP_BUILDERX_SIGNING_KEY", short)
    with pytest.raises(ValidationError) as refused:
        BuilderLike()
    message = str(refused.value)
    assert "EDGELOOP_BUILDERX_SIGNING_KEY (signing_key) is shorter than 24 characters" in message
    assert short not in message
    monkeypatch.setenv("EDGELOOP_BUILDERX_SIGNING_KEY", "k" * MIN_SECRET_LENGTH)
    assert BuilderLike().signing_key.get_secret_value() == "k" * MIN_SECRET_LENGTH


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ([GOOD, "changeme"], "entry 2 of 2 is a placeholder"),
        (["short-token-1234", GOOD], "entry 1 of 2 is shorter than 24 characters"),
        ([GOOD, OTHER, "PASSWORD"], "entry 3 of 3 is a placeholder"),
        ([GOOD, "", OTHER], "entry 2 of 3 is empty"),
    ],
)
def test_each_entry_of_a_comma_list_secret_is_checked(
    monkeypatch: pytest.MonkeyPatch, entries: list[str], why: str
) -> None:
    """One weak token among good ones is refused at start, naming the setting, the entry
    and the rule, never a secret (the placeholders' names are the rule's)."""
    monkeypatch.setenv("EDGELOOP_APIX_API_TOKENS", ",".join(entries))
    monkeypatch.setenv("EDGELOOP_APIX_REGISTRY_TOKEN", OTHER)
    with pytest.raises(ValidationError) as refused:
        ApiLike()
    message = str(refused.value)
    assert f"EDGELOOP_APIX_API_TOKENS (api_tokens) {why}" in message
    assert "at least 24 characters" in message
    secrets = [e for e in entries if e and e.lower() not in PLACEHOLDER_SECRETS]
    assert secrets
    assert not [e for e in secrets if e in message]


def test_a_client_token_is_checked_like_the_api_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_APIX_API_TOKENS", f"{GOOD}, {OTHER}")
    monkeypatch.setenv("EDGELOOP_APIX_REGISTRY_TOKEN", "tok-12345")
    with pytest.raises(ValidationError, match=r"EDGELOOP_APIX_REGISTRY_TOKEN .* shorter than 24"):
        ApiLike()
    monkeypatch.setenv("EDGELOOP_APIX_REGISTRY_TOKEN", OTHER)
    assert ApiLike().tokens() == {GOOD, OTHER}


def test_a_refusal_never_prints_the_other_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DSN with a password, another secret: the error shows none of the input."""
    monkeypatch.setenv("EDGELOOP_DATABASE_URL", "postgresql://u:db-password-xyz@db/edgeloop")
    monkeypatch.setenv("EDGELOOP_BUILDERX_SIGNING_KEY", "k" * 32)
    monkeypatch.setenv("EDGELOOP_AUDIT_KEY", "audit-key-of-30-characters-xyz")
    with pytest.raises(ValidationError) as refused:
        BuilderLike()
    message = str(refused.value)
    assert "EDGELOOP_AUDIT_KEY (audit_key) is shorter than 32 characters" in message
    assert "db-password-xyz" not in message
    assert "audit-key-of-30" not in message
    assert "k" * 32 not in message


def test_secret_is_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_BUILDERX_SIGNING_KEY", "very-private-key-material")
    s = BuilderLike()
    assert "very-private-key-material" not in repr(s)
    assert "very-private-key-material" not in s.model_dump_json()


def test_a_secret_can_come_from_a_file_named_like_its_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Docker/Kubernetes secrets: /run/secrets/EDGELOOP_BUILDERX_SIGNING_KEY; the
    environment wins where both are set."""
    monkeypatch.delenv("EDGELOOP_BUILDERX_SIGNING_KEY", raising=False)
    (tmp_path / "EDGELOOP_BUILDERX_SIGNING_KEY").write_text("key-from-a-file-of-24-chars\n")
    settings = BuilderLike(_secrets_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.signing_key.get_secret_value() == "key-from-a-file-of-24-chars"
    monkeypatch.setenv("EDGELOOP_BUILDERX_SIGNING_KEY", "key-from-the-environment")
    settings = BuilderLike(_secrets_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.signing_key.get_secret_value() == "key-from-the-environment"
