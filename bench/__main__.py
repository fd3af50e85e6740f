"""``make bench``: every benchmark on servers of its own, figures printed and saved.

Each benchmark measures edgeloop and, in the same run on the same servers, the raw
baseline it is compared with. Results go to ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import (
    cbpe,
    console,
    deployer_rollout,
    edge_gateway,
    kit_throughput,
    loop_latency,
    monitor_aggregate,
    monitor_alarm,
    nats_permissions,
    notify,
    offline_rollout,
    outages,
    prom,
    shadow_overhead,
    windows,
)
from edgeloop.devstack.servers import NatsCluster, NatsServer, OciRegistry, Postgres

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    """Run the benchmarks."""
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--events", type=int, default=5000, help="events per kit run")
    parser.add_argument("--runs", type=int, default=5, help="repetitions (median reported)")
    parser.add_argument(
        "--only",
        choices=[
            "kit",
            "kit-cluster",
            "loop",
            "edge",
            "edge-gateway",
            "edge-connections",
            "deploy",
            "monitor",
            "nats-auth",
            "outages",
            "prom",
            "notify",
            "webconsole",
            "windows",
            "offline-rollout",
            "cbpe",
            "shadow",
        ],
        help="run one benchmark",
    )
    parser.add_argument("--devices", type=int, default=10_000, help="sessions held (edge)")
    parser.add_argument("--rollout-devices", type=int, default=1000, help="agents (edge, deploy)")
    parser.add_argument(
        "--window-devices", type=int, default=100, help="agents (windows: budget and window)"
    )
    parser.add_argument("--burst", type=int, default=50, help="commits in the loop burst")
    parser.add_argument(
        "--gateway-batches", type=int, default=16_000, help="batches per run (edge-gateway)"
    )
    args = parser.parse_args()
    if args.only in (None, "kit"):
        kit(args)
    if args.only in (None, "kit-cluster"):
        kit(args, cluster=True)
    if args.only in (None, "loop"):
        loop(args)
    if args.only in (None, "deploy"):
        deploy(args)
    if args.only in (None, "offline-rollout"):
        offline(args)
    if args.only in (None, "windows"):
        window_budget(args)
    if args.only in (None, "monitor"):
        _save("monitor_aggregate.json", monitor_aggregate.run())
        with servers("bench_alarm") as common:
            _save("monitor_alarm.json", asyncio.run(monitor_alarm.run(*common)))
    if args.only in (None, "cbpe"):
        _save("cbpe.json", cbpe.run(runs=max(args.runs, 3)))
    if args.only in (None, "nats-auth"):
        with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
            _save("nats_permissions.json", asyncio.run(nats_permissions.run(Path(tmp))))
    if args.only in (None, "outages"):
        with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
            _save(
                "outages.json",
                asyncio.run(outages.run(Path(tmp), runs=max(args.runs, 3))),
            )
    if args.only in (None, "prom"):
        with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
            _save("prom.json", asyncio.run(prom.run(Path(tmp), runs=max(args.runs, 3))))
    if args.only in (None, "notify"):
        with servers("bench_notify") as common:
            _save("notify.json", asyncio.run(notify.run(*common, runs=max(args.runs, 3))))
    if args.only in (None, "webconsole"):
        with servers("bench_console") as common:
            _save(
                "console.json",
                asyncio.run(console.run(*common, devices=10_000, rollouts=100, runs=args.runs)),
            )
    if args.only in (None, "edge", "edge-connections"):
        edge(args, connections_only=args.only == "edge-connections")
    if args.only in (None, "edge-gateway"):
        edge_checks(args)
    if args.only in (None, "shadow"):
        _save("shadow_overhead.json", shadow_overhead.run(runs=max(args.runs, 3)))


@contextlib.contextmanager
def servers(database: str) -> Iterator[tuple[str, str, str, Path]]:
    """NATS, PostgreSQL and an OCI registry of the benchmark's own, in a temporary
    directory: (nats url, dsn, registry url, directory)."""
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
        root = Path(tmp)
        nats = NatsServer(root / "nats").start()
        pg = Postgres.from_env(root / "pg").start()
        reg = OciRegistry(root / "registry").start()
        try:
            yield nats.url, pg.create_database(database), reg.url, root
        finally:
            reg.stop()
            pg.stop()
            nats.stop()


def _save(name: str, results: object) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2), flush=True)


def edge(args: argparse.Namespace, *, connections_only: bool = False) -> None:
    """Gateway telemetry throughput vs raw nats-py, desired → running, many sessions."""
    results: dict[str, object] = {}
    with servers("bench_edge") as common:
        if not connections_only:
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
    _save("edge_connections.json" if connections_only else "edge_gateway.json", results)


def edge_checks(args: argparse.Namespace) -> None:
    """Gateway telemetry throughput with its telemetry checks at entry (version, clock
    skew, count consistency, size, per-device budget) against the same gateway with them
    switched off (``bench.gateway_process --telemetry-checks off``, a switch of the
    benchmark only), ``--runs`` times each, alternating, on the same servers."""
    devices, batches = 16, args.gateway_batches
    runs: list[dict[str, Any]] = []
    loads: list[list[float]] = []
    with servers("bench_edge_checks") as common:

        def telemetry(**kw: Any) -> dict[str, Any]:
            return asyncio.run(
                edge_gateway.telemetry(*common, devices=devices, raw_baseline=False, **kw)
            )

        # not measured: the servers' first streams, tables and caches
        telemetry(batches=batches // 10, name="warmup")
        for i in range(max(args.runs, 3)):
            # alternate which goes first, so neither always meets a warmer machine
            for checks in (True, False) if i % 2 == 0 else (False, True):
                loads.append([round(x, 2) for x in os.getloadavg()])
                name = f"r{i}{'on' if checks else 'off'}"
                result = telemetry(batches=batches, telemetry_checks=checks, name=name)
                runs.append({"run": i + 1, "load_avg_1_5_15": loads[-1], **result})
                print(
                    f"run {i + 1} checks {'on ' if checks else 'off'}: "
                    f"{result['gateway_records_per_s']:>9} records/s "
                    f"({result['gateway_batches_per_s']} batches/s), gateway "
                    f"{result['gateway_cpu_us_per_batch']} us CPU/batch, "
                    f"load {loads[-1][0]}",
                    flush=True,
                )
        loads.append([round(x, 2) for x in os.getloadavg()])

    def spread(checks: bool, key: str) -> dict[str, float]:
        values = sorted(float(r[key]) for r in runs if r["telemetry_checks"] is checks)
        return {"min": values[0], "median": statistics.median(values), "max": values[-1]}

    records = {
        "checks_on": spread(True, "gateway_records_per_s"),
        "checks_off": spread(False, "gateway_records_per_s"),
    }
    cpu = {
        "checks_on": spread(True, "gateway_cpu_us_per_batch"),
        "checks_off": spread(False, "gateway_cpu_us_per_batch"),
    }
    on, off = records["checks_on"]["median"], records["checks_off"]["median"]
    cpu_on, cpu_off = cpu["checks_on"]["median"], cpu["checks_off"]["median"]
    # each round's two runs met about the same machine: their ratio drifts less with the
    # load of others than the medians do
    paired = [
        a["gateway_records_per_s"] / b["gateway_records_per_s"]
        for a in runs
        for b in runs
        if a["run"] == b["run"] and a["telemetry_checks"] and not b["telemetry_checks"]
    ]
    cost = {
        "throughput_pct": round((off - on) / off * 100, 1),
        "gateway_cpu_pct": round((cpu_on - cpu_off) / cpu_off * 100, 1),
        "paired_throughput_pct": round((1 - statistics.median(paired)) * 100, 1),
    }
    load = {"before": loads[0], "after": loads[-1], "max_1min": max(x[0] for x in loads)}
    _save(
        "edge_gateway_checks.json",
        {
            "benchmark": "edge_gateway_checks",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "devices": devices,
            "batches_per_run": batches,
            "records_per_batch": 256,
            "load_avg_1_5_15": load,
            "records_per_s": records,
            "gateway_cpu_us_per_batch": cpu,
            "median_cost_of_checks": cost,
            "in_process_us_per_batch": edge_gateway.checks_in_process(),
            "runs": runs,
        },
    )
    for key in ("checks_on", "checks_off"):
        r, c = records[key], cpu[key]
        print(
            f"telemetry {key.replace('_', ' ')}: records/s min {r['min']:.0f} median "
            f"{r['median']:.0f} max {r['max']:.0f}; gateway us CPU/batch min {c['min']} "
            f"median {c['median']} max {c['max']}"
        )
    print(f"median cost of the checks: {cost}; load average {load}")


def deploy(args: argparse.Namespace) -> None:
    """One wave to N agents; rollback of N devices after a failing verdict."""
    with servers("bench_deploy") as common:
        results = asyncio.run(deployer_rollout.run(*common, devices=args.rollout_devices))
    _save("deployer_rollout.json", results)


def offline(args: argparse.Namespace) -> None:
    """A rollout with 30 % of its devices offline against one with all online, ``--runs``
    times on fresh servers."""
    runs = []
    for i in range(args.runs):
        with servers(f"bench_offline_{i}") as common:
            result = asyncio.run(offline_rollout.run(*common, devices=30, seed=i))
        print(f"run {i + 1}: {json.dumps(result)}", flush=True)
        runs.append(result)
    summary: dict[str, Any] = {"runs": runs}
    for key in ("all_online_s", "offline_30_s"):
        values = sorted(r[key] for r in runs)
        summary[key] = {"min": values[0], "median": statistics.median(values), "max": values[-1]}
    summary["load_after"] = [round(x, 2) for x in os.getloadavg()]
    _save("offline_rollout.json", summary)


def window_budget(args: argparse.Namespace) -> None:
    """A rollout with a disruption budget and a maintenance window against one without,
    ``--runs`` times on fresh servers."""
    runs = []
    for i in range(args.runs):
        with servers(f"bench_windows_{i}") as common:
            result = asyncio.run(windows.run(*common, devices=args.window_devices))
        print(f"run {i + 1}: {json.dumps(result)}", flush=True)
        runs.append(result)
    summary: dict[str, Any] = {"devices": args.window_devices, "runs": runs}
    for part, key in (
        ("baseline", "all_running_s"),
        ("budget", "opening_to_all_running_s"),
        ("budget", "opening_to_first_write_s"),
        ("baseline", "most_activating"),
        ("budget", "most_activating"),
    ):
        values = [r[part][key] for r in runs if r[part][key] is not None]
        values.sort()
        summary[f"{part}.{key}"] = {
            "min": values[0],
            "median": statistics.median(values),
            "max": values[-1],
        }
    summary["load_after"] = [round(x, 2) for x in os.getloadavg()]
    _save("windows.json", summary)


def loop(args: argparse.Namespace) -> None:
    """Commit → validation.passed through the registry, builder and validator processes."""
    with servers("bench_loop") as common:
        results = asyncio.run(loop_latency.run(*common, args.burst))
    _save("loop_latency.json", results)


def kit(args: argparse.Namespace, *, cluster: bool = False) -> None:
    """The kit's exactly-once path against raw nats-py; with ``cluster``, on a 3-node
    NATS cluster with R3 streams (both paths connect with every node's URL)."""
    RESULTS.mkdir(exist_ok=True)
    name = "kit_cluster" if cluster else "kit_throughput"
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as tmp:
        nats: NatsServer | NatsCluster
        if cluster:
            nats = NatsCluster(Path(tmp) / "nats").start()
            # what the services' declare_topology reads (the processes inherit it)
            os.environ["EDGELOOP_NATS_REPLICAS"] = "3"
        else:
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
            os.environ.pop("EDGELOOP_NATS_REPLICAS", None)
            pg.stop()
            nats.stop()
    raw_all = sorted(r["raw"] for r in runs)
    kit_all = sorted(r["kit"] for r in runs)
    raw_med, kit_med = statistics.median(raw_all), statistics.median(kit_all)
    summary = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "nats": "3-node cluster, R3 streams" if cluster else "one server, R1 streams",
        "events_per_run": args.events,
        "runs": runs,
        "min": {"raw_msgs_per_s": raw_all[0], "kit_events_per_s": kit_all[0]},
        "median": {
            "raw_msgs_per_s": raw_med,
            "kit_events_per_s": kit_med,
            "ratio": raw_med / kit_med,
        },
        "max": {"raw_msgs_per_s": raw_all[-1], "kit_events_per_s": kit_all[-1]},
        "postgres": "external (DATABASE_URL)" if pg.external else "embedded",
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=2))
    print(
        f"{name} ({summary['nats']}), {args.runs} runs: kit exactly-once events/s "
        f"min {kit_all[0]:.0f} median {kit_med:.0f} max {kit_all[-1]:.0f}; raw nats-py msg/s "
        f"min {raw_all[0]:.0f} median {raw_med:.0f} max {raw_all[-1]:.0f}; "
        f"median ratio {raw_med / kit_med:.1f}x (targets: >= 1000/s, within 5x)"
    )


if __name__ == "__main__":
    main()
