"""``make down``: stop what ``make up`` started (SIGTERM, then wait until it is gone)."""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil

from edgeloop.contracts.stackfile import state_dir
from edgeloop.devstack.up import running_pid

#: services get 20 s, then each server up to 20 s: enough for a stuck one to be killed
TIMEOUT = 90.0


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its parent to reap it counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def main() -> None:
    """Stop the running stack, if any."""
    root = state_dir()
    pid = running_pid(root)
    if pid is None:
        pid_file = root / "up.pid"
        if pid_file.exists():
            pid_file.unlink()
            print("edgeloop was not running (stale pid file removed)")
        else:
            print("edgeloop is not running")
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print("edgeloop stopped")
        return
    deadline = time.monotonic() + TIMEOUT
    while not _gone(pid):
        if time.monotonic() > deadline:
            sys.exit(f"edgeloop (pid {pid}) did not stop within {TIMEOUT:.0f} s")
        time.sleep(0.2)
    print("edgeloop stopped")


if __name__ == "__main__":
    main()
