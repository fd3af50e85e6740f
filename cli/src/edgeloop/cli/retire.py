"""``edgeloop models retire NAME@V``: retire a version through the deployer — refused while
devices run it, unless ``--replace-with`` names the version a rollout moves them to first;
the registry retires it once no device runs it, and archives it after its retention."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import typer

from edgeloop.cli.api import DEPLOYER, JsonOption, echo_json, version_ref
from edgeloop.cli.rollout import rollout_options

#: Where a retirement ends.
ENDED = ("retired", "failed")


def describe(t: dict[str, Any]) -> str:
    """One line of where a retirement is."""
    ref = f"{t['model']}@{t['version']}"
    if t["state"] == "retired":
        return f"{ref} retired" + (
            f"; its {len(t['devices'])} device(s) run {t['replace_model']}@"
            f"{t['replace_version']} (rollout {t['rollout_id']})"
            if t["rollout_id"]
            else " (no device ran it)"
        )
    if t["state"] == "failed":
        return f"{ref} NOT retired (it stays deprecated): {t['detail']}"
    if t["state"] == "replacing":
        return (
            f"rollout {t['rollout_id']} moves {len(t['devices'])} device(s) to "
            f"{t['replace_model']}@{t['replace_version']} ({t['rollout_state']}); {ref} is "
            f"retired when it completes — follow it: edgeloop rollout status "
            f"{t['rollout_id']} --watch"
        )
    return f"{ref} is being retired ({t['state']})"


def retire(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    reason: Annotated[str, typer.Option(help="why, for the record")],
    replace_with: Annotated[
        str | None,
        typer.Option(help="NAME@VERSION: move the devices running it there first, by a rollout"),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow it until it ends")] = False,
    waves: Annotated[str, typer.Option(help="waves of the replacement rollout")] = "1,10%,50%,100%",
    bake: Annotated[str, typer.Option(help="its watch time per wave")] = "30s",
    converge_timeout: Annotated[str, typer.Option(help="its convergence timeout")] = "2m",
    json_out: JsonOption = False,
) -> None:
    """Retire a version: no new rollouts or aliases, archived after the retention."""
    name, version = version_ref(ref)
    body = {
        "model": name,
        "version": version,
        "reason": reason,
        "replace_with": replace_with,
        "retirement_id": str(uuid.uuid4()),
        **rollout_options(waves, bake, None, converge_timeout),
    }
    t = DEPLOYER.request("POST", "/v1/retirements", json=body)
    if not json_out:
        typer.echo(f"retirement {t['retirement_id']}: {describe(t)}")
    last = t["state"], t["rollout_state"]
    while wait and t["state"] not in ENDED:
        time.sleep(1)
        t = DEPLOYER.request("GET", f"/v1/retirements/{t['retirement_id']}")
        if (t["state"], t["rollout_state"]) != last and not json_out:
            typer.echo(describe(t))
        last = t["state"], t["rollout_state"]
    if json_out:  # the retirement as it ended (with --wait) or as it started
        echo_json(t)
    if t["state"] == "failed":
        raise typer.Exit(1)
