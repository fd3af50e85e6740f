"""``edgeloop signing …``: the image-signing key's fingerprint and signed key rotations.

Both work offline on key files: the fingerprint is what an operator compares, out of
band, with the one ``edgeloop devices enroll`` prints; a rotation is made with the old
private key (keep it offline) and served to devices by the gateway
(``EDGELOOP_GATEWAY_SIGNING_KEY_ROTATIONS``, a directory of these files).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Annotated

import typer

from edgeloop.cli.api import JsonOption, echo_json
from edgeloop.contracts.signing import SignatureError, fingerprint, load_public_key
from edgeloop.kit.oci.signing import load_private_key, sign_rotation

app = typer.Typer(help="Image-signing key: fingerprint, signed rotation.", no_args_is_help=True)


def _key(path: Path) -> str:
    try:
        return fingerprint(load_public_key(path))
    except SignatureError:
        return fingerprint(load_private_key(path))


@app.command("fingerprint")
def show_fingerprint(
    key: Annotated[Path, typer.Argument(help="the signing key, public or private (PEM)")],
    as_json: JsonOption = False,
) -> None:
    """Print a key's fingerprint (sha256 of its raw public bytes)."""
    try:
        fp = _key(key)
    except SignatureError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"key": str(key), "fingerprint": fp}) if as_json else fp)


@app.command()
def rotate(
    old_key: Annotated[Path, typer.Argument(help="the current signing key (private PEM)")],
    new_key: Annotated[Path, typer.Argument(help="the key that replaces it (public PEM)")],
    version: Annotated[
        int, typer.Option(min=1, help="the rotation's version: higher than any before")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the rotation")],
    as_json: JsonOption = False,
) -> None:
    """Sign that NEW_KEY replaces OLD_KEY; devices that pinned OLD_KEY accept it."""
    try:
        sig = sign_rotation(load_private_key(old_key), load_public_key(new_key), version)
    except SignatureError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    body = {
        "payload": base64.b64encode(sig.payload).decode(),
        "signature": sig.signature_b64,
    }
    out.write_text(json.dumps(body, indent=1) + "\n")
    claims = json.loads(sig.payload)
    if as_json:
        echo_json({"rotation": str(out), **claims})
        return
    typer.echo(f"rotation {version}: {claims['fingerprint']} replaces {claims['previous']} → {out}")
