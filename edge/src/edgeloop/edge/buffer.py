"""Telemetry batches the gateway has not acknowledged yet (the offline buffer).

Bounded by count and bytes: when full, the oldest batches are dropped and counted; the
count travels in the next batch (``dropped_batches``) so the monitor knows what is
missing. ``DiskBuffer`` survives a restart of the agent; ``MemoryBuffer`` is for the
fleet simulator, where thousands of devices share one disk.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

_BATCH_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class BatchBuffer(Protocol):
    """What the agent needs of a buffer."""

    def append(self, batch_id: str, data: bytes) -> int:
        """Keep a batch; the number of old batches dropped to make room."""

    def ack(self, batch_id: str) -> bool:
        """Forget an acknowledged batch; False if it was not here."""

    def pending(self) -> list[tuple[str, bytes]]:
        """Unacknowledged batches, oldest first."""

    def take_dropped(self) -> int:
        """Batches dropped since the last call."""

    def __len__(self) -> int: ...


def _check(batch_id: str) -> str:
    if not _BATCH_ID.match(batch_id):
        raise ValueError(f"batch id {batch_id!r} is not a safe token (letters, digits, - _)")
    return batch_id


class MemoryBuffer:
    """A bounded buffer in memory."""

    def __init__(self, max_batches: int = 1000, max_bytes: int = 64 << 20) -> None:
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._dropped = 0

    @property
    def bytes_used(self) -> int:
        """Bytes held."""
        return self._bytes

    def append(self, batch_id: str, data: bytes) -> int:
        """Keep a batch, dropping the oldest when over a bound."""
        _check(batch_id)
        self._items[batch_id] = data
        self._bytes += len(data)
        dropped = 0
        while len(self._items) > 1 and (
            len(self._items) > self.max_batches or self._bytes > self.max_bytes
        ):
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)
            dropped += 1
        self._dropped += dropped
        return dropped

    def ack(self, batch_id: str) -> bool:
        """Forget an acknowledged batch."""
        data = self._items.pop(batch_id, None)
        if data is None:
            return False
        self._bytes -= len(data)
        return True

    def pending(self) -> list[tuple[str, bytes]]:
        """Oldest first."""
        return list(self._items.items())

    def take_dropped(self) -> int:
        """Dropped since the last call."""
        n, self._dropped = self._dropped, 0
        return n

    def __len__(self) -> int:
        return len(self._items)


class DiskBuffer(MemoryBuffer):
    """A bounded buffer whose batches are files (``<seq>-<batch id>.pb``)."""

    def __init__(self, directory: Path, max_batches: int = 10_000, max_bytes: int = 256 << 20):
        super().__init__(max_batches, max_bytes)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Path] = {}
        self._seq = 0
        for stray in directory.glob("*.tmp"):
            stray.unlink(missing_ok=True)
        for path in sorted(directory.glob("*.pb")):
            seq, _, batch_id = path.stem.partition("-")
            with contextlib.suppress(ValueError, OSError):
                self._seq = max(self._seq, int(seq))
                data = path.read_bytes()
                self._items[batch_id] = data
                self._bytes += len(data)
                self._files[batch_id] = path
        with contextlib.suppress(ValueError, OSError):
            self._dropped = int((directory / "dropped").read_text())

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def append(self, batch_id: str, data: bytes) -> int:
        """Keep a batch on disk, dropping the oldest when over a bound."""
        _check(batch_id)
        self._seq += 1
        path = self.directory / f"{self._seq:016d}-{batch_id}.pb"
        self._write(path, data)
        self._files[batch_id] = path
        before = set(self._items)
        dropped = super().append(batch_id, data)
        for gone in before - set(self._items):
            old = self._files.pop(gone, None)
            if old is not None:
                old.unlink(missing_ok=True)
        if dropped:
            self._write(self.directory / "dropped", str(self._dropped).encode())
        return dropped

    def ack(self, batch_id: str) -> bool:
        """Forget an acknowledged batch (its file goes)."""
        found = super().ack(batch_id)
        path = self._files.pop(batch_id, None)
        if path is not None:
            path.unlink(missing_ok=True)
        return found

    def take_dropped(self) -> int:
        """Dropped since the last call (persisted until taken)."""
        n = super().take_dropped()
        if n:
            self._write(self.directory / "dropped", b"0")
        return n
