"""A private Docker engine for tests, and a runtime base image made locally.

Nothing can be pulled from Docker Hub here, so the runtime base image the Docker build
backend uses is assembled from this machine's own Debian Python 3.11 (interpreter,
standard library, the shared libraries they load) plus onnxruntime and numpy from the
project's virtualenv, and imported into the engine with ``docker import``.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from edgeloop.devstack.servers import ManagedProcess, wait_until

PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
SKIP_STDLIB = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "__pycache__",
    "pydoc_data",
    "unittest",
    "distutils",
}
BASE_TAG = "edgeloop/runtime-base:py311"


class DockerEngine(ManagedProcess):
    """dockerd on a private socket and data root (no bridge, no iptables)."""

    name = "dockerd"

    @property
    def host(self) -> str:
        return f"unix://{self.data_dir / 'docker.sock'}"

    def command(self) -> list[str]:
        d = self.data_dir
        return [
            shutil.which("dockerd") or "dockerd",
            "--iptables=false",
            "--bridge=none",
            f"--data-root={d / 'data'}",
            f"--exec-root={d / 'exec'}",
            f"--host={self.host}",
            f"--pidfile={d / 'docker.pid'}",
        ]

    def ready(self) -> bool:
        return (
            subprocess.run(
                ["docker", "-H", self.host, "version"], capture_output=True, timeout=10
            ).returncode
            == 0
        )

    def stop(self, timeout: float = 20) -> None:
        """Stop the engine, then unmount what it left mounted (its network namespace)."""
        super().stop(timeout)
        for line in Path("/proc/self/mounts").read_text().splitlines():
            target = line.split()[1]
            if target.startswith(str(self.data_dir)):
                subprocess.run(["umount", "-l", target], capture_output=True)


def _libs(binaries: list[Path]) -> set[Path]:
    found: set[Path] = set()
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                found.add(Path(parts[2]))
            elif parts and parts[0].startswith("/"):
                found.add(Path(parts[0]))
    return found


def runtime_rootfs(site_packages: Path) -> bytes:
    """A tar of a minimal root filesystem that runs ``python3`` with onnxruntime/numpy."""
    if not PYTHON.exists():
        raise RuntimeError(f"{PYTHON} is needed to assemble the runtime base image")
    entries: dict[str, Path] = {"usr/bin/python3.11": PYTHON}
    for path in STDLIB.rglob("*"):
        rel = path.relative_to(STDLIB)
        if path.is_file() and not SKIP_STDLIB.intersection(rel.parts):
            entries[f"usr/lib/python3.11/{rel}"] = path
    for pkg in ("onnxruntime", "numpy", "numpy.libs"):
        for path in (site_packages / pkg).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and "tests" not in path.parts:
                entries[f"usr/lib/python3/dist-packages/{path.relative_to(site_packages)}"] = path
    shared = [p for p in entries.values() if p.suffix == ".so" or ".so." in p.name]
    for lib in _libs([PYTHON, *shared]):
        real = lib.resolve()
        if real.is_relative_to(site_packages.resolve()):
            continue  # bundled wheels' own libraries, already under dist-packages
        entries[str(real).lstrip("/")] = real
        entries[os.path.normpath(str(lib)).lstrip("/")] = real
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("tmp", "lib64", "usr/bin"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        link = tarfile.TarInfo("usr/bin/python3")
        link.type, link.linkname = tarfile.SYMTYPE, "python3.11"
        tar.addfile(link)
        for arc, src in sorted(entries.items()):
            tar.add(str(src), arcname=arc, recursive=False)
    return buf.getvalue()


def ensure_runtime_base(docker_host: str, site_packages: Path, tag: str = BASE_TAG) -> str:
    """Import the runtime base image into the engine unless it is there already."""
    env_args = ["-H", docker_host]
    if (
        subprocess.run(
            ["docker", *env_args, "image", "inspect", tag], capture_output=True
        ).returncode
        == 0
    ):
        return tag
    rootfs = runtime_rootfs(site_packages)
    subprocess.run(
        [
            "docker",
            *env_args,
            "import",
            "--change",
            'CMD ["python3"]',
            "--message",
            "edgeloop runtime base " + hashlib.sha256(rootfs).hexdigest()[:12],
            "-",
            tag,
        ],
        input=rootfs,
        check=True,
        capture_output=True,
    )
    return tag


__all__ = ["BASE_TAG", "DockerEngine", "ensure_runtime_base", "runtime_rootfs", "wait_until"]
