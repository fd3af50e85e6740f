"""Telemetry batches the gateway has not acknowledged yet (the offline buffer), and how
one session sends them (``Drain``).

Bounded by count and bytes: when full, the oldest batches are dropped and counted; the
count travels in the next batch (``dropped_batches``) so the monitor knows what is
missing. ``DiskBuffer`` survives a restart of the agent; ``MemoryBuffer`` is for the
fleet simulator, where thousands of devices share one disk.

A batch leaves the buffer only when the gateway acknowledges it (or refuses it for
good), so delivery is at-least-once; a batch keeps its id across re-sends and restarts,
and the platform de-duplicates by it (``Nats-Msg-Id`` on the bus, event ids in the
consumers' inboxes). A batch that cannot be read back (a truncated or garbled file) is
set aside, logged and counted (``corrupt_batches`` in the next batch); it never stops
the others.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
import zlib
from collections import OrderedDict, deque
from pathlib import Path
from typing import NamedTuple, Protocol

from edgeloop.edge.durable import fsync_directory, write_durably

log = logging.getLogger("edgeloop.agent.buffer")

_BATCH_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAGIC = b"ELB1"
_HEADER = struct.Struct(">4sII")  # magic, length of the batch, crc32 of the batch
MAX_SET_ASIDE = 100
"""Unreadable files kept for inspection (in ``corrupt/``); later ones are deleted."""


class Lost(NamedTuple):
    """Batches that will never be sent: dropped to make room, or unreadable."""

    dropped: int = 0
    corrupt: int = 0


class BatchBuffer(Protocol):
    """What the agent needs of a buffer."""

    corrupt: int
    """Unreadable batches set aside since this buffer was opened."""

    def append(self, batch_id: str, data: bytes) -> int:
        """Keep a batch; the number of old batches dropped to make room."""

    def ack(self, batch_id: str) -> bool:
        """Forget an acknowledged batch; False if it was not here."""

    def ids(self) -> list[str]:
        """Ids of the unacknowledged batches, oldest first."""

    def get(self, batch_id: str) -> bytes | None:
        """A batch's bytes; None if it is gone or unreadable (then set aside)."""

    def set_aside(self, batch_id: str, reason: str) -> None:
        """Give up on a batch that cannot be sent as it is (logged and counted)."""

    def take_lost(self) -> Lost:
        """Batches lost since the last call."""

    def __contains__(self, batch_id: object) -> bool: ...

    def __len__(self) -> int: ...


def _check(batch_id: str) -> str:
    if not _BATCH_ID.match(batch_id):
        raise ValueError(f"batch id {batch_id!r} is not a safe token (letters, digits, - _)")
    return batch_id


