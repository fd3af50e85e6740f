"""The checks of an upload that run someone else's bytes — the ONNX model loaded in
onnxruntime, the ``.npz`` files decompressed, the model run on the reference sample —
in a worker process of their own, with CPU-time and memory limits and a deadline.

A deflate bomb or a graph that is costly to run then fails that process, not the
registry: the upload is answered 422 with the limit it broke, and the registry goes on
serving everyone else meanwhile. One process per upload (``python -m
edgeloop.registry.checks DIR``): nothing is shared with the next upload, and a killed
worker needs no pool to be rebuilt. At most ``workers`` run at once; more uploads wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import resource
import signal
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeloop.registry.errors import InvalidInput

#: The files of an upload, as the worker finds them in its directory.
UPLOAD_FILES = ("model.onnx", "suite.npz", "reference.npz")


@dataclass(frozen=True)
class Limits:
    """What checking one upload may use."""

    cpu_seconds: int = 60
    """CPU time of the worker (RLIMIT_CPU)."""
    memory_bytes: int = 2 << 30
    """Address space of the worker (RLIMIT_AS)."""
    timeout_seconds: float = 120.0
    """Wall-clock time before the worker is killed (a worker that sleeps uses no CPU)."""
    unpacked_bytes: int = 1 << 30
    """What the arrays of one ``.npz`` may hold once decompressed (read from their
    headers before anything is decompressed)."""
    profile_bins: int = 10
    """Quantile bins per numeric feature in the reference profile."""


@dataclass(frozen=True)
class Checked:
    """What the checks derive from an upload."""

    signature: dict[str, Any]
    profile: dict[str, Any] | None
    suite_rows: int | None


def _unpacked_size(data: bytes, what: str) -> int:
    """The bytes the arrays of an ``.npz`` hold once decompressed, from each member's
    ``.npy`` header (only the header is decompressed)."""
    total = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    major, _ = np.lib.format.read_magic(member)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(member, max_header_size=1 << 16)
                total += int(np.prod(shape, dtype=np.float64) * np.dtype(dtype).itemsize)
    except Exception as exc:  # zipfile and numpy raise several types for other files
        raise InvalidInput(
            f"{what} is not a NumPy .npz file ({type(exc).__name__}: {exc}); save it with "
            "numpy.savez(path, X=..., y=...)"
        ) from exc
    return total


def load_npz(
    data: bytes, what: str, required: Sequence[str], unpacked_limit: int
) -> dict[str, npt.NDArray[Any]]:
    """Arrays of an ``.npz`` upload, with the required keys present and no more than
    ``unpacked_limit`` bytes once decompressed."""
    size = _unpacked_size(data, what)
    if size > unpacked_limit:
        raise InvalidInput(
            f"{what} holds {size} bytes of arrays once decompressed ({len(data)} bytes "
            f"compressed); the limit is {unpacked_limit} bytes: send a smaller sample"
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except MemoryError:
        raise
    except Exception as exc:  # numpy raises several types for a non-npz file
        raise InvalidInput(
            f"{what} is not a NumPy .npz file ({type(exc).__name__}: {exc}); "
            f"save it with numpy.savez(path, {', '.join(f'{k}=...' for k in required)})"
        ) from exc
    missing = [k for k in required if k not in arrays]
    if missing:
        raise InvalidInput(
            f"{what} lacks the array(s) {', '.join(missing)}; it has "
            f"{', '.join(sorted(arrays)) or 'none'}"
        )
    return arrays


def check_upload(
    model_bytes: bytes, suite: bytes | None, reference: bytes | None, limits: Limits
) -> Checked:
    """Every check that runs the upload (in the worker): the model loads in onnxruntime,
    suite and reference fit its input, and the reference profile under the model."""
    from edgeloop.edge.runtime import ModelLoadError, OnnxModel
    from edgeloop.registry.profile import compute_profile

    try:
        model = OnnxModel(model_bytes)
    except ModelLoadError as exc:
        raise InvalidInput(f"model file: {exc}") from exc
    suite_rows = None
    if suite is not None:
        arrays = load_npz(suite, "suite", ("X", "y"), limits.unpacked_bytes)
        try:
            x = model.check_features(arrays["X"], "suite X")
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        if len(arrays["y"]) != len(x):
            raise InvalidInput(f"suite has {len(x)} rows in X but {len(arrays['y'])} labels in y")
        if len(x) == 0:
            raise InvalidInput("suite X has no rows")
        suite_rows = len(x)
    profile = None
    if reference is not None:
        ref = load_npz(reference, "reference", ("X",), limits.unpacked_bytes)
        names = [str(n) for n in ref["feature_names"]] if "feature_names" in ref else None
        try:
            profile = compute_profile(model, ref["X"], names, bins=limits.profile_bins)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        except MemoryError:
            raise
        except Exception as exc:  # onnxruntime's own errors while running the graph
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise InvalidInput(f"the model failed on the reference sample: {first}") from exc
    return Checked(model.signature(), profile, suite_rows)


def _over_limits(limits: Limits, why: str) -> InvalidInput:
    return InvalidInput(
        f"the upload could not be checked within the registry's limits "
        f"({limits.cpu_seconds} s of CPU, {limits.memory_bytes >> 20} MiB of memory, "
        f"{limits.timeout_seconds:g} s in all): {why}. A model that costs this much to run "
        "on the reference sample, or data that expand this far, are refused; send a "
        "smaller sample or model"
    )


class WorkerChecks:
    """Runs :func:`check_upload` in a worker process per upload, under ``limits``."""

    def __init__(self, limits: Limits, workers: int = 2) -> None:
        self.limits = limits
        self._slots = asyncio.Semaphore(workers)

    async def __call__(self, model: bytes, suite: bytes | None, reference: bytes | None) -> Checked:
        """What the checks derive; :class:`InvalidInput` (422) when the upload fails them
        or breaks a limit."""
        async with self._slots:
            with tempfile.TemporaryDirectory(prefix="edgeloop-upload-") as tmp:
                directory = Path(tmp)
                await asyncio.to_thread(_write, directory, (model, suite, reference))
                return await self._run(directory)

    async def _run(self, directory: Path) -> Checked:
        limits = self.limits
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edgeloop.registry.checks",
            str(directory),
            json.dumps(limits.__dict__),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), limits.timeout_seconds)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            why = f"checking took more than {limits.timeout_seconds:g} s"
            raise _over_limits(limits, why) from None
        finally:
            if proc.returncode is None:  # cancelled: the client went away
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        code = proc.returncode
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            raise _over_limits(limits, f"checking used more than {limits.cpu_seconds} s of CPU")
        try:
            answer = json.loads(out)
        except ValueError:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {code}"]
            raise _over_limits(limits, f"the check stopped ({tail[0]})") from None
        if "memory" in answer:
            why = f"checking needed more than the memory limit ({answer['memory']})"
            raise _over_limits(limits, why)
        if "invalid" in answer:
            raise InvalidInput(answer["invalid"])
        return Checked(**answer["checked"])


def _write(directory: Path, blobs: Sequence[bytes | None]) -> None:
    for name, blob in zip(UPLOAD_FILES, blobs, strict=True):
        if blob is not None:
            (directory / name).write_bytes(blob)


def _read(directory: Path, name: str) -> bytes | None:
    path = directory / name
    return path.read_bytes() if path.exists() else None


def main(argv: Sequence[str]) -> int:
    """The worker: limit itself, check the upload in ``argv[0]`` with the limits in
    ``argv[1]`` (JSON), print the outcome as JSON."""
    directory, limits = Path(argv[0]), Limits(**json.loads(argv[1]))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    try:
        model, suite, reference = (_read(directory, n) for n in UPLOAD_FILES)
        checked = check_upload(model or b"", suite, reference, limits)
        answer: dict[str, Any] = {"checked": checked.__dict__}
    except InvalidInput as exc:
        answer = {"invalid": str(exc)}
    except MemoryError as exc:
        answer = {"memory": f"{type(exc).__name__}: {exc}"[:300]}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
