"""The device checks any model by output agreement: its outputs on a variant's sample against the host's.

Real .tflite files, built here with TensorFlow in a subprocess (cached per generator text, like
test_agent_integration's tiny models): a two-input two-output detector (vector + image → scores (1, 4) and
boxes (1, 4, 4)), a full-integer int8-in/int8-out classifier and a generic image → image model. The
samples carry the host's outputs of each file on its rows (``ref_*``), computed with TensorFlow's own
interpreter, as the compressor does; the agent runs the file in its child with the device runtime.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_helpers import PY, RecordingClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import agent.bench as bench
from agent.config import BenchConfig, parse_config
from agent.wire import (
    BenchError,
    BlobRef,
    HostMetrics,
    Manifest,
    OutputTolerance,
    QuantParams,
    TensorSpec,
    Variant,
    blob_fields,
)

FAST = BenchConfig(warmup_runs=1, min_runs=5, min_seconds=0.01, max_runs=100_000, timeout_s=60)
ROWS = 12
TOL = OutputTolerance()  # cosine ≥ 0.99, SQNR ≥ 20 dB

_GEN = r'''
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf

out = sys.argv[1]
tf.keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
ROWS = 12


def host_run(data, xs):
    """This file's float32 (dequantized) outputs on the rows of xs (interpreter input order)."""
    it = tf.lite.Interpreter(model_content=data)
    it.allocate_tensors()
    ins, outs = it.get_input_details(), it.get_output_details()
    refs = [[] for _ in outs]
    for i in range(len(xs[0])):
        for d, x in zip(ins, xs):
            it.set_tensor(d["index"], x[i : i + 1])
        it.invoke()
        for j, d in enumerate(outs):
            o = it.get_tensor(d["index"])
            scale, zero = d["quantization"]
            if o.dtype.kind in "iu" and scale:
                o = (o.astype(np.float32) - zero) * scale
            refs[j].append(o.astype(np.float32))
    return [np.concatenate(r) for r in refs]


def specs(data):
    it = tf.lite.Interpreter(model_content=data)
    it.allocate_tensors()

    def one(d):
        return {"name": d["name"], "shape": [int(s) for s in d["shape"]],
                "dtype": np.dtype(d["dtype"]).name,
                "quantization": [float(d["quantization"][0]), int(d["quantization"][1])]}

    return {"inputs": [one(d) for d in it.get_input_details()],
            "outputs": [one(d) for d in it.get_output_details()]}


# 1. two inputs (image, vector) -> two outputs (boxes (1,4,4), scores (1,4)), float32
img = tf.keras.Input(shape=(8, 8, 1), batch_size=1, name="image")
vec = tf.keras.Input(shape=(5,), batch_size=1, name="vector")
h = tf.keras.layers.GlobalAveragePooling2D()(tf.keras.layers.Conv2D(4, 3, activation="relu")(img))
h = tf.keras.layers.Concatenate()([h, tf.keras.layers.Dense(8, activation="relu")(vec)])
h = tf.keras.layers.Dense(16, activation="relu")(h)
boxes = tf.keras.layers.Reshape((4, 4), name="boxes")(tf.keras.layers.Dense(16)(h))
scores = tf.keras.layers.Dense(4, activation="sigmoid", name="scores")(h)
det = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model([img, vec], [boxes, scores])).convert()
open(os.path.join(out, "det.tflite"), "wb").write(det)
meta = {"det": specs(det)}
by_name = {"image": rng.standard_normal((ROWS, 8, 8, 1)).astype("float32"),
           "vector": rng.standard_normal((ROWS, 5)).astype("float32")}
xs = [by_name["image" if "image" in s["name"] else "vector"] for s in meta["det"]["inputs"]]
np.savez(os.path.join(out, "det.npz"), **{f"x_{k}": x for k, x in enumerate(xs)},
         **{f"ref_{j}": r for j, r in enumerate(host_run(det, xs))})

