"""How a webhook delivery is signed and checked (``edgeloop.contracts.webhooks``)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from pydantic import ValidationError

from edgeloop.contracts.webhooks import BadSignature, SubscriptionIn, signed_headers, verify

SECRET = "a-receiver-secret-0123456789"
BODY = b'{"event":"alarm.raised"}'


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    headers = signed_headers(SECRET, BODY, now=1_700_000_000)
    assert headers["X-Edgeloop-Timestamp"] == "1700000000"
    mac = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert headers["X-Edgeloop-Signature"] == f"sha256={mac}"
    verify(SECRET, headers, BODY, now=1_700_000_100)


def test_verify_refuses_tampering_other_secrets_and_replays() -> None:
    headers = signed_headers(SECRET, BODY, now=1_700_000_000)
    with pytest.raises(BadSignature, match="does not match"):
        verify(SECRET, headers, BODY + b" ", now=1_700_000_000)
    with pytest.raises(BadSignature, match="does not match"):
        verify("another-secret-0123456789", headers, BODY, now=1_700_000_000)
    with pytest.raises(BadSignature, match="replay"):
        verify(SECRET, headers, BODY, now=1_700_000_000 + 301)
    # the timestamp is signed: moving it forward breaks the signature
    moved = {**headers, "X-Edgeloop-Timestamp": "1700000301"}
    with pytest.raises(BadSignature, match="does not match"):
        verify(SECRET, moved, BODY, now=1_700_000_301)
    with pytest.raises(BadSignature, match="Timestamp"):
        verify(SECRET, {}, BODY)


@pytest.mark.parametrize(
    "url",
    ["ftp://h/x", "file:///etc/passwd", "javascript:alert(1)", "gopher://h", "//h/x", "http://"],
)
def test_subscription_refuses_what_is_not_an_http_url(url: str) -> None:
    with pytest.raises(ValidationError, match="webhook URL"):
        SubscriptionIn(url=url, events=["alarm.raised"], secret=SECRET)


def test_subscription_events_are_known_subjects() -> None:
    sub = SubscriptionIn(
        url="https://h/x",
        events=["rollout.rolled_back", "alarm.raised", "alarm.raised"],
        secret=SECRET,
    )
    assert sub.events == ["alarm.raised", "rollout.rolled_back"]
    with pytest.raises(ValidationError, match=r"unknown events device\.status"):
        SubscriptionIn(url="https://h/x", events=["device.status"], secret=SECRET)
    with pytest.raises(ValidationError, match="at least 16"):
        SubscriptionIn(url="https://h/x", events=["alarm.raised"], secret="short")