class MemoryBuffer:
    """A bounded buffer in memory; also the bookkeeping (order, bounds, counts) that
    ``DiskBuffer`` shares."""

    def __init__(self, max_batches: int = 1000, max_bytes: int = 64 << 20) -> None:
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.corrupt = 0
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._data: dict[str, bytes] = {}
        self._bytes = 0
        self._lost = Lost()

    @property
    def bytes_used(self) -> int:
        """Bytes held."""
        return self._bytes

    def append(self, batch_id: str, data: bytes) -> int:
        """Keep a batch, dropping the oldest when over a bound."""
        _check(batch_id)
        self._discard(batch_id)
        self._store(batch_id, data)
        self._sizes[batch_id] = len(data)
        self._bytes += len(data)
        dropped = 0
        while len(self._sizes) > 1 and (
            len(self._sizes) > self.max_batches or self._bytes > self.max_bytes
        ):
            self._discard(next(iter(self._sizes)))
            dropped += 1
        if dropped:
            self._count(Lost(dropped=dropped))
        return dropped

    def ack(self, batch_id: str) -> bool:
        """Forget an acknowledged batch."""
        return self._discard(batch_id)

    def ids(self) -> list[str]:
        """Oldest first."""
        return list(self._sizes)

    def get(self, batch_id: str) -> bytes | None:
        """The batch's bytes (None: acknowledged, dropped, or unreadable and set aside)."""
        if batch_id not in self._sizes:
            return None
        try:
            return self._read(batch_id)
        except ValueError as exc:
            self.set_aside(batch_id, str(exc))
            return None

    def set_aside(self, batch_id: str, reason: str) -> None:
        """Give up on an unreadable batch: logged, counted, never sent."""
        size = self._sizes.pop(batch_id, None)
        if size is None:
            return
        self._bytes -= size
        where = self._put_aside(batch_id)
        log.warning("unreadable telemetry batch %s set aside%s: %s", batch_id, where, reason)
        self.corrupt += 1
        self._count(Lost(corrupt=1))

    def take_lost(self) -> Lost:
        """Lost since the last call."""
        lost, self._lost = self._lost, Lost()
        if lost != Lost():
            self._lost_changed()
        return lost

    def __contains__(self, batch_id: object) -> bool:
        return batch_id in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def _discard(self, batch_id: str) -> bool:
        size = self._sizes.pop(batch_id, None)
        if size is None:
            return False
        self._bytes -= size
        self._remove(batch_id)
        return True

    def _count(self, lost: Lost) -> None:
        self._lost = Lost(self._lost.dropped + lost.dropped, self._lost.corrupt + lost.corrupt)
        self._lost_changed()

    # --- where the bytes live (overridden by DiskBuffer) ---------------------------------

    def _store(self, batch_id: str, data: bytes) -> None:
        self._data[batch_id] = data

    def _read(self, batch_id: str) -> bytes:
        return self._data[batch_id]

    def _remove(self, batch_id: str) -> None:
        self._data.pop(batch_id, None)

    def _put_aside(self, batch_id: str) -> str:
        self._data.pop(batch_id, None)
        return ""

    def _lost_changed(self) -> None:
        pass


