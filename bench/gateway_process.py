"""``python -m bench.gateway_process``: the gateway as the benchmarks start it, with two
switches that exist only here, for measuring (never in the product):

- ``--telemetry-checks off``: the gateway's telemetry checks at entry
  (``edgeloop.gateway.trust``: version, clock skew, count consistency, size, labelled
  samples, and the per-device budget) are replaced by no-ops in this process, so a run
  shows what the checks cost against the same gateway without them. It says so loudly
  in its log;
- ``--profile PATH``: cProfile of the whole process, written to PATH when it stops
  (SIGTERM: the service shuts down gracefully).

Both runs of a comparison start here, so they differ only in the switch.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import sys
from typing import Any

log = logging.getLogger("bench.gateway_process")


def disable_telemetry_checks() -> None:
    """Make this process's gateway accept every telemetry batch without looking at it
    (and without spending any budget)."""
    from edgeloop.gateway import server, trust

    def check_batch(*_: Any, **__: Any) -> None:
        return None

    def take(self: trust.Budget, records: int, size: int) -> str | None:
        return None

    server.check_batch = check_batch  # type: ignore[attr-defined]  # the name server.py calls
    trust.Budget.take = take  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    """Start the gateway (``edgeloop.gateway.app.main``) as asked."""
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_process")
    parser.add_argument("--telemetry-checks", choices=("on", "off"), default="on")
    parser.add_argument("--profile", help="write a cProfile of the process here at exit")
    args = parser.parse_args(argv)

    from edgeloop.gateway.app import main as gateway_main

    if args.telemetry_checks == "off":
        disable_telemetry_checks()
        print(
            "WARNING: BENCHMARK GATEWAY - telemetry checks at entry are OFF in this process "
            "(bench.gateway_process --telemetry-checks off). Never run a gateway like this "
            "for devices.",
            file=sys.stderr,
            flush=True,
        )
    if args.profile is None:
        gateway_main()
        return
    profile = cProfile.Profile()
    try:
        profile.runcall(gateway_main)
    finally:
        profile.dump_stats(args.profile)


if __name__ == "__main__":
    main()
