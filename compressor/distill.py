"""Knowledge distillation of a narrower student with Hinton's loss.

Loss (ARCHITECTURE.md §5), per sample, averaged over the batch::

    loss = α·CE(y, softmax(s)) + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T))

with ``t``/``s`` the teacher/student *logits*. **``alpha`` is the weight of the hard cross-entropy term**
(ARCHITECTURE's convention). FACTS.md's "α=0.7 on the soft term" is the same setting as ``alpha=0.3``
here, which is the default (soft weight 0.7), with ``temperature=4``. The T² factor keeps the soft
gradients' scale independent of T (Hinton et al. 2015).

Logits: our models end in ``Dense(..., activation="softmax")``. The pre-softmax values are computed from a
functional sub-model up to that Dense's *input*, followed by ``features @ kernel + bias`` with the Dense's own
variables (so training the logits trains the student itself). A model ending in a separate
``Activation("softmax")``/``Softmax`` layer uses that layer's input. The teacher's logits are computed once
for the whole training set (the teacher is frozen, inference mode). The student stays a normal Keras model
with a softmax output, so the converter handles it like any other.

Training is the shared loop of :mod:`compressor.finetune` (a seeded ``tf.GradientTape`` loop inside a
``tf.function``, no ``train_step`` override): BN statistics re-estimated before training and after each
epoch, warm-up + cosine learning rate, early stopping on the validation split restoring the best epoch.

Students: :func:`make_student` starts from a seeded random initialisation (``init="random"``, the
default) or from the teacher's own weights pruned to the student's widths (``init="pruned"``). On the
MobileNet-style digits model (half width, 8 epochs, one seed) random reached 96.9 % and pruned 95.0 % at
a peak learning rate of 1e-2, 86.9 % and 91.4 % at 3e-3; the old loop (a constant 1e-3, no BN
re-estimation) left the random student at chance (10 %). The learning rate and the BN statistics
mattered, the initialisation did not clearly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compressor._tf import keras, tf
from compressor.errors import CompressorError
from compressor.prune import TrainData, _Graph, _rebuild, _val_arrays, width_key

DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.3  # weight of the hard CE term; the soft (KL) term gets 1 − alpha = 0.7


# --------------------------------------------------------------------------------------------------------
# the loss: numpy reference and the TensorFlow version used for training


def _log_softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def distillation_loss_np(
    y: np.ndarray,
    teacher_logits: np.ndarray,
    student_logits: np.ndarray,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
) -> float:
    """Hinton's loss in numpy (float64), mean over the batch; ``alpha`` weighs the hard CE term."""
    s = np.asarray(student_logits, dtype=np.float64)
    t = np.asarray(teacher_logits, dtype=np.float64)
    ce = -_log_softmax_np(s)[np.arange(len(s)), np.asarray(y, dtype=np.int64)]
    log_pt = _log_softmax_np(t / temperature)
    kl = (np.exp(log_pt) * (log_pt - _log_softmax_np(s / temperature))).sum(axis=-1)
    return float(np.mean(alpha * ce + (1.0 - alpha) * temperature**2 * kl))


def distillation_loss(
    y: Any, teacher_logits: Any, student_logits: Any, temperature: float, alpha: float
) -> Any:
    """The same loss on TensorFlow tensors (differentiable), a scalar."""
    return _distillation_loss_tf(
        tf(), y, teacher_logits, student_logits, temperature=temperature, alpha=alpha
    )


