"""Replaying a dead letter of a partitioned consumer (``edgeloop.kit.dlq``), against a real
nats-server: the replay lands in the same partition, goes to the same durable, and leaves
the DLQ only once that durable acknowledged it."""

from __future__ import annotations

import json

from kit_helpers import connect

from edgeloop.contracts import subjects as s
from edgeloop.devstack.servers import NatsServer
from edgeloop.kit import dlq
from edgeloop.kit.bus import ConsumerSpec, declare_consumer, declare_topology
from edgeloop.kit.consumer import DeadLetters


async def test_a_partitioned_dead_letter_is_replayed_into_its_partition(
    nats_private: NatsServer, unique: str
) -> None:
    nc, js = await connect(nats_private.url)
    try:
        await declare_topology(js)
        payload = json.dumps({"event_id": f"00000000-0000-0000-0000-{unique[:12]:0>12}"})
        ack = await js.publish(s.telemetry_subject(f"m{unique}", "dev-1"), payload.encode())
        stored = (await js.get_msg(s.STREAM_TELEMETRY, ack.seq)).subject
        assert stored is not None
        partition = int(stored.rsplit(".", 1)[1])
        durable = f"{s.CONSUMER_MONITOR_TELEMETRY}-{partition}"
        await declare_consumer(
            js,
            ConsumerSpec(
                stream=s.STREAM_TELEMETRY,
                durable=durable,
                filter_subjects=(s.telemetry_partition(partition),),
            ),
        )
        sub = await js.pull_subscribe_bind(durable, s.STREAM_TELEMETRY)
        (msg,) = await sub.fetch(1, timeout=5)
        await DeadLetters(js).send(msg, durable, "PermanentError: no such model", 1)
        await msg.term()

        (letter,) = await dlq.read(js, f"{s.TELEMETRY_PREFIX}.>")
        assert (letter.subject, letter.consumer, letter.stream_seq) == (stored, durable, ack.seq)
        assert letter.payload == payload.encode()

        # a consumer that does not acknowledge: the dead letter stays
        replay = dlq.Replay(letter)
        await dlq.check_consumers(js, [replay])
        assert replay.outcome == dlq.REPLAYING
        await dlq.publish(js, replay)
        await dlq.settle(js, [replay], timeout=0.5)
        assert replay.outcome == dlq.NOT_ACKED
        assert f"ack floor is #{ack.seq}" in replay.detail

        # the replay is stored under the same subject, so the same partition's durable gets it
        again = await js.get_msg(s.STREAM_TELEMETRY, replay.seq)
        assert again.subject == stored
        assert again.data == payload.encode()
        (redelivered,) = await sub.fetch(1, timeout=5)
        assert redelivered.metadata.sequence.stream == replay.seq
        assert redelivered.headers is not None
        assert redelivered.headers[dlq.REPLAY_OF] == str(letter.id)

        # a retried replay is stored once (Nats-Msg-Id replay:<id>)
        retried = dlq.Replay(letter)
        await dlq.publish(js, retried)
        assert retried.seq == replay.seq

        await redelivered.ack_sync()
        await dlq.settle(js, [retried], timeout=5)
        assert retried.outcome == dlq.ACKED
        await dlq.remove(js, retried)
        assert await dlq.read(js, f"{s.TELEMETRY_PREFIX}.>") == []

        # a dead letter whose consumer is gone is not replayed
        orphan = dlq.Replay(dlq.DeadLetter(**{**letter.__dict__, "consumer": "nobody"}))
        await dlq.check_consumers(js, [orphan])
        assert orphan.outcome == dlq.FAILED

        # nor one whose payload was cut to fit the DLQ: it is not the original event
        cut = dlq.Replay(dlq.DeadLetter(**{**letter.__dict__, "truncated": 2 << 20}))
        await dlq.check_consumers(js, [cut])
        assert cut.outcome == dlq.FAILED
        assert "cut from 2097152 bytes" in cut.detail
    finally:
        await nc.close()
