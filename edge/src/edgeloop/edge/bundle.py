"""The agent bundle ``edgeloop devices enroll`` and the fleet simulator write: the
enrolment answer of the gateway's API as files an agent starts from."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_bundle(directory: Path, enrolment: Mapping[str, Any]) -> Path:
    """Write ``agent.json``, ``device.crt``, ``device.key`` (0600), ``ca.crt`` and
    ``signing.pub``; the path of ``agent.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "device.crt").write_text(enrolment["certificate"])
    fd = os.open(directory / "device.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(enrolment["private_key"])
    (directory / "ca.crt").write_text(enrolment["ca_certificate"])
    trusted = []
    if enrolment.get("signing_public_key"):
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
                "state_dir": "state",
            },
            indent=1,
        )
        + "\n"
    )
    return config