def _distillation_loss_tf(
    t: Any, y: Any, teacher_logits: Any, student_logits: Any, *, temperature: float, alpha: float
) -> Any:
    s = t.cast(student_logits, t.float32)
    tl = t.cast(teacher_logits, t.float32)
    ce = t.nn.sparse_softmax_cross_entropy_with_logits(labels=t.cast(y, t.int32), logits=s)
    log_pt = t.nn.log_softmax(tl / temperature, axis=-1)
    log_ps = t.nn.log_softmax(s / temperature, axis=-1)
    kl = t.reduce_sum(t.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return t.reduce_mean(alpha * ce + (1.0 - alpha) * temperature**2 * kl)


# --------------------------------------------------------------------------------------------------------
# logits of a softmax model


def logits_fn(model: Any) -> Callable[..., Any]:
    """``f(x, training=False) -> logits`` sharing ``model``'s variables (see the module docstring)."""
    k = keras()
    if len(model.outputs) != 1:
        raise CompressorError("distillation needs a single-output classifier")
    last = model.outputs[0]._keras_history[0]
    act = getattr(last, "activation", None)
    act_name = getattr(act, "__name__", str(act))
    features = k.Model(model.inputs[0], last.input)
    if isinstance(last, k.layers.Dense) and act_name == "softmax":

        def dense_logits(x: Any, training: bool = False) -> Any:
            z = k.ops.matmul(features(x, training=training), last.kernel)
            return z + last.bias if last.use_bias else z

        return dense_logits
    if isinstance(last, k.layers.Softmax) or (
        isinstance(last, k.layers.Activation) and act_name == "softmax"
    ):

        def pre_softmax(x: Any, training: bool = False) -> Any:
            return features(x, training=training)

        return pre_softmax
    raise CompressorError(
        f"distillation needs a model ending in a softmax (Dense(activation='softmax') or a Softmax layer); "
        f"{model.name!r} ends in {last.name!r} ({type(last).__name__}, activation {act_name})"
    )


# --------------------------------------------------------------------------------------------------------
# students


def _load(model_or_path: Any) -> Any:
    if isinstance(model_or_path, str | Path):
        from compressor.models import load_keras_model

        return load_keras_model(Path(model_or_path))
    return model_or_path


def make_student(
    teacher: Any, width: float, *, seed: int = 0, init: Literal["pruned", "random"] = "random"
) -> Any:
    """The teacher's architecture with every prunable producer's channels (Conv ``filters``, Dense
    ``units``, Embedding ``output_dim``) × ``width`` (≥ 1). Not scaled: the channels
    :mod:`compressor.prune` leaves alone (model inputs and outputs, next to a layer it cannot slice);
    layers tied by an element-wise merge stay equal.

    ``init="random"`` (default): fresh weights (seeded); ``init="pruned"`` (``width`` ≤ 1): the teacher's
    own weights, structurally pruned to the student's widths, BN statistics included.
    ``teacher`` may be a Keras model or a ``.keras`` path. Raises UnsupportedLayerError like pruning.
    """
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if init not in ("pruned", "random"):
        raise ValueError(f"init must be 'pruned' or 'random', got {init!r}")
    k = keras()
    teacher = _load(teacher)
    if init == "pruned":
        if width > 1:
            raise ValueError(f"init='pruned' needs width ≤ 1, got {width}; use init='random'")
        from compressor.prune import prune_structured

        k.utils.set_random_seed(seed)
        return prune_structured(teacher, width)[0]
    graph = _Graph(teacher)
    free = {graph.find(r) for r in graph.prunable_roots()}

    def config_for(layer: Any) -> dict:
        cfg = dict(layer.get_config())
        if layer.name in graph.info:
            root = graph.find(graph.info[layer.name].parts[0])
            if root in free and layer.name in graph.groups[root].producers:
                cfg[width_key(layer)] = max(1, round(graph.groups[root].size * width))
        return cfg

    k.utils.set_random_seed(seed)
    return _rebuild(graph, config_for, f"_student_w{width:g}")


# --------------------------------------------------------------------------------------------------------
# distillation


@dataclass(frozen=True, slots=True)
class DistillReport:
    temperature: float
    alpha: float  # weight of the hard CE term
    soft_weight: float  # 1 − alpha, weight of the T²·KL term
    epochs: int
    teacher_params: int
    student_params: int
    loss_history: tuple[float, ...]
    teacher_val_accuracy: float | None
    student_val_accuracy: float | None

    def summary(self) -> str:
        acc = ""
        if self.teacher_val_accuracy is not None and self.student_val_accuracy is not None:
            acc = (
                f", val accuracy teacher {self.teacher_val_accuracy:.4f} "
                f"student {self.student_val_accuracy:.4f}"
            )
        return (
            f"distillation T={self.temperature:g} hard weight α={self.alpha:g} soft weight "
            f"{self.soft_weight:g}, {self.epochs} epochs: params {self.teacher_params} -> "
            f"{self.student_params}{acc}"
        )


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    probs = np.concatenate([np.asarray(model(x[i : i + 256], training=False)) for i in range(0, len(x), 256)])
    return float((probs.argmax(axis=-1) == y).mean())


def distill(
    teacher: Any,
    student: Any,
    data: TrainData,
    epochs: int = 20,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    learning_rate: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    patience: int | None = 3,
) -> tuple[Any, DistillReport]:
    """Train ``student`` (a model or ``.keras`` path; trained in place) to match ``teacher``.

    ``alpha`` is the weight of the hard CE term (default 0.3, i.e. 0.7 on the soft term); ``temperature``
    defaults to 4. ``data`` is a Dataset (its validation split is scored in the report) or ``(x, y)``.
    Returns the student — a plain Keras model with a softmax output, compiled for sparse categorical
    cross-entropy — and a :class:`DistillReport`. Training is :func:`compressor.finetune.fine_tune`: BN
    statistics re-estimated, warm-up + cosine learning rate, early stopping on the validation split
    (``patience`` epochs, best epoch restored).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (weight of the hard CE term) must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    from compressor.finetune import DEFAULT_LEARNING_RATE, fine_tune

    teacher, student = _load(teacher), _load(student)
    tuned = fine_tune(
        student,
        data,
        epochs,
        learning_rate=DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate,
        batch_size=batch_size,
        seed=seed,
        teacher=teacher,
        temperature=temperature,
        alpha=alpha,
        patience=patience,
    )
    history = tuned.history["loss"]
    val = _val_arrays(data)
    report = DistillReport(
        temperature=float(temperature),
        alpha=float(alpha),
        soft_weight=float(1.0 - alpha),
        epochs=epochs,
        teacher_params=int(teacher.count_params()),
        student_params=int(student.count_params()),
        loss_history=tuple(history),
        teacher_val_accuracy=_accuracy(teacher, *val) if val is not None else None,
        student_val_accuracy=_accuracy(student, *val) if val is not None else None,
    )
    return student, report
