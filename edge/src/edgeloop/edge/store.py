"""The agent's state directory: verified downloads, installed models, and what runs.

Layout (everything written atomically: a temporary name, then ``os.replace``;
``state.json``, which holds the anti-rollback floor, also durably — fsync of the file
and of the directory — so a power cut cannot roll it back)::

    state/
      downloads/<hex>.partial   bytes received so far (a download resumes from its size)
      blobs/<hex>               verified artifacts (manifest, model layer)
      models/<manifest hex>/    model.onnx, model.json, profile.json of one image
      state.json                current and previous (last known good) model, per model
                                the highest signed release activated and the releases
                                run (anti-rollback), the desired-state revision last
                                applied
      trust.json                the pinned signing keys (``edgeloop.edge.trust``)
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeloop.edge.durable import write_durably

MODEL_FILE = "model/model.onnx"
META_FILE = "model/model.json"
PROFILE_FILE = "model/profile.json"
MAX_MODEL_FILE = 1 << 30
RELEASE_HISTORY = 32
"""Signed releases per model a device remembers having run (explicit rollback targets)."""


class ActivationError(Exception):
    """A desired model cannot run here; ``permanent``: trying again will not help."""

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Installed:
    """A model extracted from a verified image."""

    model: str
    version: str
    manifest_digest: str
    model_digest: str
    directory: str
    release: int = 0
    """The release counter its signature claims (0: installed before releases were signed)."""

    @property
    def onnx(self) -> Path:
        """The ONNX file."""
        return Path(self.directory) / "model.onnx"

    def meta(self) -> dict[str, Any]:
        """``model.json`` ({} when the image has none)."""
        return _read_json(Path(self.directory) / "model.json") or {}

    def profile(self) -> dict[str, Any] | None:
        """The reference profile the image carries, if any."""
        return _read_json(Path(self.directory) / "profile.json")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order versions naturally: ``2 < 10``, ``1.4.0 < 1.10.0``, ``1.0-rc1 < 1.0-rc2``."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part)
        for part in re.split(r"[.\-+_]", version)
        if part
    )


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
        raise ActivationError(f"invalid digest {digest!r}")
    return hexpart


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class ModelStore:
    """Files of one agent (one device)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("downloads", "blobs", "models"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for stray in root.glob("models/.tmp-*"):
            shutil.rmtree(stray, ignore_errors=True)
        self._state = _read_json(root / "state.json") or {}

    # --- what runs ----------------------------------------------------------------------

    def _installed(self, key: str) -> Installed | None:
        entry = self._state.get(key)
        if not isinstance(entry, dict):
            return None
        try:
            installed = Installed(**entry)
        except TypeError:
            return None
        return installed if installed.onnx.exists() else None

    @property
    def current(self) -> Installed | None:
        """The model running (or to run at start)."""
        return self._installed("current")

    @property
    def previous(self) -> Installed | None:
        """The model that ran before the current one (local rollback target)."""
        return self._installed("previous")

    @property
    def desired_revision(self) -> int:
        """The desired-state revision last applied (0: none)."""
        return int(self._state.get("desired_revision", 0))

    def highest(self, model: str) -> str | None:
        """The highest version of ``model`` activated here before releases were signed
        (the floor a device upgraded from then keeps until its first signed release)."""
        value = self._state.get("highest", {}).get(model)
        return str(value) if value is not None else None

    def release_floor(self, model: str) -> int | None:
        """The highest signed release of ``model`` ever activated here (anti-rollback)."""
        value = self._state.get("releases", {}).get(model, {}).get("floor")
        return int(value) if value is not None else None

    def ran(self, model: str, release: int) -> str | None:
        """The manifest digest of ``model``'s signed ``release`` if it ran here (the
        last :data:`RELEASE_HISTORY` releases are remembered)."""
        value = self._state.get("releases", {}).get(model, {}).get("ran", {}).get(str(release))
        return str(value) if value else None

    def activated(self, installed: Installed | None, revision: int) -> None:
        """Record that ``installed`` now runs (``None``: nothing runs)."""
        current = self.current
        if current is not None and (installed is None or current != installed):
            self._state["previous"] = asdict(current)
        self._state["current"] = asdict(installed) if installed else None
        if installed is not None and installed.release:
            entry = self._state.setdefault("releases", {}).setdefault(installed.model, {})
            entry["floor"] = max(int(entry.get("floor", 0)), installed.release)
            ran = entry.setdefault("ran", {})
            ran[str(installed.release)] = installed.manifest_digest
            for old in sorted(ran, key=int)[:-RELEASE_HISTORY]:
                del ran[old]
        self._state["desired_revision"] = revision
        self._save()

    def rolled_back(self) -> Installed | None:
        """The current model failed: the previous one runs again (returned)."""
        previous = self.previous
        self._state["current"] = asdict(previous) if previous else None
        self._state["previous"] = None
        self._save()
        return previous

    def applied(self, revision: int) -> None:
        """Remember the revision of a desired state that needed no change."""
        self._state["desired_revision"] = revision
        self._save()

    def _save(self) -> None:
        write_durably(self.root / "state.json", json.dumps(self._state, sort_keys=True).encode())

    # --- downloads ----------------------------------------------------------------------

    def partial(self, digest: str) -> Path:
        """Where a download in progress keeps its bytes."""
        return self.root / "downloads" / f"{_hex(digest)}.partial"

    def blob(self, digest: str) -> Path:
        """Where a verified artifact lives."""
        return self.root / "blobs" / _hex(digest)

    def have(self, digest: str) -> bool:
        """A verified copy of ``digest`` is here."""
        return self.blob(digest).exists()

    def partial_state(self, digest: str) -> tuple[Any, int]:
        """(sha256 of the partial bytes so far, their count)."""
        h = hashlib.sha256()
        path = self.partial(digest)
        size = 0
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            while data := f.read(1 << 20):
                h.update(data)
                size += len(data)
        return h, size

    def complete(self, digest: str, h: Any) -> Path:
        """Verify a finished download and move it into ``blobs``.

        Raises:
            ActivationError: the bytes do not hash to ``digest`` (the partial file is
                removed: the next attempt starts from byte 0). Not permanent.
        """
        partial = self.partial(digest)
        got = "sha256:" + h.hexdigest()
        if got != digest:
            partial.unlink(missing_ok=True)
            raise ActivationError(
                f"download of {digest} is corrupt (it hashes to {got})", permanent=False
            )
        target = self.blob(digest)
        os.replace(partial, target)
        return target

    def discard(self, digest: str) -> None:
        """Forget a verified artifact and any partial download of it."""
        self.blob(digest).unlink(missing_ok=True)
        self.partial(digest).unlink(missing_ok=True)

    # --- installation -------------------------------------------------------------------

    def install(
        self,
        manifest_digest: str,
        layer: Path,
        *,
        model: str,
        version: str,
        model_digest: str,
        release: int = 0,
    ) -> Installed:
        """Extract the model layer of a verified image into ``models/<manifest hex>``.

        Raises:
            ActivationError: the layer holds no model, or the model's bytes do not hash to
                ``model_digest`` (when given).
        """
        target = self.root / "models" / _hex(manifest_digest)
        onnx = target / "model.onnx"
        if not onnx.exists():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root / "models"))
            try:
                found = _extract(layer, tmp)
                if MODEL_FILE not in found:
                    raise ActivationError(f"the image's model layer has no {MODEL_FILE}")
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        digest = "sha256:" + hashlib.sha256(onnx.read_bytes()).hexdigest()
        if model_digest and digest != model_digest:
            shutil.rmtree(target, ignore_errors=True)
            raise ActivationError(
                f"the model in the image hashes to {digest}, not to {model_digest}"
            )
        return Installed(model, version, manifest_digest, digest, str(target), release)


def _extract(layer: Path, into: Path) -> set[str]:
    """Extract the model files of a tar(.gz) layer; nothing else, no links, bounded size."""
    wanted = {MODEL_FILE: "model.onnx", META_FILE: "model.json", PROFILE_FILE: "profile.json"}
    found: set[str] = set()
    with layer.open("rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        stream: Any = gzip.GzipFile(fileobj=raw) if magic == b"\x1f\x8b" else raw
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    name = member.name.lstrip("./")
                    if name not in wanted or not member.isfile():
                        continue
                    if member.size > MAX_MODEL_FILE:
                        raise ActivationError(f"{name} is larger than {MAX_MODEL_FILE} bytes")
                    source = tar.extractfile(member)
                    if source is None:
                        continue
                    with (into / wanted[name]).open("wb") as out:
                        shutil.copyfileobj(source, out)
                    found.add(name)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ActivationError(f"the model layer is not a readable tar archive: {exc}") from exc
    return found
