"""What the kit's consumers take as an event (``parse_event``), beyond the contract: the
event id on the wire, and nothing PostgreSQL cannot store."""

from __future__ import annotations

import json
import uuid

import pytest

from edgeloop.contracts.events import DatasetSelection, RetrainRequested, ValidationPassed
from edgeloop.kit.consumer import MalformedEvent, parse_event, unstorable


def _retrain(**evidence: object) -> dict[str, object]:
    event = RetrainRequested(
        model="m",
        version="1",
        request_id=uuid.uuid4(),
        reason="drift",
        evidence=dict(evidence),
        dataset=DatasetSelection(kinds=["random"]),
    )
    return dict(json.loads(event.to_json()))


def test_a_valid_event_parses_even_with_lookalikes_of_what_is_refused() -> None:
    body = _retrain(note="NaNny said Infinity", path="C:\\u0000")
    event = parse_event(RetrainRequested, json.dumps(body).encode())
    assert event.evidence["path"] == "C:\\u0000"  # a backslash, not a NUL
    assert str(event.event_id) == body["event_id"]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"scores": [0.1, NaN]}', "evidence.scores.1: nan is not a finite number"),
        (b'{"psi": Infinity}', "evidence.psi: inf is not a finite number"),
        (b'{"psi": -Infinity}', "evidence.psi: -inf is not a finite number"),
        (b'{"note": "a\\u0000b"}', "evidence.note: a NUL character (U+0000)"),
        (b'{"a\\u0000": 1}', "a NUL character (U+0000) in a key"),
        (b'{"n": 9223372036854775808}', "evidence.n: 9223372036854775808 does not fit in 64 bits"),
        (b'{"n": [-9223372036854775809]}', "evidence.n.0: -9223372036854775809 does not fit"),
        (b'{"x": 1e400}', "evidence.x: inf is not a finite number"),
    ],
)
def test_what_postgresql_cannot_store_is_malformed(raw: bytes, says: str) -> None:
    data = json.dumps(_retrain(x="@")).encode().replace(b'{"x": "@"}', raw)
    with pytest.raises(MalformedEvent, match="malformed RetrainRequested") as caught:
        parse_event(RetrainRequested, data)
    assert says in str(caught.value)


def test_non_finite_metrics_are_malformed_though_the_contract_takes_them() -> None:
    data = (
        b'{"event_id": "%s", "model": "m", "version": "1", "image": "i", "digest": "d", '
        b'"metrics": {"accuracy": NaN}}' % str(uuid.uuid4()).encode()
    )
    assert ValidationPassed.model_validate_json(data).metrics  # the contract alone: taken
    with pytest.raises(MalformedEvent, match=r"metrics\.accuracy: nan is not a finite"):
        parse_event(ValidationPassed, data)


def test_an_event_without_its_id_is_malformed() -> None:
    body = _retrain()
    del body["event_id"]
    with pytest.raises(MalformedEvent, match="event_id: Field required"):
        parse_event(RetrainRequested, json.dumps(body).encode())


def test_not_json_and_contract_violations_say_so() -> None:
    with pytest.raises(MalformedEvent, match="Invalid JSON"):
        parse_event(RetrainRequested, b"\xff{")
    with pytest.raises(MalformedEvent, match="request_id: Field required"):
        parse_event(RetrainRequested, b'{"model": "m"}')
    assert unstorable(b'{"plain": "json"}') is None
    # the largest integers and doubles there are, and digits in strings, are storable
    assert unstorable(b'{"n": 9223372036854775807, "m": -9223372036854775808}') is None
    assert unstorable(b'{"x": 1.7e308, "tiny": 5e-324, "s": "12345678901234567890"}') is None


def test_the_reason_is_one_line_without_control_characters() -> None:
    """Found by the consumer fuzz: an unknown field named with a NUL put the NUL in the
    reason, which the monitor could not store in its per-device count of malformed
    telemetry (the count was lost)."""
    body = _retrain()
    body["odd\x00\x01key\nnext"] = 1
    with pytest.raises(MalformedEvent) as caught:
        parse_event(RetrainRequested, json.dumps(body).encode())
    reason = str(caught.value)
    assert reason.isprintable(), reason
    assert "odd\\x00\\x01key next: Extra inputs are not permitted" in reason