class DiskBuffer(MemoryBuffer):
    """A bounded buffer whose batches are files (``<seq>-<batch id>.pb``), each written
    durably (temporary file, fsync, rename, fsync of the directory) with a header that
    holds its length and CRC-32, so a truncated or garbled file is recognised.

    Only the order and sizes are held in memory; a batch is read when it is sent.
    Unreadable files move to ``corrupt/`` (the first ``MAX_SET_ASIDE``; later ones are
    deleted). An acknowledged batch's file is unlinked without an fsync: if a power cut
    undoes the unlink, the batch is sent again and de-duplicated by its id.
    """

    def __init__(
        self, directory: Path, max_batches: int = 10_000, max_bytes: int = 256 << 20
    ) -> None:
        super().__init__(max_batches, max_bytes)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Path] = {}
        self._seq = 0
        self._lost = self._load_lost()
        for stray in directory.glob("*.tmp"):
            stray.unlink(missing_ok=True)
        with os.scandir(directory) as entries:
            found = sorted(
                (e.name, e.stat().st_size)
                for e in entries
                if e.name.endswith(".pb") and e.is_file()
            )
        for name, size in found:
            seq, _, batch_id = name.removesuffix(".pb").partition("-")
            if not seq.isdigit() or not _BATCH_ID.match(batch_id) or batch_id in self._sizes:
                # kept under its file name (never a batch id: it has a dot) to set it aside
                self._files[name] = directory / name
                self._sizes[name] = 0
                self.set_aside(name, "its name is not <sequence>-<batch id>.pb")
                continue
            self._seq = max(self._seq, int(seq))
            self._files[batch_id] = directory / name
            self._sizes[batch_id] = max(0, size - _HEADER.size)
            self._bytes += self._sizes[batch_id]

    def _store(self, batch_id: str, data: bytes) -> None:
        self._seq += 1
        path = self.directory / f"{self._seq:016d}-{batch_id}.pb"
        write_durably(path, _HEADER.pack(_MAGIC, len(data), zlib.crc32(data)) + data)
        self._files[batch_id] = path

    def _read(self, batch_id: str) -> bytes:
        try:
            raw = self._files[batch_id].read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read it: {exc}") from exc
        if len(raw) < _HEADER.size:
            raise ValueError(f"{len(raw)} bytes, shorter than its header (truncated)")
        magic, length, crc = _HEADER.unpack_from(raw)
        data = raw[_HEADER.size :]
        if magic != _MAGIC:
            raise ValueError("no batch header (not written by this agent)")
        if len(data) != length:
            raise ValueError(f"{len(data)} of its {length} bytes (truncated)")
        if zlib.crc32(data) != crc:
            raise ValueError("its checksum does not match (garbled)")
        return data

    def _remove(self, batch_id: str) -> None:
        path = self._files.pop(batch_id, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def _put_aside(self, batch_id: str) -> str:
        path = self._files.pop(batch_id, None)
        if path is None:
            return ""
        aside = self.directory / "corrupt"
        aside.mkdir(exist_ok=True)
        try:
            if sum(1 for _ in aside.iterdir()) >= MAX_SET_ASIDE:
                path.unlink(missing_ok=True)
                return f" (deleted {path.name}: {aside} is full)"
            os.replace(path, aside / path.name)
            fsync_directory(self.directory)
        except OSError as exc:
            log.warning("cannot set %s aside: %s", path, exc)
            return ""
        return f" (moved to {aside / path.name})"

    def _load_lost(self) -> Lost:
        try:
            dropped, corrupt = (self.directory / "lost").read_text().split()
            return Lost(int(dropped), int(corrupt))
        except (OSError, ValueError):
            return Lost()

    def _lost_changed(self) -> None:
        write_durably(
            self.directory / "lost", f"{self._lost.dropped} {self._lost.corrupt}".encode()
        )


class Drain:
    """What one session sends of a buffer: at most ``window`` batches wait for the
    gateway's answer at a time (the session's other messages never queue behind the
    backlog), the backlog oldest first.

    The backlog is the buffer as the session found it. Batches made during the session
    (live) and batches to send again go before it, so fresh telemetry does not wait
    behind hours of backlog.
    """

    def __init__(self, buffer: BatchBuffer, window: int) -> None:
        self.buffer = buffer
        self.window = window
        self.in_flight: dict[str, float] = {}  # batch id → when sent (monotonic)
        self._backlog = deque(buffer.ids())
        self._live: deque[str] = deque()
        self._again: deque[str] = deque()

    def add(self, batch_id: str) -> None:
        """A batch made during the session."""
        self._live.append(batch_id)

    def next(self) -> tuple[str, bytes] | None:
        """The next batch to send, or None: the window is full, or nothing is left."""
        if len(self.in_flight) >= self.window:
            return None
        for queue in (self._again, self._live, self._backlog):
            while queue:
                batch_id = queue.popleft()
                if batch_id in self.in_flight:
                    continue
                data = self.buffer.get(batch_id)  # None: acknowledged, dropped, unreadable
                if data is not None:
                    return batch_id, data
        return None

    def sent(self, batch_id: str) -> None:
        """A batch went out: it waits for its answer in the window."""
        self.in_flight[batch_id] = time.monotonic()

    def answered(self, batch_id: str) -> None:
        """The gateway acknowledged or refused a batch: its slot is free."""
        self.in_flight.pop(batch_id, None)

    def hold(self, batch_id: str) -> None:
        """The gateway could not take a batch now: it keeps its slot until sent again."""
        if batch_id in self.in_flight:
            self.in_flight[batch_id] = time.monotonic()

    def again(self, batch_id: str) -> None:
        """Send a held batch again (next, before live batches and the backlog)."""
        if self.in_flight.pop(batch_id, None) is not None:
            self._again.append(batch_id)

    def stalled(self, seconds: float) -> bool:
        """The window is full and its oldest batch has had no answer for ``seconds``."""
        return (
            len(self.in_flight) >= self.window
            and min(self.in_flight.values()) < time.monotonic() - seconds
        )
