"""Webhook notifications: what a subscription is, and how a delivery is signed.

The notifier POSTs each lifecycle event a subscription asked for to its URL. A receiver
checks a delivery with :func:`verify` (or the same few lines in any language): the
``X-Edgeloop-Signature`` header is ``sha256=`` and the hex HMAC-SHA256, under the
subscription's secret, of ``<X-Edgeloop-Timestamp>.<raw body>``; the timestamp (Unix
seconds, set at each attempt) is inside the signed string, so a captured delivery cannot
be replayed later than the receiver's tolerance. ``X-Edgeloop-Delivery`` is the same on
every attempt of one delivery: a receiver that keeps the ones it handled ignores a
repeat (delivery is at least once: a notifier stopped between the receiver's answer and
its record sends again).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgeloop.contracts.events import EVENTS_BY_SUBJECT

SIGNATURE_HEADER: Final = "X-Edgeloop-Signature"
TIMESTAMP_HEADER: Final = "X-Edgeloop-Timestamp"
DELIVERY_HEADER: Final = "X-Edgeloop-Delivery"
EVENT_HEADER: Final = "X-Edgeloop-Event"

#: The subject of the event ``notify test`` sends (no stream carries it).
TEST_EVENT: Final = "notify.test"
#: What a subscription may ask for: every lifecycle event's subject.
EVENTS: Final = tuple(sorted(EVENTS_BY_SUBJECT))
#: How long a receiver should accept a delivery after its timestamp (and before it).
DEFAULT_TOLERANCE_SECONDS: Final = 300.0
#: A subscription's secret is at least this long.
MIN_SECRET_LENGTH: Final = 16

Format = Literal["json", "alertmanager"]


class SubscriptionIn(BaseModel):
    """Body of ``POST /v1/subscriptions``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000, description="http(s) URL the deliveries are POSTed to")
    events: list[str] = Field(min_length=1, max_length=len(EVENTS))
    secret: str = Field(
        min_length=MIN_SECRET_LENGTH,
        max_length=200,
        description="HMAC key of the signature; stored, never returned",
    )
    format: Format = "json"
    description: str = Field(default="", max_length=200)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return check_url(url)

    @field_validator("events")
    @classmethod
    def _known_events(cls, events: list[str]) -> list[str]:
        unknown = sorted(set(events) - set(EVENTS))
        if unknown:
            raise ValueError(
                f"unknown events {', '.join(unknown)}; a subscription takes any of: "
                f"{', '.join(EVENTS)}"
            )
        return sorted(set(events))


def check_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host; ``ValueError`` saying why not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"a webhook URL must be http:// or https://, not {parts.scheme or 'scheme-less'}"
        )
    if not parts.hostname:
        raise ValueError("a webhook URL needs a host")
    return url


def signed_string(timestamp: str, body: bytes) -> bytes:
    """What the signature covers: ``<timestamp>.<body>``."""
    return timestamp.encode() + b"." + body


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Edgeloop-Signature`` value: ``sha256=<hex HMAC>``."""
    mac = hmac.new(secret.encode(), signed_string(timestamp, body), hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The timestamp and signature headers of a delivery of ``body`` sent now."""
    timestamp = str(int(time.time() if now is None else now))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature(secret, timestamp, body)}


class BadSignature(ValueError):
    """A delivery whose signature does not check out (the message says why)."""


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """Check a delivery as a receiver does: :class:`BadSignature` unless its signature
    matches ``secret`` and its timestamp is within ``tolerance`` seconds of ``now``.
    ``headers`` is looked up case-insensitively."""
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp = lower.get(TIMESTAMP_HEADER.lower(), "")
    given = lower.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit():
        raise BadSignature(f"no {TIMESTAMP_HEADER} header (Unix seconds)")
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        raise BadSignature(f"the timestamp is more than {tolerance:.0f} s away: a replay?")
    if not hmac.compare_digest(given, signature(secret, timestamp, body)):
        raise BadSignature("the signature does not match the body and the secret")
