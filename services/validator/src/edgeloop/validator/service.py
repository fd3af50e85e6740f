"""Validation logic: verify the image, run its model on the suite, check thresholds and the
champion, profile. No FastStream, no asyncpg here."""

from __future__ import annotations

import asyncio
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeloop.contracts.calibration import REPORT_KEY
from edgeloop.contracts.events import ImageBuilt
from edgeloop.contracts.signing import SignedRelease
from edgeloop.edge.runtime import ModelLoadError, OnnxModel, OutputShapeError
from edgeloop.kit.oci import OciClient
from edgeloop.kit.oci.image import read_layer_file
from edgeloop.kit.oci.signing import SignatureError, verify_image
from edgeloop.validator import calibration
from edgeloop.validator import metrics as m
from edgeloop.validator.profiling import profile


@dataclass
class Report:
    """Everything the validator found; ``passed`` only when ``reasons`` is empty."""

    metrics: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.reasons

    def fail(self, reason: str) -> Report:
        self.reasons.append(reason)
        return self


class Champions(Protocol):
    """Where the current champion of a model is found."""

    async def champion_model(self, model: str) -> tuple[str, bytes] | None:
        """(version, ONNX bytes) of the champion, or None when there is none."""
        ...


def _repo(image: str) -> str:
    return image.split("/", 1)[1] if "/" in image else image


class Validator:
    """Validates built images."""

    def __init__(
        self,
        oci: OciClient,
        public_key: Ed25519PublicKey,
        champions: Champions,
        *,
        tolerance: float,
        min_accuracy: float,
        threads: list[int],
        runs: int,
    ) -> None:
        self.oci = oci
        self.public_key = public_key
        self.champions = champions
        self.tolerance = tolerance
        self.min_accuracy = min_accuracy
        self.threads = threads
        self.runs = runs

    async def validate(self, event: ImageBuilt) -> Report:
        """The report of ``event``'s image (network errors propagate: they are retried)."""
        report = Report(details={"image": event.image, "digest": event.digest})
        repo = _repo(event.image)
        try:
            claims = await verify_image(self.oci, repo, event.digest, self.public_key)
            signed = SignedRelease.from_claims(claims)
        except SignatureError as exc:
            return report.fail(f"signature: {exc}")
        if (signed.model, signed.version) != (event.model, event.version):
            return report.fail(
                f"signature: the signed claims say {signed}, the image was built as "
                f"{event.model}@{event.version}"
            )
        report.details["release"] = signed.release
        onnx = await read_layer_file(self.oci, repo, event.digest, "model/model.onnx")
        manifest = json.loads(
            await read_layer_file(self.oci, repo, event.digest, "model/model.json")
        )
        if event.suite_artifact is None or event.source_repository is None:
            return report.fail(
                "no validation suite was registered with this version "
                "(register it with --suite SUITE.npz)"
            )
        suite_bytes = await self.oci.get_blob(event.source_repository, event.suite_artifact.digest)
        with np.load(io.BytesIO(suite_bytes), allow_pickle=False) as suite:
            x, y = suite["X"], suite["y"]
        return await asyncio.to_thread(
            self._evaluate,
            report,
            event,
            onnx,
            manifest,
            x,
            y,
            await self.champions.champion_model(event.model),
        )

    def _evaluate(
        self,
        report: Report,
        event: ImageBuilt,
        onnx: bytes,
        manifest: dict[str, Any],
        x: Any,
        y: Any,
        champion: tuple[str, bytes] | None,
    ) -> Report:
        try:
            model = OnnxModel(onnx)
        except ModelLoadError as exc:
            return report.fail(str(exc))
        quality = self._quality(model, x, y, report)
        if quality is None:
            return report
        report.metrics.update(quality)
        thresholds = dict(manifest.get("thresholds") or {})
        if model.kind == "classifier":
            thresholds.setdefault("accuracy", self.min_accuracy)
        for metric, bound in sorted(thresholds.items()):
            value = quality.get(metric)
            if value is None:
                report.fail(
                    f"threshold on unknown metric {metric!r} (known: {', '.join(sorted(quality))})"
                )
            elif metric in m.HIGHER_IS_BETTER and value < bound:
                report.fail(f"{metric} {value:.4f} is below the threshold {bound}")
            elif metric not in m.HIGHER_IS_BETTER and value > bound:
                report.fail(f"{metric} {value:.4f} is above the threshold {bound}")
        report.details["thresholds"] = thresholds
        if champion is not None and champion[0] != event.version:
            self._against_champion(report, model.kind, champion, x, y, quality)
        else:
            report.details["champion"] = None
        report.details["profile"] = profile(onnx, x, self.threads, self.runs)
        return report

    def _quality(self, model: OnnxModel, x: Any, y: Any, report: Report) -> dict[str, float] | None:
        try:
            pred = model.predict(x)
        except OutputShapeError as exc:
            report.fail(str(exc))
            return None
        except ValueError as exc:
            report.fail(f"suite does not fit the model: {exc}")
            return None
        except Exception as exc:  # onnxruntime raises its own types on a crash
            report.fail(f"inference crashed: {type(exc).__name__}: {str(exc)[:300]}")
            return None
        out = pred.labels if pred.labels is not None else pred.values
        if out is None or len(out) != len(x):
            got = "nothing" if out is None else f"{len(out)} rows"
            report.fail(f"wrong output shape: {len(x)} inputs gave {got}")
            return None
        arrays = [a for a in (pred.values, pred.probabilities) if a is not None]
        if any(not np.all(np.isfinite(np.asarray(a, dtype=np.float64))) for a in arrays):
            report.fail("model outputs NaN or infinite values on the suite")
            return None
        quality = m.classification(pred, y) if model.kind == "classifier" else m.regression(pred, y)
        if any(not math.isfinite(v) for v in quality.values()):
            report.fail("metrics are not finite")
            return None
        if model.kind == "classifier" and (cal := calibration.from_prediction(pred, y)):
            report.details[REPORT_KEY] = cal.model_dump(mode="json")
        return quality

    def _against_champion(
        self,
        report: Report,
        kind: str,
        champion: tuple[str, bytes],
        x: Any,
        y: Any,
        quality: dict[str, float],
    ) -> None:
        version, onnx = champion
        try:
            theirs = self._quality(OnnxModel(onnx), x, y, Report()) or {}
        except ModelLoadError:
            theirs = {}
        compared = {}
        for metric in m.HEADLINE[kind]:
            if metric in quality and metric in theirs:
                compared[metric] = {"candidate": quality[metric], "champion": theirs[metric]}
                if not m.better_or_equal(metric, quality[metric], theirs[metric], self.tolerance):
                    report.fail(
                        f"{metric} {quality[metric]:.4f} regresses against the champion "
                        f"(version {version}: {theirs[metric]:.4f}) beyond the tolerance "
                        f"{self.tolerance}"
                    )
        report.details["champion"] = {"version": version, "metrics": compared}
