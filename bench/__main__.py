"""``make bench``: every benchmark on servers of its own, figures printed and saved.

Each benchmark measures edgeloop and, in the same run on the same servers, the raw
baseline it is compared with. Results go to ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path

from bench import edge_gateway, kit_throughput, loop_latency
from edgeloop.devstack.servers import NatsServer, OciRegistry, Postgres

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    """Run the benchmarks."""
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--events", type=int, default=5000, help="events per kit run")
    parser.add_argument("--runs", type=int, default=5, help="repetitions (median reported)")
    parser.add_argument("--only", choices=["kit", "loop", "edge"], help="run one benchmark")
    parser.add_argument("--devices", type=int, default=10_000, help="sessions held (edge)")
    parser.add_argument("--rollout-devices", type=int, default=1000, help="agents (edge)")
    parser.add_argument("--burst", type=int, default=50, help="commits in the loop burst")
    args = parser.parse_args()
    if args.only in (None, "kit"):
        kit(args)
    if args.only in (None, "loop"):
        loop(args)
    if args.only in (None, "edge"):
        edge(args)


def edge(args: argparse.Namespace) -> None:
    """Gateway telemetry throughput vs raw nats-py, desired → running, many sessions."""
    RESULTS.mkdir(exist_ok=True)
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
        root = Path(tmp)
        nats = NatsServer(root / "nats").start()
        pg = Postgres.from_env(root / "pg").start()
        reg = OciRegistry(root / "registry").start()
        try:
            dsn = pg.create_database("bench_edge")
            common = (nats.url, dsn, reg.url, root)
            results["telemetry"] = asyncio.run(
                edge_gateway.telemetry(*common, devices=16, batches=16_000)
            )
            print(edge_gateway.dump(results["telemetry"]), flush=True)  # type: ignore[arg-type]
            results["rollout"] = asyncio.run(
                edge_gateway.rollout(*common, devices=args.rollout_devices)
            )
            print(edge_gateway.dump(results["rollout"]), flush=True)  # type: ignore[arg-type]
            results["connections"] = asyncio.run(
                edge_gateway.connections(*common, devices=args.devices, seconds=30)
            )
            print(edge_gateway.dump(results["connections"]), flush=True)  # type: ignore[arg-type]
        finally:
            reg.stop()
            pg.stop()
            nats.stop()
    (RESULTS / "edge_gateway.json").write_text(json.dumps(results, indent=2))


def loop(args: argparse.Namespace) -> None:
    """Commit → validation.passed through the registry, builder and validator processes."""
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
        root = Path(tmp)
        nats = NatsServer(root / "nats").start()
        pg = Postgres.from_env(root / "pg").start()
        reg = OciRegistry(root / "registry").start()
        try:
            dsn = pg.create_database("bench_loop")
            results = asyncio.run(loop_latency.run(nats.url, dsn, reg.url, root, args.burst))
        finally:
            reg.stop()
            pg.stop()
            nats.stop()
    (RESULTS / "loop_latency.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def kit(args: argparse.Namespace) -> None:
    """The kit's exactly-once path against raw nats-py."""
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
        nats = NatsServer(Path(tmp) / "nats").start()
        pg = Postgres.from_env(Path(tmp) / "pg").start()
        try:
            dsn = pg.create_database("bench")
            runs = []
            for i in range(args.runs):
                raw, kit = asyncio.run(kit_throughput.run(nats.url, dsn, args.events))
                runs.append({"raw": raw.per_second, "kit": kit.per_second})
                print(
                    f"run {i + 1}: raw nats-py {raw.per_second:8.0f} msg/s   "
                    f"kit exactly-once {kit.per_second:8.0f} events/s   "
                    f"ratio {raw.per_second / kit.per_second:4.1f}x",
                    flush=True,
                )
        finally:
            pg.stop()
            nats.stop()
    raw_med = sorted(r["raw"] for r in runs)[len(runs) // 2]
    kit_med = sorted(r["kit"] for r in runs)[len(runs) // 2]
    summary = {
        "benchmark": "kit_throughput",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "events_per_run": args.events,
        "runs": runs,
        "median": {
            "raw_msgs_per_s": raw_med,
            "kit_events_per_s": kit_med,
            "ratio": raw_med / kit_med,
        },
        "postgres": "external (DATABASE_URL)" if pg.external else "embedded",
    }
    (RESULTS / "kit_throughput.json").write_text(json.dumps(summary, indent=2))
    print(
        f"kit throughput (median of {args.runs}): {kit_med:.0f} exactly-once events/s; "
        f"raw nats-py {raw_med:.0f} msg/s; ratio {raw_med / kit_med:.1f}x "
        f"(targets: >= 1000/s, within 5x)"
    )


if __name__ == "__main__":
    main()
