"""Knowledge distillation (compressor.distill) on a tiny CNN and scikit-learn's 8×8 digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressor.distill import (
    DEFAULT_ALPHA,
    DEFAULT_TEMPERATURE,
    distill,
    distillation_loss,
    distillation_loss_np,
    logits_fn,
    make_student,
)
from compressor.errors import CompressorError
from compressor.prune import fine_tune, prune_structured

pytestmark = pytest.mark.slow


def _keras() -> Any:
    from compressor._tf import keras

    return keras()


def _reference_loss(y: np.ndarray, t: np.ndarray, s: np.ndarray, temp: float, hard: float) -> float:
    """Independent numpy spelling of α·CE(y, s) + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T))."""

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return np.asarray(e / e.sum(axis=1, keepdims=True))

    ps = softmax(s)
    ce = -np.log(ps[np.arange(len(y)), y])
    pt, pst = softmax(t / temp), softmax(s / temp)
    kl = np.sum(pt * np.log(pt / pst), axis=1)
    return float(np.mean(hard * ce + (1 - hard) * temp**2 * kl))


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    tr, te = idx[:1400], idx[1400:]
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="module")
def teacher(digits: tuple[np.ndarray, ...]) -> Any:
    k = _keras()
    k.utils.set_random_seed(0)
    model = k.Sequential(
        [
            k.Input((8, 8, 1)),
            k.layers.Conv2D(16, 3, activation="relu", padding="same", name="conv"),
            k.layers.MaxPooling2D(2, name="pool"),
            k.layers.Flatten(name="flatten"),
            k.layers.Dense(64, activation="relu", name="fc"),
            k.layers.Dense(10, activation="softmax", name="probs"),
        ],
        name="teacher",
    )
    xtr, ytr, _, _ = digits
    # peak of the warm-up + cosine schedule (a constant 1e-3 reached the same accuracy before)
    fine_tune(model, (xtr, ytr), 8, learning_rate=3e-3)
    return model


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(model(x, training=False)).argmax(-1) == y).mean())


def test_defaults_are_facts_setting() -> None:
    # FACTS.md: T=4 and 0.7 on the soft term == alpha (hard CE weight, ARCHITECTURE.md) 0.3
    assert DEFAULT_TEMPERATURE == 4.0
    assert pytest.approx(0.7) == 1 - DEFAULT_ALPHA


@pytest.mark.parametrize(("temp", "hard"), [(4.0, 0.3), (1.0, 0.5), (2.5, 0.0), (4.0, 1.0)])
def test_loss_matches_numpy(temp: float, hard: float) -> None:
    rng = np.random.default_rng(7)
    t = rng.normal(scale=3.0, size=(16, 10)).astype(np.float32)
    s = rng.normal(scale=2.0, size=(16, 10)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    expected = _reference_loss(y, t.astype(np.float64), s.astype(np.float64), temp, hard)
    assert distillation_loss_np(y, t, s, temp, hard) == pytest.approx(expected, rel=1e-9)
    got = float(distillation_loss(y, t, s, temp, hard))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # equal logits: only the hard term is left
    same = float(distillation_loss(y, s, s, temp, hard))
    assert same == pytest.approx(_reference_loss(y, s, s, temp, 1.0) * hard, rel=1e-5, abs=1e-6)


def test_logits_reproduce_the_softmax_output(teacher: Any, digits: tuple[np.ndarray, ...]) -> None:
    x = digits[2][:16]
    logits = np.asarray(logits_fn(teacher)(x))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    assert np.allclose(e / e.sum(axis=1, keepdims=True), np.asarray(teacher(x)), atol=1e-6)
    k = _keras()
    no_softmax = k.Sequential([k.Input((4,)), k.layers.Dense(3, name="lin")])
    with pytest.raises(CompressorError, match="softmax"):
        logits_fn(no_softmax)


def test_make_student_half_width(teacher: Any, tmp_path: Path) -> None:
    student = make_student(teacher, 0.5)
    assert student.get_layer("conv").filters == 8
    assert student.get_layer("fc").units == 32
    assert student.get_layer("probs").units == 10
    assert student.count_params() < teacher.count_params() / 2
    path = tmp_path / "teacher.keras"
    teacher.save(path)
    from_file = make_student(str(path), 0.5, seed=0)
    assert from_file.count_params() == student.count_params()
    assert make_student(teacher, 0.01).get_layer("conv").filters == 1  # min 1


def test_distill_half_width_student(teacher: Any, digits: tuple[np.ndarray, ...], tmp_path: Path) -> None:
    xtr, ytr, xte, yte = digits
    student_path = tmp_path / "student.keras"
    make_student(teacher, 0.5, seed=1).save(student_path)
    student, report = distill(teacher, student_path, (xtr, ytr), 6, learning_rate=3e-3)
    acc = _accuracy(student, xte, yte)
    assert acc >= 0.88  # measured 0.93-0.95 (teacher 0.97)
    assert report.student_params < report.teacher_params
    assert report.alpha == pytest.approx(0.3) and report.soft_weight == pytest.approx(0.7)
    assert report.loss_history[-1] < report.loss_history[0]
    probs = np.asarray(student(xte[:8]))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # a normal softmax classifier
    k = _keras()
    assert isinstance(student, k.Model)


def test_distill_after_structured_pruning(teacher: Any, digits: tuple[np.ndarray, ...]) -> None:
    xtr, ytr, xte, yte = digits
    pruned, _ = prune_structured(teacher, 0.5)
    fine_tune(pruned, (xtr, ytr), 1)
    student = make_student(pruned, 0.5)  # a quarter of the teacher's widths
    assert student.get_layer("conv").filters == 4
    # learning_rate is now the peak of a warm-up + cosine schedule: with a 3e-3 peak this student
    # reached 0.58 after 4 epochs (0.86 at the old constant 3e-3); the default peak (1e-2) is used
    student, report = distill(pruned, student, (xtr, ytr), 4)
    assert report.student_params < pruned.count_params()
    assert _accuracy(student, xte, yte) >= 0.75  # measured 0.889
