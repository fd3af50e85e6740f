"""The pinned trust anchor: rotations continue its chain or change nothing."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeloop.contracts.signing import fingerprint, rotation_payload
from edgeloop.edge.trust import TrustAnchor


def _rotation(old: Ed25519PrivateKey, new: Ed25519PrivateKey, version: int) -> tuple[bytes, bytes]:
    payload = rotation_payload(fingerprint(old), new.public_key(), version)
    return payload, old.sign(payload)


def test_a_chain_of_rotations_applies_in_order_and_a_replay_changes_nothing(
    tmp_path: Path,
) -> None:
    k1, k2, k3 = (Ed25519PrivateKey.generate() for _ in range(3))
    anchor = TrustAnchor.open(tmp_path, [k1.public_key()], [])
    back = _rotation(k2, k1, 3)  # k2 → k1 again, later on
    applied, refused = anchor.rotate([_rotation(k2, k3, 2), _rotation(k1, k2, 1)])
    assert [r.version for r in applied] == [1, 2]
    assert not refused
    assert anchor.fingerprints == [fingerprint(k3)]

    # pinned after a restart; the key the bundle now offers is ignored
    anchor = TrustAnchor.open(tmp_path, [k1.public_key()], [])
    assert anchor.fingerprints == [fingerprint(k3)]
    assert anchor.version == 2
    # statements of an earlier link (replays) and of another chain: skipped, not refused
    applied, refused = anchor.rotate([_rotation(k1, k2, 1), back, _rotation(k3, k1, 2)])
    assert not applied
    assert not refused
    assert anchor.fingerprints == [fingerprint(k3)]


def test_a_rotation_naming_the_pinned_key_but_signed_otherwise_is_refused(
    tmp_path: Path,
) -> None:
    k1, k2, foreign = (Ed25519PrivateKey.generate() for _ in range(3))
    anchor = TrustAnchor.open(tmp_path, [k1.public_key()], [])
    payload = rotation_payload(fingerprint(k1), k2.public_key(), 1)
    applied, refused = anchor.rotate([(payload, foreign.sign(payload)), (payload, b"")])
    assert not applied
    assert any("not signed by the pinned key" in r for r in refused)
    assert any(r.endswith("it is not signed") for r in refused)
    assert anchor.fingerprints == [fingerprint(k1)]
