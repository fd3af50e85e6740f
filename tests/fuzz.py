"""Seeded fuzzing for the bus consumers and the gateway: the seed, malformed bus events.

Every run draws from one ``random.Random(seed)``; the seed is printed at the start and
named in every assertion, and ``EDGELOOP_FUZZ_SEED=<seed>`` repeats a run. ``make test``
runs the short versions, ``make fuzz`` the full ones (marker ``fuzz``).
"""

from __future__ import annotations

import json
import os
import random
import re
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from edgeloop.contracts.events import Event

SEED_ENV = "EDGELOOP_FUZZ_SEED"


def fuzz_seed(what: str) -> int:
    """The run's seed (``EDGELOOP_FUZZ_SEED`` or a fresh one), printed so a failure
    can be repeated."""
    seed = int(os.environ.get(SEED_ENV) or random.randrange(1 << 32))
    print(f"\n{what}: fuzz seed {seed} ({SEED_ENV}={seed} repeats it)")
    return seed


# --- malformed bus events ------------------------------------------------------------------


@dataclass(frozen=True)
class Malformed:
    """One malformed event: what is wrong with it, its bytes and headers, and what the
    dead letter's reason must say about it (a regular expression)."""

    category: str
    payload: bytes
    headers: dict[str, str]
    expect: str


#: Every kind of malformed event, drawn with equal weight.
CATEGORIES = (
    "random_bytes",
    "truncated",
    "not_an_object",
    "other_event",
    "wrong_type",
    "missing_field",
    "missing_event_id",
    "extra_field",
    "huge_field",
    "deep_nesting",
    "bad_utf8",
    "nul_char",
    "non_finite",
    "duplicate_event_id",
    "wrong_headers",
)

#: What every dead letter of a malformed event begins with (the kit's wording).
MALFORMED_PREFIX = "malformed "

_SENTINEL = "\u2603fuzz\u2603"
_WRONG_VALUES: tuple[Any, ...] = (
    {"x": 1},
    [1, 2, 3],
    True,
    123456789012345678901234567890,
    -1,
    "not-the-right-type",
    None,
    1.5,
    "",
)


