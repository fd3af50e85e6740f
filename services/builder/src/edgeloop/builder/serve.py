"""The model server inside images built by the Docker backend.

Standard library + onnxruntime + numpy only (that is all the runtime base holds).
``GET /healthz``; ``POST /v1/predict`` with ``{"instances": [[f1, f2, ...], ...]}`` answers
``{"predictions": [...], "probabilities": [[...], ...]}`` (probabilities for classifiers).
"""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import onnxruntime as ort

MODEL_PATH = os.environ.get("EDGELOOP_MODEL_PATH", "/model/model.onnx")
session = ort.InferenceSession(MODEL_PATH, providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name
outputs = [o.name for o in session.get_outputs()]


def predict(instances: list[list[float]]) -> dict[str, Any]:
    """Run the model on rows of features."""
    results = session.run(None, {input_name: np.asarray(instances, dtype=np.float32)})
    answer: dict[str, Any] = {"predictions": np.asarray(results[0]).tolist()}
    if len(results) > 1 and not isinstance(results[1], list):
        answer["probabilities"] = np.asarray(results[1]).tolist()
    return answer


class Handler(BaseHTTPRequestHandler):
    """Health and prediction endpoints."""

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, {"status": "ok", "outputs": outputs})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/v1/predict":
            self._send(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            self._send(200, predict(body["instances"]))
        except (ValueError, KeyError, TypeError) as exc:
            self._send(400, {"error": f"send {{'instances': [[...], ...]}}: {exc}"})
        except Exception as exc:  # an inference failure is the model's, report it
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    def log_message(self, *_: Any) -> None:
        """Quiet: one line per request is too much on a device."""


if __name__ == "__main__":
    port = int(os.environ.get("EDGELOOP_SERVE_PORT", "8080"))
    ThreadingHTTPServer(
        (os.environ.get("EDGELOOP_SERVE_HOST", "0.0.0.0"), port), Handler
    ).serve_forever()
