"""The device's update lock: an application on the device holds it while it must not be
interrupted, and the agent activates a new model only when it can take it.

The lock is a file (``update_lock`` in ``agent.json``) locked with ``flock(2)``, as
balena's ``/tmp/balena/updates.lock``: an application holds it with ``flock(fd, LOCK_EX)``
(or ``LOCK_SH``; ``flock FILE COMMAND`` in a shell) for as long as it is busy. The agent
takes it without blocking (``LOCK_EX | LOCK_NB``) just before it swaps the model, and
keeps it until the swap is done, so an application cannot start a critical section in the
middle of one. The file is created if missing (an absent file is a lock nobody holds).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class UpdateLock:
    """One device's update lock file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_take(self) -> bool:
        """Take the lock if nobody holds it; whether the agent now holds it."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Let applications take it again (closing the file releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
