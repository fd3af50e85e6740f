"""The device's trust anchor: the image-signing keys pinned at enrolment.

On its first start the agent pins the keys of its enrolment bundle (``trust.json`` in
the state directory, written durably). From then on those pinned keys, and only they,
decide which images run: a key offered later (a replaced ``signing.pub``, a key id in a
desired state) is ignored. The one way to change the anchor is a **key rotation signed by
the pinned key** it replaces, with a version higher than the one held (TUF's root
rotation, with one key): a replayed, unsigned or foreign rotation changes nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeloop.contracts.signing import (
    SignatureError,
    fingerprint,
    key_id,
    load_public_key,
    rotation_previous,
    verify_rotation,
)
from edgeloop.edge.durable import write_durably

log = logging.getLogger("edgeloop.agent")

TRUST_FILE = "trust.json"


@dataclass(frozen=True)
class Rotated:
    """A rotation the device applied."""

    previous: str
    fingerprint: str
    version: int


class TrustAnchor:
    """The pinned signing keys of one device and the version of that trust."""

    def __init__(self, path: Path, keys: list[Ed25519PublicKey], version: int) -> None:
        self.path = path
        self.keys = {key_id(k): k for k in keys}
        self.version = version

    @classmethod
    def open(
        cls, state_dir: Path, configured: list[Ed25519PublicKey], stated: list[str]
    ) -> TrustAnchor:
        """The pinned anchor, pinning ``configured`` (the bundle's keys) on first use.

        Args:
            state_dir: The agent's state directory (``trust.json``).
            configured: The bundle's keys.
            stated: The fingerprints the enrolment stated for them ([]: not checked).

        Raises:
            SignatureError: on first use, a bundle key is not one the enrolment stated
                (the bundle was altered); later, ``trust.json`` is unreadable (the agent
                must not fall back to whatever key the bundle now holds).
        """
        path = state_dir / TRUST_FILE
        if not path.exists():
            for key in configured:
                if stated and fingerprint(key) not in stated:
                    raise SignatureError(
                        f"the bundle's signing key is {fingerprint(key)}, not one the "
                        f"enrolment stated ({', '.join(sorted(stated))}): the bundle was altered"
                    )
            anchor = cls(path, configured, 0)
            if configured:
                anchor._save()
                log.info("pinned the signing key(s) %s", ", ".join(anchor.fingerprints))
            return anchor
        try:
            raw = json.loads(path.read_text())
            keys = [load_public_key(str(k["key"])) for k in raw["keys"]]
            anchor = cls(path, keys, int(raw["version"]))
        except (OSError, ValueError, KeyError, TypeError, SignatureError) as exc:
            raise SignatureError(f"the pinned trust anchor {path} is unreadable: {exc}") from exc
        offered = {fingerprint(k) for k in configured} - set(anchor.fingerprints)
        if offered:
            log.warning(
                "ignoring signing key(s) %s of the configuration: this device pinned %s at "
                "enrolment; only a rotation signed by a pinned key changes that",
                ", ".join(sorted(offered)),
                ", ".join(anchor.fingerprints),
            )
        return anchor

    @property
    def fingerprints(self) -> list[str]:
        """The pinned keys' fingerprints."""
        return sorted(fingerprint(k) for k in self.keys.values())

    def rotate(self, statements: list[tuple[bytes, bytes]]) -> tuple[list[Rotated], list[str]]:
        """Apply the rotations among ``statements`` ((payload, signature) pairs) that
        continue this device's chain, oldest first.

        A statement for another chain (it replaces a key this device never pinned, or it
        is not newer than the trust held: already applied) is skipped; one that claims to
        replace a pinned key but does not verify is refused.

        Returns:
            (the rotations applied, the reasons of those refused).
        """
        applied: list[Rotated] = []
        refused: list[str] = []
        pending = sorted(
            ((rotation_previous(p) or ("", 0)), p, sig) for p, sig in statements if p or sig
        )
        pending.sort(key=lambda x: x[0][1])  # by version: a chain applies in order
        for (previous, version), payload, signature in pending:
            pinned = next((k for k in self.keys.values() if fingerprint(k) == previous), None)
            if pinned is None and previous:
                continue  # another chain's statement (e.g. one before this device enrolled)
            if version and version <= self.version:
                continue  # applied already (or a replay of an older one)
            try:
                if pinned is None:
                    raise SignatureError("key rotation refused: it names no pinned key")
                rotation = verify_rotation(pinned, self.version, payload, signature)
            except SignatureError as exc:
                refused.append(str(exc))
                continue
            del self.keys[key_id(pinned)]
            self.keys[key_id(rotation.key)] = rotation.key
            self.version = rotation.version
            applied.append(Rotated(rotation.previous, rotation.fingerprint, rotation.version))
        if applied:
            self._save()
            for r in applied:
                log.warning(
                    "signing key rotated (version %d): %s replaces %s",
                    r.version,
                    r.fingerprint,
                    r.previous,
                )
        for reason in refused:
            log.warning("%s", reason)
        return applied, refused

    def _save(self) -> None:
        keys = [
            {
                "fingerprint": fingerprint(k),
                "key": k.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ).decode(),
            }
            for k in self.keys.values()
        ]
        body = {"version": self.version, "keys": sorted(keys, key=lambda k: k["fingerprint"])}
        write_durably(self.path, json.dumps(body, indent=1, sort_keys=True).encode())
