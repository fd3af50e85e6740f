"""The monitor's cache of reference profiles (``References``): a version's profile is
immutable and kept; that a version is unknown is not — a device that names ever new
versions (each taken by the gateway once reported) must not grow the cache without bound,
and a version registered after its telemetry first came must be found."""

from __future__ import annotations

import pytest

from edgeloop.monitor import references
from edgeloop.monitor.aggregate import Reference
from edgeloop.monitor.references import References, UnknownVersion

PROFILE = {"features": [{"name": "f", "edges": [0.0, 1.0], "counts": [1, 2, 3]}]}


class FakeRegistry:
    """What ``References`` fetches: the registered versions' profiles, and how often."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, str], Reference] = {}
        self.validating: set[tuple[str, str]] = set()
        self.fetches = 0

    async def fetch(self, model: str, version: str) -> tuple[Reference | None, bool]:
        self.fetches += 1
        return self.known.get((model, version)), (model, version) in self.validating


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> tuple[References, FakeRegistry]:
    refs = References("http://registry.invalid", "token")
    fake = FakeRegistry()
    monkeypatch.setattr(refs, "_fetch", fake.fetch)
    return refs, fake


async def test_a_known_profile_is_fetched_once(registry: tuple[References, FakeRegistry]) -> None:
    refs, fake = registry
    fake.known[("m", "1")] = Reference.from_profile("m", "1", PROFILE)
    for _ in range(5):
        assert (await refs.get("m", "1")).names == ["f"]
    assert fake.fetches == 1


async def test_ever_new_unknown_versions_do_not_grow_the_cache(
    registry: tuple[References, FakeRegistry],
) -> None:
    refs, _ = registry
    for i in range(3 * references.MAX_UNKNOWN):
        with pytest.raises(UnknownVersion):
            await refs.get("m", f"v{i}")
    assert len(refs._unknown) == references.MAX_UNKNOWN


async def test_a_version_registered_later_is_found(
    registry: tuple[References, FakeRegistry], monkeypatch: pytest.MonkeyPatch
) -> None:
    refs, fake = registry
    clock = [1000.0]
    monkeypatch.setattr(references.time, "monotonic", lambda: clock[0])
    with pytest.raises(UnknownVersion):
        await refs.get("m", "2")
    fake.known[("m", "2")] = Reference.from_profile("m", "2", PROFILE)
    with pytest.raises(UnknownVersion):  # remembered as unknown for a while (no storm)
        await refs.get("m", "2")
    assert fake.fetches == 1
    clock[0] += references.UNKNOWN_SECONDS + 1
    assert (await refs.get("m", "2")).version == "2"
    assert fake.fetches == 2


async def test_a_version_still_being_validated_is_asked_again_for_its_calibration(
    registry: tuple[References, FakeRegistry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calibration map comes with the validation report, which may come after the
    profile: until the validation ended the version is asked again now and then."""
    refs, fake = registry
    clock = [1000.0]
    monkeypatch.setattr(references.time, "monotonic", lambda: clock[0])
    fake.known[("m", "3")] = Reference.from_profile("m", "3", PROFILE)
    fake.validating.add(("m", "3"))
    await refs.get("m", "3")
    await refs.get("m", "3")
    assert fake.fetches == 1
    fake.validating.clear()
    clock[0] += references.UNKNOWN_SECONDS + 1
    await refs.get("m", "3")
    assert fake.fetches == 2
    clock[0] += references.UNKNOWN_SECONDS + 1
    await refs.get("m", "3")  # validated: kept for good
    assert fake.fetches == 2
