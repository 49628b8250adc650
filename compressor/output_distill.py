"""Fine-tuning any model toward its teacher's outputs: pruning and distillation without labels.

A detector, segmenter, regressor or any model without class labels has nothing to fine-tune on, but the
float model it came from says what every output should be on any input. So a pruned model, or a narrower
student, is trained to reproduce the teacher's outputs on the training rows. The loss, per output, is the
mean squared error divided by the variance of the teacher's output over the training rows (so outputs of
different scales, say box offsets in pixels and scores in [0, 1], weigh the same), averaged over the
outputs; 0 is a perfect copy and 1 is what predicting each output's mean would score.

Everything else is the loop of :mod:`compressor.finetune`: BN statistics re-estimated before fine-tuning
and after every epoch, warm-up + cosine learning rate (Adam), early stopping on the same loss on the
validation rows restoring the best epoch (epoch 0, the model as it came in, is measured too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from compressor._tf import keras, tf
from compressor.data import Dataset, Rows
from compressor.errors import CompressorError
from compressor.finetune import (
    DEFAULT_BN_SAMPLES,
    EVAL_BATCH,
    BestKeeper,
    FineTuneReport,
    recalibrate_batchnorm,
    schedule_steps,
    warmup_cosine,
)

# Peak Adam learning rate. Measured on the dev detector and keypoint regressor pruned to half width:
# 3e-3 recovered the most within 8 epochs; 1e-2 (the classification default) overshot on regression.
DEFAULT_OUTPUT_LEARNING_RATE = 3e-3
# The teacher's outputs on the training rows are kept in memory: at most this many bytes of them (a
# seeded subset of the rows beyond it, never fewer than MIN_ROWS rows).
MAX_TARGET_BYTES = 512 * 2**20
MIN_ROWS = 64
_EPS = 1e-12


def _call(model: Any, xs: Sequence[Any], training: bool) -> list[Any]:
    out = model(xs[0] if len(xs) == 1 else list(xs), training=training)
    return list(tf().nest.flatten(out))


def predict_outputs(model: Any, xs: Sequence[np.ndarray], batch_size: int = EVAL_BATCH) -> list[np.ndarray]:
    """Every output of ``model`` in inference mode on the rows ``xs`` (one array per input)."""
    n = len(xs[0])
    chunks = [
        [np.asarray(o) for o in _call(model, [a[i : i + batch_size] for a in xs], False)]
        for i in range(0, n, batch_size)
    ]
    if not chunks:
        raise CompressorError("no rows to compute the teacher's outputs on")
    return [np.concatenate([c[j] for c in chunks]).astype(np.float32) for j in range(len(chunks[0]))]


def output_scales(targets: Sequence[np.ndarray]) -> list[float]:
    """Per output the variance of the teacher's values (the loss divides by it; 1 for a constant)."""
    return [float(v) if (v := float(np.var(t.astype(np.float64)))) > _EPS else 1.0 for t in targets]


def normalised_error(
    outputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], scales: Sequence[float]
) -> float:
    """Mean over outputs of MSE / variance of the teacher's output (module docstring)."""
    if len(outputs) != len(targets):
        raise CompressorError(f"the student has {len(outputs)} outputs, the teacher {len(targets)}")
    errors = []
    for o, t, s in zip(outputs, targets, scales, strict=True):
        if o.shape != t.shape:
            raise CompressorError(f"student output {o.shape} does not match the teacher's {t.shape}")
        errors.append(float(np.mean((o.astype(np.float64) - t) ** 2)) / s)
    return float(np.mean(errors))


def describe(report: FineTuneReport, data: Dataset) -> str:
    """One note on a fine-tuning toward the teacher: the report's summary and the rows it used."""
    used, total = int(report.history.get("rows", [len(data.train)])[0]), len(data.train)
    capped = f" on {used} of {total} training rows (their outputs capped at {MAX_TARGET_BYTES >> 20} MiB)"
    return f"{report.summary()} toward the float model's outputs (no labels){capped if used < total else ''}"


def _capped(rows: Rows, teacher: Any, seed: int) -> Rows:
    """At most the rows whose teacher outputs fit in :data:`MAX_TARGET_BYTES` (a seeded subset): a
    segmenter's outputs on every training row could outgrow the host's memory."""
    per_row = sum(4 * math.prod(int(d or 1) for d in t.shape[1:]) for t in tf().nest.flatten(teacher.outputs))
    limit = max(MIN_ROWS, MAX_TARGET_BYTES // max(per_row, 1))
    if len(rows) <= limit:
        return rows
    pick = np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit])
    return rows.take(pick)