class MalformedEvents:
    """Draws malformed variants of ``example`` (an event of the consumer's type).

    Each variant is checked against the contract before it is used: a mutation that
    happens to give a valid event (a lax coercion, an optional field removed) is drawn
    again, so every event this returns must be dead-lettered.
    """

    def __init__(self, rng: random.Random, example: Event, others: list[Event]) -> None:
        self.rng = rng
        self.example = example
        self.type = type(example)
        self.others = [o for o in others if not self._parses(o.to_json())]
        self.fields: dict[str, Any] = json.loads(example.to_json())
        self.required = [n for n, f in self.type.model_fields.items() if f.is_required()]
        self._dup_id = str(uuid.uuid4())

    def at_the_limit(self, max_payload: int) -> Malformed:
        """A malformed event as large as the server takes: its dead letter (the payload
        and the reason in headers) is larger than that."""
        extra = "".join(f', "unexpected_{i}": {i}' for i in range(12))  # a long reason
        head = b'{"event_id": "'
        tail = f'"{extra}}}'.encode()
        size = max_payload - 128  # room for the publish's own headers
        data = head + b"x" * (size - len(head) - len(tail)) + tail
        return Malformed("at_the_limit", data, {}, "event_id")

    def draw(self) -> Malformed:
        """One malformed event of a random category."""
        category = self.rng.choice(CATEGORIES)
        for _ in range(20):
            made = getattr(self, f"_{category}")()
            if made is not None:
                return made
        return self._random_bytes()

    def _parses(self, data: bytes) -> bool:
        try:
            self.type.model_validate_json(data)
        except (ValidationError, ValueError):
            return False
        return True

    def _doc(self, **changes: Any) -> dict[str, Any]:
        doc = dict(self.fields)
        doc["event_id"] = str(uuid.uuid4())
        doc.update(changes)
        return doc

    def _checked(self, category: str, data: bytes, expect: str) -> Malformed | None:
        """``data`` as a malformed event, or None when it parses after all."""
        if self._parses(data):
            return None
        return Malformed(category, data, {}, expect)

    def _with_raw(self, key: str, raw: bytes) -> bytes:
        """The example with ``key``'s value replaced by ``raw`` JSON text (or not JSON)."""
        text = json.dumps(self._doc(**{key: _SENTINEL}), ensure_ascii=False).encode()
        return text.replace(json.dumps(_SENTINEL, ensure_ascii=False).encode(), raw, 1)

    def _key(self) -> str:
        return self.rng.choice(sorted(self.fields))

    # --- the categories -------------------------------------------------------------

    def _random_bytes(self) -> Malformed:
        size = self.rng.choice((0, 1, 2, 7, 64, 300, 4096))
        data = self.rng.randbytes(size)
        if self._parses(data):  # never, but the count must be exact
            data = b"\xff" + data
        return Malformed("random_bytes", data, {}, "")

    def _truncated(self) -> Malformed | None:
        full = json.dumps(self._doc()).encode()
        return self._checked("truncated", full[: self.rng.randrange(len(full))], "Invalid JSON")

    def _not_an_object(self) -> Malformed | None:
        value = self.rng.choice(([1, 2], 42, "text", None, True, [self._doc()], 1e308))
        return self._checked(
            "not_an_object", json.dumps(value).encode(), "Input should be an object"
        )

    def _other_event(self) -> Malformed | None:
        if not self.others:
            return None
        other = self.rng.choice(self.others)
        data = json.dumps({**json.loads(other.to_json()), "event_id": str(uuid.uuid4())})
        return self._checked("other_event", data.encode(), "Field required|Extra inputs")

    def _wrong_type(self) -> Malformed | None:
        key = self._key()
        value = self.rng.choice(_WRONG_VALUES)
        data = json.dumps(self._doc(**{key: value})).encode()
        return self._checked("wrong_type", data, re.escape(key))

    def _missing_field(self) -> Malformed | None:
        if not self.required:
            return None
        key = self.rng.choice(self.required)
        doc = self._doc()
        doc.pop(key, None)
        return self._checked(
            "missing_field", json.dumps(doc).encode(), f"{re.escape(key)}: Field required"
        )

    def _missing_event_id(self) -> Malformed:
        # parses with a fresh default id, so a redelivery would be a new event: the
        # consumer must refuse it (it cannot de-duplicate what has no id)
        doc = self._doc()
        del doc["event_id"]
        return Malformed("missing_event_id", json.dumps(doc).encode(), {}, "event_id")

    def _extra_field(self) -> Malformed | None:
        """An unknown field, its name hostile too (the reason names it, in a header)."""
        odd = self.rng.choice(("", "\x00", "\x01\x7f", "\u00fc\u20ac\U0001f600", "\u2028", " :\t"))
        key = f"unexpected_{self.rng.randrange(1000)}{odd}"
        data = json.dumps(self._doc(**{key: self.rng.choice(_WRONG_VALUES)})).encode()
        return self._checked("extra_field", data, "Extra inputs are not permitted")

    def _huge_field(self) -> Malformed | None:
        key = self._key()
        size = self.rng.choice((1000, 20_000, 200_000))
        value: Any = self.rng.choice(("x" * size, list(range(size // 8)), {"k": "y" * size}))
        data = json.dumps(self._doc(**{key: value})).encode()
        return self._checked("huge_field", data, re.escape(key))

    def _deep_nesting(self) -> Malformed | None:
        depth = self.rng.choice((300, 3000, 30_000))
        opener, closer = self.rng.choice(((b"[", b"]"), (b'{"a":', b"}")))
        raw = opener * depth + b"1" + closer * depth
        return self._checked("deep_nesting", self._with_raw(self._key(), raw), "recursion limit")

    def _bad_utf8(self) -> Malformed | None:
        junk = self.rng.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"))
        raw = b'"ok' + junk + b'ok"'
        return self._checked("bad_utf8", self._with_raw(self._key(), raw), "Invalid JSON")

    def _nul_char(self) -> Malformed | None:
        """A NUL in a free-text string: the contract takes it, PostgreSQL never can."""
        texts = [k for k, v in self.fields.items() if isinstance(v, str) and k != "event_id"]
        key = self.rng.choice(texts)
        value = str(self.fields[key])
        cut = self.rng.randrange(len(value) + 1)
        data = json.dumps(self._doc(**{key: value[:cut] + "\x00" + value[cut:]})).encode()
        if not self._parses(data):
            return None  # a field with a syntax (uuid, digest): another category's case
        return Malformed("nul_char", data, {}, r"U\+0000")

    def _non_finite(self) -> Malformed:
        key = self._key()
        literal = self.rng.choice((b"NaN", b"Infinity", b"-Infinity"))
        value = self.fields[key]
        raw = (
            b'{"v": ' + literal + b"}"
            if isinstance(value, dict)
            else b"[" + literal + b"]"
            if isinstance(value, list)
            else literal
        )
        # a float field takes it (then the kit refuses it), any other field refuses it
        expect = f"not a finite number|{re.escape(key)}"
        return Malformed("non_finite", self._with_raw(key, raw), {}, expect)

    def _duplicate_event_id(self) -> Malformed | None:
        """Malformed events that all carry one event id: each is dead-lettered."""
        key = self.rng.choice([k for k in sorted(self.fields) if k != "event_id"])
        doc = self._doc(**{key: self.rng.choice(_WRONG_VALUES)})
        doc["event_id"] = self._dup_id
        return self._checked("duplicate_event_id", json.dumps(doc).encode(), re.escape(key))

    def _wrong_headers(self) -> Malformed:
        """A malformed event under headers that lie about it."""
        inner = self.rng.choice((self._random_bytes, self._missing_event_id))()
        junk = "".join(self.rng.choice("abcdef0123456789-") for _ in range(self.rng.randrange(80)))
        headers = {
            "traceparent": self.rng.choice((junk, "00-" + "0" * 32 + "-" + "0" * 16 + "-01")),
            "tracestate": junk,
            "Content-Type": self.rng.choice(("application/json", "text/plain", junk)),
            "Edgeloop-Dlq-Reason": "forged: this header is not the consumer's",
            "Edgeloop-Dlq-Replay-Of": junk or "1",
            "X-Fuzz": "z" * self.rng.choice((1, 100, 4000)),
        }
        return Malformed("wrong_headers", inner.payload, headers, inner.expect)
