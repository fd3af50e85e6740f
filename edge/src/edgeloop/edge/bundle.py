"""The agent bundle ``edgeloop devices enroll`` and the fleet simulator write: the
enrolment answer of the gateway's API as files an agent starts from.

The bundle carries the platform's image-signing key and its fingerprint; the agent pins
that key on its first start (``edgeloop.edge.trust``). The key arrives over the
gateway's API, so whoever enrols compares the fingerprint out of band (``edgeloop
devices enroll`` prints it; ``--signing-key-fingerprint`` checks it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeloop.contracts.signing import SignatureError, fingerprint, load_public_key


def normalise_fingerprint(text: str) -> str:
    """``sha256:<hex>`` from a fingerprint as people copy it (case, colons, spaces)."""
    hexpart = text.strip().lower().removeprefix("sha256:").replace(":", "").replace(" ", "")
    return f"sha256:{hexpart}"


def signing_key_fingerprint(enrolment: Mapping[str, Any], expected: str | None = None) -> str:
    """The fingerprint of the enrolment's signing key ("" when it has none).

    Raises:
        SignatureError: the key is not an Ed25519 PEM key, the answer states another
            fingerprint for it, or it is not the ``expected`` one (checked out of band).
    """
    pem = enrolment.get("signing_public_key")
    if not pem:
        if expected:
            raise SignatureError("the enrolment carries no signing key to check")
        return ""
    actual = fingerprint(load_public_key(str(pem)))
    stated = enrolment.get("signing_key_fingerprint")
    if stated and normalise_fingerprint(str(stated)) != actual:
        raise SignatureError(f"the enrolment's signing key is {actual}, its answer says {stated}")
    if expected and normalise_fingerprint(expected) != actual:
        raise SignatureError(
            f"the signing key offered at enrolment is {actual}, not the expected "
            f"{normalise_fingerprint(expected)}: do not trust this gateway's answer"
        )
    return actual


def write_bundle(
    directory: Path, enrolment: Mapping[str, Any], *, expected_fingerprint: str | None = None
) -> Path:
    """Write ``agent.json``, ``device.crt``, ``device.key`` (0600), ``ca.crt`` and
    ``signing.pub``; the path of ``agent.json``.

    Raises:
        SignatureError: the signing key does not match ``expected_fingerprint`` (nothing
            is written) or the fingerprint the answer states.
    """
    key_fingerprint = signing_key_fingerprint(enrolment, expected_fingerprint)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "device.crt").write_text(enrolment["certificate"])
    fd = os.open(directory / "device.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(enrolment["private_key"])
    (directory / "ca.crt").write_text(enrolment["ca_certificate"])
    trusted = []
    if key_fingerprint:
        (directory / "signing.pub").write_text(enrolment["signing_public_key"])
        trusted.append("signing.pub")
    config = directory / "agent.json"
    config.write_text(
        json.dumps(
            {
                "device_id": enrolment["device_id"],
                "gateway": enrolment["gateway_address"],
                "labels": enrolment.get("labels", {}),
                "ca_cert": "ca.crt",
                "cert": "device.crt",
                "key": "device.key",
                "trusted_keys": trusted,
                "trusted_key_fingerprints": [key_fingerprint] if key_fingerprint else [],
                "state_dir": "state",
            },
            indent=1,
        )
        + "\n"
    )
    return config
