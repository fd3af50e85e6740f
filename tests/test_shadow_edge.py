"""A challenger's image on the device goes through exactly the checks of any desired
image (signature with a pinned key, signed claims, anti-rollback, download through the
gateway), never becomes the model acted on, and never raises the anti-rollback floor; its
telemetry is marked as a challenger's. Real gateway, agent, NATS, PostgreSQL, OCI
registry, onnxruntime."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgeloop.contracts import subjects as s
from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.twin import ShadowModel
from edgeloop.devstack.testing import eventually, stream_messages
from edgeloop.edge.agent import Agent
from edgeloop.kit.oci.signing import generate_keypair
from tests.edge_harness import EdgeStack, Image, wait_state
from tests.modelzoo import classifier

pytestmark = pytest.mark.timeout(180)


def _challenger(image: Image, **policy: Any) -> ShadowModel:
    doc = image.desired()
    return ShadowModel(
        model=doc.model,
        version=doc.version,
        image=doc.image,
        manifest_digest=image.digest,
        model_digest=doc.model_digest,
        **{"sample": 1.0, "max_overhead": 100.0, **policy},
    )


async def _shadow_error(agent: Agent, text: str) -> bool:
    return text in agent.shadow_error


async def test_a_challenger_image_is_checked_like_any_and_never_acted_on(
    edge: EdgeStack, unique: str
) -> None:
    model = f"s{unique}"
    first = await edge.publish_image(model, "1", classifier("iris").onnx)  # release 1
    champion = await edge.publish_image(model, "2", classifier("iris").onnx)  # release 2
    device = f"dev-{unique}"
    agent = await edge.start_agent(await edge.enroll(device))
    await edge.set_desired(device, champion.desired())
    await wait_state(agent, pb.DEVICE_STATE_RUNNING, version="2")

    # unsigned, signed by a key the device never pinned, an older release: refused, the
    # champion runs on and the device's state stays its own
    unsigned = await edge.publish_image(model, "3", classifier("iris", seed=1).onnx, sign=False)
    await edge.set_desired(device, champion.desired(shadow=_challenger(unsigned)))
    await eventually(lambda: _shadow_error(agent, "the image is not signed"), what="unsigned")
    other_key, _ = generate_keypair()
    foreign = await edge.publish_image(model, "4", classifier("iris").onnx, key=other_key)
    await edge.set_desired(device, champion.desired(shadow=_challenger(foreign)))
    await eventually(lambda: _shadow_error(agent, "signature check failed"), what="foreign key")
    await edge.set_desired(device, champion.desired(shadow=_challenger(first)))
    await eventually(lambda: _shadow_error(agent, "anti-rollback"), what="older release")
    assert agent.challenger is None
    assert agent.state == pb.DEVICE_STATE_RUNNING
    assert agent.running is not None
    assert agent.running.installed.version == "2"

    # a genuine newer release runs beside the champion; only the champion is acted on
    newer = await edge.publish_image(model, "5", classifier("iris", c=1e-5).onnx)  # release 5
    acted: list[list[str]] = []
    agent.on_outputs = lambda rows, labels: acted.append(labels)
    await edge.set_desired(device, champion.desired(shadow=_challenger(newer)))
    await eventually(lambda: _running_challenger(agent), what="the challenger loaded")
    assert agent.shadow_error == ""
    assert agent.store.release_floor(model) == 2  # a challenger does not raise the floor
    assert agent.running.installed.version == "2"
    reported = await edge.reported(device)
    assert reported is not None
    assert reported["version"] == "2"
    agent.on_outputs = None
    for _ in range(5):
        agent.infer_once()
    agent.flush_telemetry()

    # both outputs went to telemetry: the champion's batch, and the challenger's, marked
    async def batches() -> list[dict[str, Any]] | None:
        msgs = await stream_messages(edge.js, s.STREAM_TELEMETRY, s.stored_telemetry(model, device))
        found = [json.loads(m.data) for m in msgs]
        return found if len(found) >= 2 else None

    found = await eventually(batches, what="two batches on the bus")
    mine = [b for b in found if b.get("shadow") is None]
    theirs = [b for b in found if b.get("shadow") is not None]
    assert [b["version"] for b in mine] == ["2"]
    assert [b["version"] for b in theirs] == ["5"]
    shadow = theirs[0]["shadow"]
    assert shadow["champion_version"] == "2"
    assert shadow["compared"] == theirs[0]["count"] == mine[0]["count"]
    assert shadow["agreed"] + sum(f["count"] for f in shadow["flips"]) == shadow["compared"]
    assert shadow["champion_prediction_counts"] == mine[0]["prediction_counts"]

    # the challenger taken off: the device runs its champion alone again
    await edge.set_desired(device, champion.desired())
    await eventually(lambda: _no_challenger(agent), what="the challenger removed")
    assert agent.running.installed.version == "2"


async def _running_challenger(agent: Agent) -> bool:
    return agent.challenger is not None


async def _no_challenger(agent: Agent) -> bool:
    return agent.challenger is None
