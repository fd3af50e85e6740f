"""Seeded fuzzing for the bus consumers and the gateway: the seed, malformed bus events.

Every run draws from one ``random.Random(seed)``; the seed is printed at the start and
named in every assertion, and ``EDGELOOP_FUZZ_SEED=<seed>`` repeats a run. ``make test``
runs the short versions, ``make fuzz`` the full ones (marker ``fuzz``).
"""

from __future__ import annotations

import json
import math
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


# --- hostile edge frames ---------------------------------------------------------------------

#: Outcomes a frame may have on its session: "ack", "silent" (no answer: heartbeats, status
#: reports), "error:<code>" (an Error for that frame), "error:*" (any Error).
ANY_ERROR = "error:*"


@dataclass(frozen=True)
class Frame:
    """One AgentMessage as bytes (or bytes that are not one), what it tries, and the
    outcomes the gateway may answer it with."""

    category: str
    raw: bytes
    expect: frozenset[str]
    batch_id: str = ""
    """The telemetry batch id it carries, if any (for the TELEMETRY stream check)."""


def oracle(raw: bytes, max_bytes: int) -> frozenset[str]:
    """What the gateway may answer to ``raw`` on an open session, from what it decodes to
    (for random, truncated and bit-flipped frames)."""
    from google.protobuf.message import DecodeError

    from edgeloop.contracts.edge.v1 import edge_pb2 as pb

    if len(raw) > max_bytes:
        return frozenset({"error:too_large"})
    try:
        kind = pb.AgentMessage.FromString(raw).WhichOneof("kind")
    except DecodeError:
        return frozenset({"error:invalid_message"})
    if kind in (None, "hello"):
        return frozenset({"error:invalid_message"})
    if kind in ("heartbeat", "command_result"):
        return frozenset({"silent"})
    if kind == "status":
        return frozenset({"silent", "error:invalid_message"})
    return frozenset({"ack", ANY_ERROR})  # telemetry: valid by chance is acked


