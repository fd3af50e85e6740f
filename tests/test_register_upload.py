"""``edgeloop models register`` of large models against the real registry service (NATS,
PostgreSQL, the OCI registry): the files are streamed, not read into the CLI's memory,
the registry stores the bytes sent (same digest), and the progress goes to stderr only
on a terminal (or when forced), never with ``--json``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner, Result

from edgeloop.cli.main import app
from tests.deploy_harness import registry_service
from tests.edge_harness import TOKEN
from tests.modelzoo import npz

MB = 1_000_000
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def big_model(path: Path, size: int) -> str:
    """An ONNX regressor of about ``size`` bytes (4 features; ``Y = X + W[:4]`` with a
    large initializer ``W``) that onnxruntime loads, written to ``path``; its digest."""
    rng = np.random.default_rng()
    weights = rng.standard_normal(size // 4, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["W", "idx"], ["b"]),
            helper.make_node("Add", ["X", "b"], ["Y"]),
        ],
        "big",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])],
        [
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.arange(4, dtype=np.int64), "idx"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    path.write_bytes(data)
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Registry:
    """The registry service, its API as the test reads it, and the CLI's environment."""

    api: httpx.AsyncClient
    env: dict[str, str]
    model: str

    async def cli(self, *args: str, **env: str) -> Result:
        return await asyncio.to_thread(CliRunner().invoke, app, list(args), env={**self.env, **env})

    async def version(self, version: str) -> dict[str, Any]:
        resp = await self.api.get(f"/api/v1/models/{self.model}/versions/{version}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body


@pytest.fixture
async def registry(
    nats_url: str, pg_dsn: str, registry_url: str, unique: str
) -> AsyncIterator[Registry]:
    async with registry_service(nats_url, pg_dsn, registry_url, unique) as (_, api):
        env = {
            "EDGELOOP_REGISTRY_API": str(api.base_url).rstrip("/"),
            "EDGELOOP_API_TOKEN": TOKEN,
            "EDGELOOP_PROGRESS": "auto",
        }
        yield Registry(api, env, f"up{unique}")


def _samples(tmp_path: Path) -> tuple[Path, Path]:
    x = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
    suite, reference = tmp_path / "suite.npz", tmp_path / "reference.npz"
    suite.write_bytes(npz(X=x, y=x.sum(axis=1)))
    reference.write_bytes(npz(X=x))
    return suite, reference


async def test_a_model_of_tens_of_mb_is_registered_with_the_digest_of_its_bytes(
    registry: Registry, tmp_path: Path, registry_url: str
) -> None:
    model = tmp_path / "model.onnx"
    digest = big_model(model, 40 * MB)
    suite, reference = _samples(tmp_path)
    result = await registry.cli(
        "models", "register", str(model), "--name", registry.model,
        "--suite", str(suite), "--reference", str(reference),
        "--commit", "abc123", "--param", "threshold.rmse=9", "--tag", "team=edge",
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stdout == "1\n"  # what scripts read, as before
    assert result.stderr == ""  # not a terminal: no progress
    v = await registry.version("1")
    assert v["model_digest"] == digest
    assert v["model_size"] == model.stat().st_size
    assert v["suite_digest"] == "sha256:" + hashlib.sha256(suite.read_bytes()).hexdigest()
    assert v["reference_digest"] == "sha256:" + hashlib.sha256(reference.read_bytes()).hexdigest()
    assert (v["source_commit"], v["params"]["threshold.rmse"], v["tags"]) == (
        "abc123",
        "9",
        {"team": "edge"},
    )
    # the bytes themselves, in the OCI registry under that digest
    async with httpx.AsyncClient(base_url=registry_url) as oci:
        blob = await oci.head(f"/v2/{v['repository']}/blobs/{digest}")
    assert blob.status_code == 200, blob.status_code
    assert int(blob.headers["content-length"]) == model.stat().st_size


# what the CLI process measures: its peak resident memory (VmHWM) once it has imported
# everything, and again once the command has run
MEASURE = """
import json, sys
from edgeloop.cli.main import app

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

before = peak()
code = app(args=sys.argv[2:], prog_name="edgeloop", standalone_mode=False)
with open(sys.argv[1], "w") as out:
    json.dump({"before": before, "after": peak(), "code": code}, out)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
async def test_the_cli_streams_the_model_instead_of_holding_it_in_memory(
    registry: Registry, tmp_path: Path
) -> None:
    model = tmp_path / "model.onnx"
    digest = big_model(model, 200 * MB)
    report = tmp_path / "memory.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MEASURE, str(report),
        "models", "register", str(model), "--name", registry.model,
        env={**os.environ, **registry.env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode() == "1\n"
    measured = json.loads(report.read_text())
    growth = measured["after"] - measured["before"]
    assert growth < 100 * MB, f"the CLI's peak memory grew by {growth / MB:.0f} MB"
    assert (await registry.version("1"))["model_digest"] == digest


async def test_progress_on_stderr_when_forced_to_a_terminal_and_never_with_json(
    registry: Registry, tmp_path: Path
) -> None:
    model = tmp_path / "model.onnx"
    big_model(model, 12 * MB)
    size = model.stat().st_size
    register = ("models", "register", str(model), "--name", registry.model)

    shown = await registry.cli(*register, EDGELOOP_PROGRESS="always")
    assert shown.exit_code == 0, shown.output + shown.stderr
    assert shown.stdout == "1\n"  # stdout as ever: the progress is on stderr
    progress = ANSI.sub("", shown.stderr)
    assert "model.onnx" in progress, progress
    total = f"{size / MB:.1f}/{size / MB:.1f} MB"  # rich's bytes sent / total, when done
    assert total in progress, progress
    assert re.search(r"[\d.]+ [kMG]?B/s", progress), progress  # the rate

    quiet = await registry.cli(*register, "--version", "2", "--json", EDGELOOP_PROGRESS="always")
    assert quiet.exit_code == 0, quiet.output + quiet.stderr
    assert quiet.stderr == ""
    assert json.loads(quiet.stdout)["version"] == "2"

    never = await registry.cli(*register, "--version", "3", EDGELOOP_PROGRESS="never")
    assert (never.exit_code, never.stdout, never.stderr) == (0, "3\n", "")


async def test_an_unknown_progress_setting_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not sent")
    result = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["models", "register", str(model), "--name", "m"],
        env={"EDGELOOP_PROGRESS": "sometimes", "EDGELOOP_REGISTRY_API": "http://127.0.0.1:9"},
    )
    assert result.exit_code == 2, result.output
    assert "EDGELOOP_PROGRESS must be one of auto, always, never" in result.stderr
