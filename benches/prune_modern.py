"""Structured pruning, distillation and magnitude pruning on the MobileNet-style digits model.

Trains :func:`compressor.devmodels.mobilenet_digits` (width 1.0, 9.9k parameters; stride-2 conv, BN,
ReLU6, depthwise-separable blocks, a residual Add, global average pooling) on digits at 32×32, then
runs the default recipe's transforms with the default recipe's epochs and reports the float Keras test
accuracy of each: right after the transform (``pruned``), after re-estimating BN statistics only
(``bn_recalibrated``) and after fine-tuning (``fine_tuned``). Prints ONE JSON object on stdout.

    python benches/prune_modern.py [--seed 0] [--train-epochs 30] [--prune-epochs 4] [--distill-epochs 8]
        [--mag-epochs 2] [--cluster-epochs 1] [--lr 0.01]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# benches/agent.py would shadow the `agent` package: drop this directory from sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from agent.argparsing import StrictParser  # noqa: E402


def _copy(model: Any) -> Any:
    from compressor.sparsity import _copy as copy

    return copy(model)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from compressor.devmodels import mobilenet_digits, mobilenet_digits_data, train_mobilenet_digits
    from compressor.distill import distill, make_student
    from compressor.finetune import evaluate, recalibrate_batchnorm
    from compressor.prune import fine_tune, prune_structured
    from compressor.sparsity import cluster_weights, magnitude_prune

    start = time.perf_counter()
    data = mobilenet_digits_data(args.seed)
    model = mobilenet_digits(1.0, seed=args.seed)
    train_mobilenet_digits(model, data, args.train_epochs, args.seed)
    raw = evaluate(model, data.x_test, data.y_test)[0]
    recalibrate_batchnorm(model, data.x_train, seed=args.seed)
    base = evaluate(model, data.x_test, data.y_test)[0]

    def acc(m: Any) -> float:
        return round(evaluate(m, data.x_test, data.y_test)[0], 4)

    def recal(m: Any) -> float:
        c = _copy(m)
        recalibrate_batchnorm(c, data.x_train, seed=args.seed)
        return acc(c)

    out: dict[str, Any] = {
        "model": {
            "params": int(model.count_params()),
            "float_test_accuracy_fit_bn_stats": round(raw, 4),
            "float_test_accuracy": round(base, 4),
        }
    }
    variants: dict[str, Any] = {}
    for keep in (0.5, 0.25):
        t0 = time.perf_counter()
        pruned, report = prune_structured(model, keep)
        row: dict[str, Any] = {
            "params": report.params_after,
            "pruned": acc(pruned),
            "bn_recalibrated": recal(pruned),
        }
        hist = fine_tune(pruned, data, args.prune_epochs, learning_rate=args.lr, seed=args.seed)
        row |= {
            "fine_tuned": acc(pruned),
            "epochs": args.prune_epochs,
            "val_accuracy": [round(v, 4) for v in hist["val_accuracy"]],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        variants[f"prune{round(keep * 100)}"] = row
    t0 = time.perf_counter()
    student = make_student(model, 0.5, seed=args.seed)
    student, dreport = distill(
        model, student, data, args.distill_epochs, learning_rate=args.lr, seed=args.seed
    )
    variants["distill50"] = {
        "params": dreport.student_params,
        "fine_tuned": acc(student),
        "epochs": args.distill_epochs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    t0 = time.perf_counter()
    sparse, sreport = magnitude_prune(model, data, 0.75, 0, seed=args.seed)
    row = {
        "sparsity": round(sreport.overall_sparsity, 4),
        "pruned": acc(sparse),
        "bn_recalibrated": recal(sparse),
    }
    sparse, sreport = magnitude_prune(
        model, data, 0.75, args.mag_epochs, learning_rate=args.lr, seed=args.seed
    )
    variants["mag75"] = row | {
        "fine_tuned": acc(sparse),
        "epochs": args.mag_epochs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    t0 = time.perf_counter()
    clustered, _ = cluster_weights(model, 16)
    row = {"pruned": acc(clustered), "bn_recalibrated": recal(clustered)}
    clustered, _ = cluster_weights(model, 16, data=data, epochs=args.cluster_epochs, seed=args.seed)
    variants["cluster16"] = row | {
        "fine_tuned": acc(clustered),
        "epochs": args.cluster_epochs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out["variants"] = variants
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["args"] = vars(args)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = StrictParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-epochs", type=int, default=30)
    parser.add_argument("--prune-epochs", type=int, default=4)
    parser.add_argument("--distill-epochs", type=int, default=8)
    parser.add_argument("--mag-epochs", type=int, default=2)
    parser.add_argument("--cluster-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the library's)")
    args = parser.parse_args(argv)
    if args.lr is None:
        from compressor.finetune import DEFAULT_LEARNING_RATE

        args.lr = DEFAULT_LEARNING_RATE
    stdout = sys.stdout
    sys.stdout = sys.stderr  # TensorFlow's chatter must not mix with the JSON
    try:
        report = run(args)
    finally:
        sys.stdout = stdout
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