class HostileFrames:
    """Draws the frames a hostile (or broken) enrolled device sends on its open session.

    ``model``/``version``: what the device said in Hello it runs (telemetry for it is
    taken); ``other_device``: an id that is not this device's; ``now``: the gateway's
    clock, near enough (windows are drawn around it).
    """

    def __init__(
        self,
        rng: random.Random,
        device: str,
        model: str,
        version: str,
        other_device: str,
        *,
        now: float,
        max_bytes: int,
        max_count: int,
    ) -> None:
        self.rng = rng
        self.device = device
        self.model = model
        self.version = version
        self.other = other_device
        self.now = now
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.acked: list[bytes] = []
        """Valid batches sent so far (re-sent as duplicates)."""
        self._elsewhere = False

    # --- building blocks ---------------------------------------------------------------

    def valid_batch(self) -> Any:
        """A telemetry batch that keeps every rule at entry."""
        from edgeloop.contracts.edge.v1 import edge_pb2 as pb
        from edgeloop.contracts.events import CONFIDENCE_EDGES, LATENCY_MS_EDGES

        count = self.rng.randrange(1, 500)
        end = self.now - self.rng.uniform(0, 60)
        batch = pb.TelemetryBatch(
            batch_id=str(uuid.UUID(int=self.rng.getrandbits(128))),
            model=self.model,
            version=self.version,
            count=count,
            errors=count // 10,
            low_confidence=count // 5,
        )
        batch.window_start.FromNanoseconds(int((end - 1) * 1e9))
        batch.window_end.FromNanoseconds(int(end * 1e9))
        batch.feature_names.extend(["f0", "f1"])
        for _ in range(2):
            batch.feature_histograms.add(edges=[0.0, 1.0], counts=[0, count - count // 10, 0])
        batch.prediction_counts["a"] = count - count // 10
        confidence = [0] * (len(CONFIDENCE_EDGES) + 1)
        confidence[-1] = count
        batch.confidence_histogram.CopyFrom(pb.Histogram(edges=CONFIDENCE_EDGES, counts=confidence))
        latency = [0] * (len(LATENCY_MS_EDGES) + 1)
        latency[3] = count
        batch.latency_ms_histogram.CopyFrom(pb.Histogram(edges=LATENCY_MS_EDGES, counts=latency))
        batch.samples.add(features=[0.5, 0.5], prediction="a", confidence=0.3, kind="random")
        return batch

    def _telemetry(self, category: str, batch: Any, *codes: str) -> Frame:
        from edgeloop.contracts.edge.v1 import edge_pb2 as pb

        raw = pb.AgentMessage(telemetry=batch).SerializeToString()
        expect = frozenset(f"error:{c}" for c in codes) if codes else frozenset({"ack"})
        return Frame(category, raw, expect, batch.batch_id)

    def _status(self, category: str, expect: str, **fields: Any) -> Frame:
        from edgeloop.contracts.edge.v1 import edge_pb2 as pb

        fields.setdefault("state", pb.DEVICE_STATE_RUNNING)
        report = pb.StatusReport(**fields)
        raw = pb.AgentMessage(status=report).SerializeToString()
        return Frame(category, raw, frozenset({expect}))

    def _nul(self, text: str) -> str:
        cut = self.rng.randrange(len(text) + 1)
        return text[:cut] + "\x00" + text[cut:]

    # --- the categories ---------------------------------------------------------------

    def draw(self) -> Frame:
        """One frame of a random category (after a report of another version, the report
        that the device runs its own again: the gateway remembers the latest few)."""
        if self._elsewhere:
            self._elsewhere = False
            return self._status("report_back", "silent", model=self.model, version=self.version)
        name = self.rng.choice(FRAME_CATEGORIES)
        self._elsewhere = name == "many_versions"
        return getattr(self, f"_{name}")()  # type: ignore[no-any-return]

    def _valid(self) -> Frame:
        frame = self._telemetry("valid", self.valid_batch())
        self.acked.append(frame.raw)
        return frame

    def _resent(self) -> Frame:
        """A batch sent before, again (its id de-duplicates on the bus): acked again."""
        if not self.acked:
            return self._valid()
        raw = self.rng.choice(self.acked)
        from edgeloop.contracts.edge.v1 import edge_pb2 as pb

        batch_id = pb.AgentMessage.FromString(raw).telemetry.batch_id
        return Frame("resent", raw, frozenset({"ack"}), batch_id)

    def _random_bytes(self) -> Frame:
        size = self.rng.choice((0, 1, 3, 16, 200, 4096, 60_000))
        raw = self.rng.randbytes(size)
        return Frame("random_bytes", raw, oracle(raw, self.max_bytes))

    def _truncated(self) -> Frame:
        full = self._valid().raw
        self.acked.pop()
        raw = full[: self.rng.randrange(len(full))]
        return Frame("truncated", raw, oracle(raw, self.max_bytes))

    def _bit_flipped(self) -> Frame:
        raw = bytearray(self._valid().raw)
        self.acked.pop()
        for _ in range(self.rng.randrange(1, 8)):
            raw[self.rng.randrange(len(raw))] ^= 1 << self.rng.randrange(8)
        return Frame("bit_flipped", bytes(raw), oracle(bytes(raw), self.max_bytes))

    def _oversized(self) -> Frame:
        """A message over the gateway's limit (rare: a megabyte each)."""
        if self.rng.random() > 0.1:
            return self._empty()
        batch = self.valid_batch()
        batch.feature_names.append("x" * (self.max_bytes + self.rng.randrange(1, 1000)))
        frame = self._telemetry("oversized", batch, "too_large")
        return Frame("oversized", frame.raw, frame.expect)

    def _empty(self) -> Frame:
        return Frame("empty", b"", frozenset({"error:invalid_message"}))

    def _hello_again(self) -> Frame:
        from edgeloop.contracts.edge.v1 import edge_pb2 as pb

        hello = pb.Hello(device_id=self.rng.choice((self.device, self.other)), model=self.model)
        raw = pb.AgentMessage(hello=hello).SerializeToString()
        return Frame("hello_again", raw, frozenset({"error:invalid_message"}))

    def _heartbeat(self) -> Frame:
        from edgeloop.contracts.edge.v1 import edge_pb2 as pb

        beat = pb.Heartbeat(
            seq=self.rng.choice((0, 1, 2**64 - 1)), buffered_batches=self.rng.getrandbits(32)
        )
        beat.sent_at.seconds = self.rng.choice((0, -(2**62), 2**62, int(self.now)))
        beat.sent_at.nanos = self.rng.choice((0, -1, 2**31 - 1))
        raw = pb.AgentMessage(heartbeat=beat).SerializeToString()
        return Frame("heartbeat", raw, frozenset({"silent"}))

    def _command_result(self) -> Frame:
        from edgeloop.contracts.edge.v1 import edge_pb2 as pb

        result = pb.CommandResult(
            command_id=self.rng.choice(("", "nope", "\x00" * 10, "c" * 50_000)),
            ok=self.rng.random() < 0.5,
            message="m" * self.rng.choice((0, 10, 100_000)),
        )
        raw = pb.AgentMessage(command_result=result).SerializeToString()
        return Frame("command_result", raw, frozenset({"silent"}))

    def _huge_count(self) -> Frame:
        batch = self.valid_batch()
        batch.count = self.rng.choice((self.max_count + 1, 2**63, 2**64 - 1))
        return self._telemetry("huge_count", batch, "too_large")

    def _inconsistent(self) -> Frame:
        batch = self.valid_batch()
        how = self.rng.randrange(4)
        if how == 0:
            batch.errors = batch.count + self.rng.choice((1, 2**63))
        elif how == 1:
            batch.prediction_counts["b"] = 2**64 - 1
        elif how == 2:
            batch.confidence_histogram.counts[0] += batch.count
        else:
            batch.feature_histograms[0].counts[1] = batch.count * 3
        return self._telemetry("inconsistent", batch, "inconsistent")

    def _not_finite(self) -> Frame:
        """NaN and Infinity where the wire takes any double (JSON has neither)."""
        batch = self.valid_batch()
        bad = self.rng.choice((math.nan, math.inf, -math.inf))
        where = self.rng.randrange(4)
        if where == 0:
            batch.feature_histograms[0].edges[0] = bad
        elif where == 1:
            batch.samples[0].confidence = bad
        elif where == 2:
            batch.samples[0].features[1] = bad
        else:
            batch.latency_ms_histogram.edges[2] = bad
        return self._telemetry("not_finite", batch, "not_finite")

    def _wrong_version(self) -> Frame:
        batch = self.valid_batch()
        if self.rng.random() < 0.5:  # (the refusal quotes it)
            batch.model = self.rng.choice(("other", "probe", self._nul(self.model)))
        else:
            batch.version = self.rng.choice(("2", "0", self.version + ".1"))
        return self._telemetry("wrong_version", batch, "wrong_version")

    def _absurd_window(self) -> Frame:
        batch = self.valid_batch()
        how = self.rng.randrange(5)
        if how == 0:  # far in the future
            batch.window_end.seconds = int(self.now) + self.rng.choice((3600, 86400 * 365))
            return self._telemetry("absurd_window", batch, "clock_skew")
        if how == 1:  # long ago
            batch.window_end.seconds = int(self.now) - 86400 * self.rng.choice((8, 365 * 30))
            batch.window_start.seconds = batch.window_end.seconds - 1
            return self._telemetry("absurd_window", batch, "clock_skew")
        if how == 2:  # starts after it ends
            batch.window_start.seconds = batch.window_end.seconds + 100
            return self._telemetry("absurd_window", batch, "clock_skew")
        if how == 3:  # not a time at all
            batch.window_end.seconds = self.rng.choice((2**62, -(2**62)))
            return self._telemetry("absurd_window", batch, "invalid_message")
        batch.window_end.nanos = self.rng.choice((-1, 2**31 - 1))
        return self._telemetry("absurd_window", batch, "invalid_message")

    def _incomplete(self) -> Frame:
        batch = self.valid_batch()
        how = self.rng.randrange(5)
        if how == 0:
            batch.ClearField("window_end")
        elif how == 1:
            batch.feature_names.append("f2")  # three names, two histograms
        elif how == 2:
            batch.feature_histograms[1].counts.append(0)  # n edges need n+1 counts
        elif how == 3:
            batch.device_id = self.other
        else:
            batch.model = "m" * self.rng.choice((129, 10_000))  # over the name's limit
        return self._telemetry("incomplete", batch, "invalid_message")

    def _no_batch_id(self) -> Frame:
        batch = self.valid_batch()
        batch.batch_id = ""
        return self._telemetry("no_batch_id", batch, "invalid_message")

    def _labelled(self) -> Frame:
        batch = self.valid_batch()
        batch.samples[0].label = "cat"
        return self._telemetry("labelled", batch, "labelled_samples")

    def _nul_text(self) -> Frame:
        """A NUL in a string of a batch the gateway would otherwise take: it could reach
        the bus, where no consumer can store it."""
        batch = self.valid_batch()
        where = self.rng.randrange(5)
        if where == 0:
            batch.digest = self._nul("sha256:" + "a" * 64)
        elif where == 1:
            batch.feature_names[0] = self._nul("f0")
        elif where == 2:
            batch.prediction_counts[self._nul("a")] = batch.prediction_counts.pop("a")
        elif where == 3:
            batch.samples[0].prediction = self._nul("a")
        else:
            batch.trace_parent = self._nul("00-" + "1" * 32 + "-" + "2" * 16 + "-01")
        return self._telemetry("nul_text", batch, "unstorable")

    def _huge_batch_id(self) -> Frame:
        """A long batch id on a refused batch (the refusal echoes the id)."""
        batch = self.valid_batch()
        batch.batch_id = "b" * self.rng.choice((1000, 100_000, 500_000))
        batch.version = "never"
        return self._telemetry("huge_batch_id", batch, "wrong_version", "invalid_message")

    def _bad_status(self) -> Frame:
        from edgeloop.contracts.edge.v1 import edge_pb2 as pb

        how = self.rng.randrange(6)
        if how == 0:
            # unspecified, the first number no state has yet (a new state is not a bad
            # one), and far beyond
            undefined = max(pb.DeviceState.values()) + 1
            report = pb.StatusReport(state=self.rng.choice((0, undefined, 99, 2**31 - 1)))
            raw = pb.AgentMessage(status=report).SerializeToString()
            return Frame("bad_status", raw, frozenset({"error:invalid_message"}))
        if how == 1:
            return self._status("bad_status", "error:invalid_message", rollout_id="not-a-uuid")
        if how == 2:  # a name no model or version may have
            name = self.rng.choice(("m" * 100_000, self._nul("model"), "a b", "../x", "é"))
            field = self.rng.choice(("model", "version"))
            other = "version" if field == "model" else "model"
            return self._status("bad_status", "error:invalid_message", **{field: name, other: "1"})
        if how == 3:
            digest = self.rng.choice((self._nul("sha256:" + "a" * 64), "x" * 100_000))
            return self._status("bad_status", "error:invalid_message", digest=digest)
        if how == 4:
            report = pb.StatusReport(state=pb.DEVICE_STATE_RUNNING)
            report.reported_at.seconds = self.rng.choice((2**62, -(2**62)))
            raw = pb.AgentMessage(status=report).SerializeToString()
            return Frame("bad_status", raw, frozenset({"error:invalid_message"}))
        # an error message is free text: a NUL or a megabyte of it is kept, made safe
        error = self.rng.choice((self._nul("boom"), "e" * 200_000, "line\nbreak\ttab"))
        return self._status("bad_status", "silent", state=pb.DEVICE_STATE_FAILED, error=error)

    def _many_versions(self) -> Frame:
        """Reports of ever new versions (each would widen what telemetry is taken for)."""
        version = f"v{self.rng.getrandbits(40)}"
        return self._status("many_versions", "silent", model=self.model, version=version)


FRAME_CATEGORIES = (
    "valid",
    "resent",
    "random_bytes",
    "truncated",
    "bit_flipped",
    "oversized",
    "empty",
    "hello_again",
    "heartbeat",
    "command_result",
    "huge_count",
    "inconsistent",
    "not_finite",
    "wrong_version",
    "absurd_window",
    "incomplete",
    "no_batch_id",
    "labelled",
    "nul_text",
    "huge_batch_id",
    "bad_status",
    "many_versions",
)
