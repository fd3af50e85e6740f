"""Train a scikit-learn model on a bundled dataset and write what `edgeloop models register`
takes: model.onnx, suite.npz (held-out X, y) and reference.npz (training X + names).

    python examples/train.py --dataset breast_cancer -o /tmp/bc
    edgeloop models register /tmp/bc/model.onnx --name breast-cancer \\
        --suite /tmp/bc/suite.npz --reference /tmp/bc/reference.npz --param threshold.accuracy=0.9
"""

from __future__ import annotations

import argparse
from pathlib import Path

from examples.sklearn_models import classifier


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--dataset", default="breast_cancer", choices=["breast_cancer", "wine", "digits", "iris"]
    )
    parser.add_argument("--c", type=float, default=1.0, help="inverse regularisation")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = classifier(args.dataset, c=args.c)
    (args.out / "model.onnx").write_bytes(files.onnx)
    (args.out / "suite.npz").write_bytes(files.suite)
    (args.out / "reference.npz").write_bytes(files.reference)
    print(f"wrote {args.out}/model.onnx ({len(files.onnx)} bytes), suite.npz, reference.npz")


if __name__ == "__main__":
    main()
