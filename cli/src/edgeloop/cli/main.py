"""The ``edgeloop`` command.

Each command group lives in its own module with its own ``typer.Typer`` and is mounted
here with ``app.add_typer`` (``edgeloop models …``, ``edgeloop rollout …``);
single commands (``edgeloop status``) are registered with ``app.command``.
"""

from __future__ import annotations

import typer

from edgeloop.cli import (
    audit,
    data,
    demo,
    devices,
    dlq,
    fleet,
    models,
    monitor,
    notify,
    rollout,
    shadow,
    signing,
    status,
    tokens,
    trace,
)

app = typer.Typer(
    help="edgeloop: closed-loop MLOps for models on fleets of edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("status", help=status.HELP)(status.status)
app.command("demo")(demo.demo)
app.command("trace")(trace.trace)
app.add_typer(models.app, name="models")
app.add_typer(models.validations_app, name="validations")
app.add_typer(devices.app, name="devices")
app.add_typer(signing.app, name="signing")
app.add_typer(fleet.app, name="fleet")
app.add_typer(rollout.app, name="rollout")
app.add_typer(rollout.list_app, name="rollouts")
app.add_typer(monitor.alarms_app, name="alarms")
app.add_typer(monitor.app, name="monitor")
app.add_typer(data.app, name="data")
app.add_typer(audit.app, name="audit")
app.add_typer(tokens.app, name="tokens")
app.add_typer(dlq.app, name="dlq")
app.add_typer(notify.app, name="notify")
app.add_typer(shadow.app, name="shadow")


@app.callback()
def main() -> None:
    """edgeloop: closed-loop MLOps for models on fleets of edge devices."""


if __name__ == "__main__":
    app()