def fit_to_teacher(
    model: Any,
    teacher: Any,
    data: Dataset,
    epochs: int,
    *,
    learning_rate: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    patience: int | None = 3,
    min_epoch: int = 1,
    bn_samples: int = DEFAULT_BN_SAMPLES,
    callbacks: Sequence[Any] = (),
) -> FineTuneReport:
    """Train ``model`` in place to reproduce ``teacher``'s outputs on ``data``'s training rows (module
    docstring); early stopping on the validation rows. History: ``loss`` (training, per epoch),
    ``val_loss`` (epoch 0 first), ``lr``, and ``rows`` (the training rows used: all of them unless their
    teacher outputs pass :data:`MAX_TARGET_BYTES`)."""
    lr_peak = DEFAULT_OUTPUT_LEARNING_RATE if learning_rate is None else learning_rate
    if epochs < 0:
        raise ValueError(f"epochs must be ≥ 0, got {epochs}")
    if lr_peak <= 0:
        raise ValueError(f"learning_rate must be > 0, got {lr_peak}")
    k, t = keras(), tf()
    k.utils.set_random_seed(seed)
    train: Rows = data.train
    if len(train) == 0:
        raise CompressorError("fine-tuning toward the teacher needs training rows")
    train = _capped(train, teacher, seed)
    xs = list(train.inputs)
    targets = predict_outputs(teacher, xs)
    scales = output_scales(targets)
    val: Rows | None = _capped(data.val, teacher, seed + 1) if len(data.val) else None
    val_targets = predict_outputs(teacher, list(val.inputs)) if val is not None else None

    def val_error() -> float:
        assert val is not None and val_targets is not None
        return normalised_error(predict_outputs(model, list(val.inputs)), val_targets, scales)

    recal = 0

    def settle(epoch: int) -> None:
        nonlocal recal
        recal = recalibrate_batchnorm(model, xs, samples=bn_samples, seed=seed + epoch)

    variables = model.trainable_variables
    optimizer = k.optimizers.Adam(lr_peak)
    optimizer.build(variables)
    inv_scales = [1.0 / s for s in scales]

    @t.function(reduce_retracing=True, autograph=False)  # type: ignore[untyped-decorator]
    def step_fn(xb: Any, tb: Any) -> Any:
        with t.GradientTape() as tape:
            outs = _call(model, xb, True)
            terms = [
                t.reduce_mean(t.square(t.cast(o, t.float32) - target)) * w
                for o, target, w in zip(outs, tb, inv_scales, strict=True)
            ]
            value = t.add_n(terms) / len(terms)
        optimizer.apply(tape.gradient(value, variables), variables)
        return value

    total, warmup = schedule_steps(len(xs[0]), batch_size, epochs)
    cb = k.callbacks.CallbackList(list(callbacks), model=model)
    history: dict[str, list[float]] = {"loss": [], "lr": [], "rows": [float(len(xs[0]))]}
    settle(0)
    keeper = BestKeeper(model, min_epoch=min_epoch, patience=patience)
    if val is not None:
        history["val_loss"] = [val_error()]
        keeper.offer(0, (-history["val_loss"][0],))
    rng = np.random.default_rng(seed)
    step, epochs_run, lr, stopped = 0, 0, lr_peak, False
    cb.on_train_begin()
    for epoch in range(1, epochs + 1):
        cb.on_epoch_begin(epoch - 1)
        order = rng.permutation(len(xs[0]))
        total_loss, seen = 0.0, 0
        for b, start in enumerate(range(0, len(order), batch_size)):
            lr = warmup_cosine(step, peak=lr_peak, total_steps=total, warmup_steps=warmup)
            optimizer.learning_rate.assign(lr)
            idx = order[start : start + batch_size]
            cb.on_train_batch_begin(b)
            value = float(step_fn(tuple(a[idx] for a in xs), tuple(tg[idx] for tg in targets)))
            if not math.isfinite(value):
                raise CompressorError(
                    f"fine-tuning toward the teacher diverged at epoch {epoch} (loss {value})"
                )
            total_loss += value * len(idx)
            seen += len(idx)
            step += 1
            cb.on_train_batch_end(b, {"loss": value, "lr": lr})
        epochs_run = epoch
        settle(epoch)
        logs = {"loss": total_loss / max(seen, 1), "lr": lr}
        history["loss"].append(logs["loss"])
        history["lr"].append(lr)
        if val is not None:
            history["val_loss"].append(val_error())
            logs["val_loss"] = history["val_loss"][-1]
            keeper.offer(epoch, (-logs["val_loss"],))
        cb.on_epoch_end(epoch - 1, logs)
        if val is not None and keeper.exhausted and epoch < epochs:
            stopped = True
            break
    cb.on_train_end()
    best = keeper.restore() if val is not None else None
    best_epoch = epochs_run if best is None else best
    model.compile(optimizer=k.optimizers.Adam(lr_peak), loss="mse")
    return FineTuneReport(
        epochs_run=epochs_run,
        best_epoch=best_epoch,
        stopped_early=stopped,
        bn_layers_recalibrated=recal,
        distilled=True,
        history=history,
    )
