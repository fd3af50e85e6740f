"""``make down``: stop what ``make up`` started (SIGTERM, then wait)."""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil

from edgeloop.devstack.up import state_dir


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent to reap it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main() -> None:
    """Stop the running stack, if any."""
    pid_file = state_dir() / "up.pid"
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        print("edgeloop is not running")
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        print("edgeloop was not running (stale pid file removed)")
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not _alive(pid):
            print("edgeloop stopped")
            return
        time.sleep(0.2)
    sys.exit(f"edgeloop (pid {pid}) did not stop within 60 s")


if __name__ == "__main__":
    main()