# 2. int8 in / int8 out classifier (6 -> 16 -> 3), full-integer quantized
inp = tf.keras.Input(shape=(6,), batch_size=1)
o = tf.keras.layers.Dense(3)(tf.keras.layers.Dense(16, activation="relu")(inp))
cal = rng.standard_normal((64, 6)).astype("float32")
c = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inp, o))
c.optimizations = [tf.lite.Optimize.DEFAULT]
c.representative_dataset = lambda: ([cal[i : i + 1]] for i in range(len(cal)))
c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
c.inference_input_type = tf.int8
c.inference_output_type = tf.int8
q = c.convert()
open(os.path.join(out, "int8.tflite"), "wb").write(q)
meta["int8"] = specs(q)
scale, zero = meta["int8"]["inputs"][0]["quantization"]
xf = rng.standard_normal((ROWS, 6))
xq = np.clip(np.round(xf / scale + zero), -128, 127).astype(np.int8)
ref = host_run(q, [xq])[0]
y = np.argmax(ref, axis=1).astype(np.int64)
np.savez(os.path.join(out, "int8.npz"), x=xq, y=y, ref_0=ref)
np.savez(os.path.join(out, "int8_float_x.npz"), x=xf, y=y, ref_0=ref)  # the child quantizes the rows
np.savez(os.path.join(out, "int8_schema1.npz"), x=xq, y=y)

