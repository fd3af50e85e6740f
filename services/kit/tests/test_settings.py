"""Settings: per-service prefix, shared infrastructure variables, secrets refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsConfigDict

from edgeloop.kit.settings import ServiceSettings, secret_field


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


@pytest.mark.parametrize("value", ["changeme", "  ", "secret"])
def test_placeholder_secret_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("EDGELOOP_BUILDERX_SIGNING_KEY", value)
    with pytest.raises(ValidationError, match="placeholder or empty"):
        BuilderLike()


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
    (tmp_path / "EDGELOOP_BUILDERX_SIGNING_KEY").write_text("key-from-a-file\n")
    settings = BuilderLike(_secrets_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.signing_key.get_secret_value() == "key-from-a-file"
    monkeypatch.setenv("EDGELOOP_BUILDERX_SIGNING_KEY", "key-from-the-environment")
    settings = BuilderLike(_secrets_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.signing_key.get_secret_value() == "key-from-the-environment"
