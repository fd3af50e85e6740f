"""Uploads of files too large to hold in memory: a ``multipart/form-data`` body streamed
from the files on disk, and its progress on stderr.

httpx builds a multipart body from bytes in memory; a model of a gigabyte would then need
a gigabyte (and more) of the client's memory. :class:`MultipartFiles` reads each file in
chunks as the request is sent instead, with a ``Content-Length`` computed beforehand, so
an API can still refuse a body over its limit before any of it is sent.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

#: What is read from a file and handed to the connection at a time.
CHUNK_SIZE = 1 << 20

#: ``auto`` (progress when stderr is a terminal), ``always`` (as if it were one) or
#: ``never``.
PROGRESS_ENV = "EDGELOOP_PROGRESS"
PROGRESS_MODES = ("auto", "always", "never")


class FileChanged(OSError):
    """A file's size changed while it was being sent (its Content-Length was sent
    first)."""


@dataclass(frozen=True)
class FilePart:
    """A file of the form: its field, and the file on disk."""

    field: str
    path: Path
    content_type: str = "application/octet-stream"


def _quote(value: str) -> str:
    """A form field or file name inside ``"…"`` (as browsers and httpx escape it)."""
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class MultipartFiles:
    """A ``multipart/form-data`` body of text ``fields`` and ``files``, streamed: iterate
    it (as httpx does with ``content=``) and each file is read chunk by chunk while it is
    sent. ``on_progress(field, sent)`` is called after each chunk has gone, with the
    field being sent and the bytes sent so far."""

    def __init__(
        self,
        fields: Mapping[str, str],
        files: list[FilePart],
        *,
        on_progress: Callable[[str, int], None] | None = None,
    ) -> None:
        self.boundary = secrets.token_hex(16)
        self.on_progress = on_progress
        self._parts: list[tuple[bytes, FilePart | bytes]] = []
        for name, value in fields.items():
            head = f'Content-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'
            self._parts.append((self._delimiter() + head.encode(), value.encode()))
        self._sizes: dict[str, int] = {}
        for part in files:
            head = (
                f'Content-Disposition: form-data; name="{_quote(part.field)}"; '
                f'filename="{_quote(part.path.name)}"\r\n'
                f"Content-Type: {part.content_type}\r\n\r\n"
            )
            self._parts.append((self._delimiter() + head.encode(), part))
            self._sizes[part.field] = part.path.stat().st_size
        self._end = f"--{self.boundary}--\r\n".encode()
        self.size = sum(len(head) + self._length(body) + 2 for head, body in self._parts) + len(
            self._end
        )

    def _delimiter(self) -> bytes:
        return f"--{self.boundary}\r\n".encode()

    def _length(self, body: FilePart | bytes) -> int:
        return self._sizes[body.field] if isinstance(body, FilePart) else len(body)

    @property
    def headers(self) -> dict[str, str]:
        """The request's ``Content-Type`` (with the boundary) and ``Content-Length``."""
        return {
            "Content-Type": f"multipart/form-data; boundary={self.boundary}",
            "Content-Length": str(self.size),
        }

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for head, body in self._parts:
            current = body.field if isinstance(body, FilePart) else ""
            for chunk in itertools.chain((head,), self._read(body), (b"\r\n",)):
                yield chunk
                # the connection asked for the next chunk: this one has been sent
                sent += len(chunk)
                if self.on_progress is not None:
                    self.on_progress(current, sent)
        yield self._end
        if self.on_progress is not None:
            self.on_progress("", sent + len(self._end))

    def _read(self, body: FilePart | bytes) -> Iterator[bytes]:
        if not isinstance(body, FilePart):
            yield body
            return
        # exactly the size the Content-Length was computed with
        left = self._sizes[body.field]
        with body.path.open("rb") as f:
            while left > 0:
                chunk = f.read(min(CHUNK_SIZE, left))
                if not chunk:
                    raise FileChanged(_changed(body.path, "shrank"))
                left -= len(chunk)
                yield chunk
            if f.read(1):  # the request is abandoned: the registry gets no truncated file
                raise FileChanged(_changed(body.path, "grew"))


def _changed(path: Path, how: str) -> str:
    return f"{path} {how} while it was being sent; send it again once nothing writes to it"


def progress_console(json_out: bool) -> Console | None:
    """Where an upload's progress goes: stderr, when it is a terminal (or
    ``EDGELOOP_PROGRESS=always``); None with ``--json``, ``EDGELOOP_PROGRESS=never`` or
    when stderr is not a terminal. Exit 2 on another value of ``EDGELOOP_PROGRESS``."""
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower() or "auto"
    if mode not in PROGRESS_MODES:
        typer.secho(
            f"{PROGRESS_ENV} must be one of {', '.join(PROGRESS_MODES)}, not {mode!r}",
            err=True,
            fg="red",
        )
        raise typer.Exit(2)
    if json_out or mode == "never":
        return None
    console = Console(stderr=True, force_terminal=True if mode == "always" else None)
    return console if console.is_terminal else None


@contextlib.contextmanager
def upload_progress(
    body: MultipartFiles, console: Console | None, *, names: Mapping[str, str], waiting: str
) -> Iterator[None]:
    """Show ``body``'s bytes sent of its total, the rate and the time left on
    ``console`` while it is sent (nothing without a console): the name of the file being
    sent (``names``: by field), then ``waiting`` until the answer; all the names at the
    end."""
    if console is None:
        yield
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(elapsed_when_finished=True),
    )
    everything = ", ".join(names.values())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(everything, total=body.size)

        def advance(field: str, sent: int) -> None:
            name = waiting if sent >= body.size else names.get(field)
            progress.update(task, completed=sent, description=name)

        body.on_progress = advance
        try:
            yield
        finally:
            body.on_progress = None
            progress.update(task, description=everything)