# 3. generic image -> image model (1,8,8,2): output 0 is no class vector
img = tf.keras.Input(shape=(8, 8, 1), batch_size=1)
seg = tf.lite.TFLiteConverter.from_keras_model(
    tf.keras.Model(img, tf.keras.layers.Conv2D(2, 3, padding="same")(img))
).convert()
open(os.path.join(out, "seg.tflite"), "wb").write(seg)
meta["seg"] = specs(seg)
x = rng.standard_normal((ROWS, 8, 8, 1)).astype("float32")
np.savez(os.path.join(out, "seg.npz"), x=x, ref_0=host_run(seg, [x])[0])
json.dump(meta, open(os.path.join(out, "meta.json"), "w"), indent=1)
'''


@pytest.fixture(scope="session")
def gen() -> Path:
    """The models, samples and tensor specs, built once per generator text with TensorFlow."""
    key = hashlib.sha256(_GEN.encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"edgefleet-fidelity-models-{key}"
    if not (out / "meta.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix="edgefleet-fidgen-"))
        subprocess.run([PY, "-c", _GEN, str(tmp)], check=True, capture_output=True, timeout=300)
        if not out.exists():
            tmp.rename(out)
    return out


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def save(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _spec(s: dict[str, Any]) -> TensorSpec:
    scale, zero = s["quantization"]
    quant = QuantParams(scale=[scale], zero_point=[zero]) if scale else None
    return TensorSpec(name=s["name"], shape=s["shape"], dtype=s["dtype"], quantization=quant)


def variant(
    gen: Path,
    name: str,
    vid: str = "v",
    *,
    tolerance: OutputTolerance | None = TOL,
    sample: bytes | None = None,
) -> Variant:
    meta = json.loads((gen / "meta.json").read_text())[name]
    data = (gen / f"{name}.tflite").read_bytes()
    return Variant(
        id=vid,
        file=f"{vid}.tflite",
        quantization="int8" if name == "int8" else "none",
        inputs=[_spec(s) for s in meta["inputs"]],
        outputs=[_spec(s) for s in meta["outputs"]],
        metrics=HostMetrics(size_bytes=len(data)),
        output_tolerance=tolerance,
        sample=BlobRef(**blob_fields(sample)) if sample is not None else None,
        **blob_fields(data),
    )


def child(request: dict[str, Any]) -> dict[str, Any]:
    outcome = bench.run_child({"memory_limit_mb": 1024, "min_runs": 1, "min_seconds": 0.0, **request}, 60)
    assert outcome.error is None, outcome.detail
    return outcome.data


# ------------------------------------------------------------------------------ several inputs and outputs


def test_two_inputs_two_outputs_reproduce_the_host(gen: Path) -> None:
    run = bench.measure_variant(variant(gen, "det"), gen / "det.tflite", gen / "det.npz", FAST, board="t")
    r = run.result
    assert r.ok, r.error_detail
    fid = r.fidelity
    assert fid is not None and fid.rows == ROWS
    # both inputs came from the sample (a random second input would not reproduce the references)
    assert fid.cosine > 0.99999 and fid.sqnr_db > 80 and fid.max_abs < 1e-4
    assert r.accuracy is None and r.latency_ms is not None


def test_child_reports_every_output_and_bounds_rows_by_max_eval(gen: Path) -> None:
    data = child(
        {"mode": "bench", "model": str(gen / "det.tflite"), "sample": str(gen / "det.npz"), "max_eval": 5}
    )
    per = data["fidelity_outputs"]
    meta = json.loads((gen / "meta.json").read_text())["det"]
    assert [p["name"] for p in per] == [s["name"] for s in meta["outputs"]]
    assert all(p["rows"] == 5 and p["cosine"] > 0.99999 for p in per)
    shapes = {p["name"]: s["shape"] for p, s in zip(per, meta["outputs"], strict=True)}
    for p in per:  # top-1 agreement exists for the class vector (scores) only, not for boxes (4, 4)
        assert (p["top1_agreement"] is not None) == (len(shapes[p["name"]]) == 2)
    assert data["fidelity"]["rows"] == 5 and len(data["predictions"]) == 5


def test_corrupted_references_are_an_accuracy_mismatch(gen: Path, tmp_path: Path) -> None:
    arrays = load(gen / "det.npz")
    boxes = next(k for k in ("ref_0", "ref_1") if arrays[k].ndim == 3)
    rng = np.random.default_rng(3)
    arrays[boxes] = arrays[boxes] + rng.standard_normal(arrays[boxes].shape).astype(np.float32) * float(
        np.std(arrays[boxes])
    )
    bad = save(tmp_path / "bad.npz", arrays)
    r = bench.measure_variant(variant(gen, "det"), gen / "det.tflite", bad, FAST, board="t").result
    assert not r.ok and r.error is BenchError.ACCURACY_MISMATCH
    assert r.error_detail is not None
    assert r.error_detail.startswith(f"outputs on {ROWS} sample rows depart from the host's: ")
    assert "cosine" in r.error_detail and "SQNR" in r.error_detail
    # the figures are still reported: worst over outputs is the corrupted one
    assert r.fidelity is not None and r.fidelity.cosine < 0.9 and r.fidelity.sqnr_db < 10
    assert r.latency_ms is not None
    # without a tolerance the figures are reported and nothing is judged
    free = bench.measure_variant(
        variant(gen, "det", tolerance=None), gen / "det.tflite", bad, FAST, board="t"
    )
    assert free.result.ok and free.result.fidelity == r.fidelity
    # a max_abs bound alone also catches it, and says so
    tight = OutputTolerance(min_cosine=-1, min_sqnr_db=None, max_abs=1e-3)
    r2 = bench.measure_variant(variant(gen, "det", tolerance=tight), gen / "det.tflite", bad, FAST).result
    assert r2.error is BenchError.ACCURACY_MISMATCH and r2.error_detail is not None
    assert "max abs error" in r2.error_detail and "cosine" not in r2.error_detail


def test_health_check_compares_outputs_when_given_the_tolerance(gen: Path, tmp_path: Path) -> None:
    model = gen / "det.tflite"

    def health(sample: Path | None, tolerance: OutputTolerance | None) -> str | None:
        return bench.health_check(
            model, sample, inferences=4, timeout_s=60, memory_limit_mb=1024, tolerance=tolerance
        )

    assert health(gen / "det.npz", TOL) is None
    arrays = load(gen / "det.npz")
    arrays["ref_0"] = -arrays["ref_0"]  # silent garbage: finite, plausible size, wrong
    bad = save(tmp_path / "bad.npz", arrays)
    problem = health(bad, TOL)
    assert problem is not None and problem.startswith("ACCURACY_MISMATCH: outputs on ")
    assert "depart from the host's" in problem
    assert health(bad, None) is None  # no tolerance: finite outputs are all that is checked
    assert health(None, TOL) is None  # no sample: nothing to compare
    # the health child runs at most max_eval sample rows for the comparison
    data = child({"mode": "health", "model": str(model), "sample": str(gen / "det.npz"), "max_eval": 3})
    assert data["fidelity"]["rows"] == 3
    data = child({"mode": "health", "model": str(model), "sample": str(gen / "det.npz"), "max_eval": 0})
    assert "fidelity" not in data  # what health_check asks for when no tolerance is set


def test_outputs_that_cannot_be_set_against_the_references(gen: Path, tmp_path: Path) -> None:
    arrays = load(gen / "det.npz")
    one_input = save(tmp_path / "one_input.npz", {k: v for k, v in arrays.items() if k != "x_1"})
    one_ref = save(tmp_path / "one_ref.npz", {k: v for k, v in arrays.items() if k != "ref_1"})
    shaped = save(tmp_path / "shaped.npz", {**arrays, "ref_1": np.zeros((ROWS, 3), np.float32)})
    cases = {one_input: "feeds 1 of the model's 2 inputs", one_ref: "1 reference output(s), the model 2"}
    cases[shaped] = "does not fit the rows of ref_1"
    for sample, words in cases.items():
        r = bench.measure_variant(variant(gen, "det"), gen / "det.tflite", sample, FAST, board="t").result
        assert r.error is BenchError.ACCURACY_MISMATCH and r.error_detail is not None, sample.name
        assert "cannot be compared with the host's" in r.error_detail and words in r.error_detail
        assert r.fidelity is None
    no_tol = variant(gen, "det", tolerance=None)  # nothing to judge against: the run stands
    assert bench.measure_variant(no_tol, gen / "det.tflite", one_ref, FAST, board="t").result.ok
    too_many = save(tmp_path / "too_many.npz", {**arrays, "x_2": arrays["x_0"]})
    r = bench.measure_variant(variant(gen, "det"), gen / "det.tflite", too_many, FAST, board="t").result
    assert r.error is BenchError.LOAD_ERROR and r.error_detail is not None
    assert "3 input arrays" in r.error_detail


# ------------------------------------------------------------------------------ quantized outputs


def test_int8_outputs_are_dequantized_before_the_comparison(gen: Path) -> None:
    v = variant(gen, "int8")
    out_scale = v.outputs[0].quantization.scale[0] if v.outputs[0].quantization else 0.0
    assert 0 < out_scale < 0.5 and v.inputs[0].dtype == "int8" and v.outputs[0].dtype == "int8"
    ref = load(gen / "int8.npz")["ref_0"]
    assert not np.allclose(ref, np.round(ref))  # references are dequantized floats, not int8 codes
    for sample in ("int8.npz", "int8_float_x.npz"):  # int8 rows as shipped, and float rows quantized here
        r = bench.measure_variant(v, gen / "int8.tflite", gen / sample, FAST, board="t").result
        assert r.ok, (sample, r.error_detail)
        assert r.fidelity is not None and r.fidelity.rows == ROWS
        assert r.fidelity.max_abs <= out_scale + 1e-6 and r.fidelity.cosine > 0.999, sample
        assert r.accuracy == 1.0  # y = the host's top-1 of this file


def test_raw_int8_codes_would_not_pass(gen: Path, tmp_path: Path) -> None:
    v = variant(gen, "int8")
    assert v.outputs[0].quantization is not None
    scale, zero = v.outputs[0].quantization.scale[0], v.outputs[0].quantization.zero_point[0]
    arrays = load(gen / "int8.npz")
    arrays["ref_0"] = np.round(arrays["ref_0"] / scale + zero).astype(np.float32)  # the int8 codes
    r = bench.measure_variant(v, gen / "int8.tflite", save(tmp_path / "codes.npz", arrays), FAST).result
    assert r.error is BenchError.ACCURACY_MISMATCH


# ------------------------------------------------------------------------------ schema-1 samples


def test_schema1_sample_behaves_as_before(gen: Path) -> None:
    v = variant(gen, "int8")  # even with a tolerance: a sample without ref_* cannot be compared
    run = bench.measure_variant(
        v, gen / "int8.tflite", gen / "int8_schema1.npz", FAST, board="t", is_baseline=True
    )
    r = run.result
    assert r.ok, r.error_detail
    assert r.fidelity is None and r.accuracy == 1.0 and r.agreement == 1.0
    assert run.predictions == load(gen / "int8_schema1.npz")["y"].tolist()
    data = child(
        {"mode": "bench", "model": str(gen / "int8.tflite"), "sample": str(gen / "int8_schema1.npz")}
    )
    assert not {"fidelity", "fidelity_outputs", "fidelity_error"} & set(data)
    assert data["eval_samples"] == ROWS and data["accuracy"] == 1.0
    problem = bench.health_check(
        gen / "int8.tflite",
        gen / "int8_schema1.npz",
        inferences=4,
        timeout_s=60,
        memory_limit_mb=1024,
        tolerance=v.output_tolerance,
    )
    assert problem is None


# ------------------------------------------------------------------------------ generic task: agreement


def test_agreement_for_a_generic_task_needs_a_class_vector(gen: Path) -> None:
    seg = variant(gen, "seg")  # output 0 is (1, 8, 8, 2): argmax over it means nothing
    baseline = [0] * ROWS
    generic = bench.measure_variant(
        seg, gen / "seg.tflite", gen / "seg.npz", FAST, task="generic", baseline_predictions=baseline
    )
    assert generic.result.ok and generic.result.agreement is None and generic.predictions is None
    assert generic.result.fidelity is not None and generic.result.fidelity.sqnr_db > 80
    as_before = bench.measure_variant(
        seg, gen / "seg.tflite", gen / "seg.npz", FAST, baseline_predictions=baseline
    )
    assert as_before.result.agreement is not None  # classification manifests keep today's behaviour
    det = variant(gen, "det")  # output 0 of this file is scores (1, 4): a class vector
    assert bench.top1_comparable(det, "generic") and not bench.top1_comparable(seg, "generic")
    run = bench.measure_variant(
        det, gen / "det.tflite", gen / "det.npz", FAST, task="generic", is_baseline=True
    )
    assert run.result.agreement == 1.0 and run.predictions is not None and len(run.predictions) == ROWS


def test_daemon_reports_fidelity_and_no_agreement_for_a_generic_manifest(gen: Path, tmp_path: Path) -> None:
    from agent.daemon import Agent

    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    cfg = parse_config(
        {
            "device": {"id": "pi"},
            "trust": {"public_keys": [base64.b64encode(key).decode()]},
            "store": {"path": str(tmp_path / "s")},
            "bench": FAST.model_dump(),
            "thermal": {"cool_below_c": None},
        }
    )
    agent_obj = Agent(cfg, client=RecordingClient())  # type: ignore[arg-type]
    good = (gen / "seg.npz").read_bytes()
    arrays = load(gen / "seg.npz")
    arrays["ref_0"] = np.flip(arrays["ref_0"], axis=0).copy()  # references of other rows
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    bad = buf.getvalue()
    base = variant(gen, "seg", "float32", sample=good)
    other = variant(gen, "seg", "other", sample=bad)
    for v, sample in ((base, good), (other, bad)):
        path = agent_obj.store.blob_path(v.sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((gen / "seg.tflite").read_bytes())
        assert v.sample is not None
        agent_obj.store.blob_path(v.sample.sha256, "npz").write_bytes(sample)
    manifest = Manifest.model_construct(
        model="m", version=1, created_at=0.0, baseline="float32", task="generic", variants=[base, other]
    )
    report = agent_obj.benchmark_and_report("m", manifest, [other, base])
    by_id = {r.variant: r for r in report.results}
    assert by_id["float32"].ok and by_id["float32"].agreement is None
    assert by_id["float32"].fidelity is not None and by_id["float32"].fidelity.sqnr_db > 80
    assert by_id["other"].error is BenchError.ACCURACY_MISMATCH and by_id["other"].agreement is None
    assert by_id["other"].fidelity is not None and by_id["other"].fidelity.cosine < 0.9
