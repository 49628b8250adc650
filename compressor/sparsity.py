"""Optional unstructured steps: magnitude pruning with a sparsity schedule, and weight clustering.

Honest about their gain: both keep every weight tensor at its full shape, so the .tflite file has the same
size and the same latency (FACTS.md: tfmot's unstructured pruning gave nothing on latency). What drops is
the *compressed* (gzip) size of the file, because zeros (sparsity) or 16 distinct values (clustering)
compress well. For a smaller, faster model use structured pruning (:mod:`compressor.prune`).

Algorithm parts are numpy (schedule, magnitude mask, 1-D k-means); Keras is used only for the fine-tune
callbacks, run by the shared loop of :mod:`compressor.finetune` (BN statistics re-estimated, warm-up +
cosine learning rate, distillation from the input model, early stopping that restores the best epoch).
Written directly in Keras 3: tensorflow-model-optimization does not work with Keras 3.

* **Magnitude pruning** — polynomial-decay schedule like tfmot's ``PolynomialDecay`` (power 3): the
  target sparsity goes from ``initial_sparsity`` at ``begin_step`` to ``final_sparsity`` at ``end_step``
  (default: half-way through fine-tuning; ending at the last step left no step to recover at the final
  sparsity). After every ``frequency`` batches, each pruned kernel (default: Conv2D/Dense kernels of
  ≥ 256 weights; depthwise and tiny kernels stay dense, see :func:`magnitude_targets`) is re-masked:
  its smallest-magnitude weights are set to zero (biases are left dense). At the end the final mask is
  applied once more (tfmot's ``strip_pruning``: the zeros stay in the plain weights and the returned
  model has no pruning wrappers).
* **Weight clustering** — per kernel, 1-D k-means (Lloyd) with a deterministic init: centroids linearly
  spaced between the kernel's min and max; empty clusters keep their centroid. Weights are replaced by
  their centroid. With ``epochs > 0`` a short fine-tune keeps the cluster *assignment*: after each batch
  every centroid becomes the mean of its (just updated) weights and the weights are snapped back to it,
  i.e. each centroid moves by the average update of its members. Biases are not clustered.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compressor._tf import keras
from compressor.finetune import DEFAULT_LEARNING_RATE, fine_tune
from compressor.prune import TrainData

MIN_PRUNE_WEIGHTS = 256  # smaller kernels are left dense by default (see magnitude_targets)

GAIN_NOTE = (
    "unstructured: the .tflite keeps every weight (same file size, same latency); "
    "the gain is only in the gzip-compressed size"
)


# --------------------------------------------------------------------------------------------------------
# pure algorithm (numpy)


def polynomial_decay_sparsity(
    step: int,
    *,
    initial_sparsity: float,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    power: float = 3.0,
) -> float:
    """tfmot ``PolynomialDecay``: ``final + (initial − final)·(1 − p)^power``, p = progress in [0, 1]."""
    if end_step <= begin_step:
        return final_sparsity if step >= begin_step else initial_sparsity
    p = min(1.0, max(0.0, (step - begin_step) / (end_step - begin_step)))
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - p) ** power)


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean mask keeping all but the ``round(sparsity·size)`` smallest-magnitude weights.

    Ties are broken by position (stable sort), so the achieved sparsity is exact.
    """
    flat = np.abs(np.asarray(weights)).reshape(-1)
    drop = round(min(1.0, max(0.0, sparsity)) * flat.size)
    mask = np.ones(flat.size, dtype=bool)
    if drop:
        mask[np.argsort(flat, kind="stable")[:drop]] = False
    return mask.reshape(np.shape(weights))


def kmeans_1d(values: np.ndarray, clusters: int, iterations: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars, centroids initialised linearly between min and max.

    Returns ``(centroids (clusters,), assignment (values.shape))``; deterministic.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    lo, hi = float(flat.min()), float(flat.max())
    centroids = np.linspace(lo, hi, clusters) if hi > lo else np.full(1, lo)
    assign = np.zeros(flat.size, dtype=np.int64)
    for _ in range(iterations):
        assign = _nearest(flat, centroids)
        sums = np.bincount(assign, weights=flat, minlength=len(centroids))
        counts = np.bincount(assign, minlength=len(centroids))
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(new, centroids, rtol=0.0, atol=1e-12):
            break
        centroids = new
    assign = _nearest(flat, centroids)
    return centroids, assign.reshape(np.shape(values))


def _nearest(flat: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (centroids sorted ascending, as Lloyd keeps them in 1-D)."""
    order = np.argsort(centroids, kind="stable")
    c = centroids[order]
    if len(c) == 1:
        return np.zeros(flat.size, dtype=np.int64)
    mids = (c[1:] + c[:-1]) / 2.0
    return order[np.searchsorted(mids, flat, side="left")].astype(np.int64)


def update_centroids(values: np.ndarray, assign: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Mean of the values of each cluster (an empty cluster keeps its centroid)."""
    flat, a = np.asarray(values, dtype=np.float64).reshape(-1), assign.reshape(-1)
    sums = np.bincount(a, weights=flat, minlength=len(centroids))
    counts = np.bincount(a, minlength=len(centroids))
    return np.where(counts > 0, sums / np.maximum(counts, 1), centroids)


def gzip_size(arrays: Sequence[np.ndarray]) -> int:
    """Bytes of the arrays' raw float32 bytes after gzip (level 9, mtime 0: deterministic)."""
    raw = b"".join(np.ascontiguousarray(a, dtype=np.float32).tobytes() for a in arrays)
    return len(gzip.compress(raw, compresslevel=9, mtime=0))


def raw_size(arrays: Sequence[np.ndarray]) -> int:
    return int(sum(np.asarray(a).size for a in arrays) * 4)


# --------------------------------------------------------------------------------------------------------
# reports


@dataclass(frozen=True, slots=True)
class LayerSparsity:
    name: str
    size: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.size if self.size else 0.0


@dataclass(frozen=True, slots=True)
class SparsityReport:
    target_sparsity: float
    layers: tuple[LayerSparsity, ...]
    weights_raw_bytes: int  # all weights as float32, same before and after
    weights_gzip_before: int
    weights_gzip_after: int
    history: dict[str, list[float]]
    note: str = GAIN_NOTE

    @property
    def overall_sparsity(self) -> float:
        size = sum(lay.size for lay in self.layers)
        return sum(lay.zeros for lay in self.layers) / size if size else 0.0

    def summary(self) -> str:
        lines = [
            f"magnitude pruning to {self.target_sparsity:.0%}: achieved {self.overall_sparsity:.1%} "
            f"over the pruned kernels; weights {self.weights_raw_bytes} B raw, gzip "
            f"{self.weights_gzip_before} -> {self.weights_gzip_after} B ({self.note})"
        ]
        lines += [f"  {lay.name}: {lay.sparsity:.1%} of {lay.size}" for lay in self.layers]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class LayerClusters:
    name: str
    size: int
    unique_values: int


@dataclass(frozen=True, slots=True)
class ClusterReport:
    clusters: int
    layers: tuple[LayerClusters, ...]
    weights_raw_bytes: int
    weights_gzip_before: int
    weights_gzip_after: int
    fine_tuned_epochs: int
    history: dict[str, list[float]]
    note: str = GAIN_NOTE

    def summary(self) -> str:
        lines = [
            f"weight clustering to {self.clusters} centroids per kernel (fine-tune "
            f"{self.fine_tuned_epochs} epochs): weights {self.weights_raw_bytes} B raw, gzip "
            f"{self.weights_gzip_before} -> {self.weights_gzip_after} B ({self.note})"
        ]
        lines += [f"  {lay.name}: {lay.unique_values} distinct of {lay.size}" for lay in self.layers]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Keras glue


def _kernel_layers(model: Any, names: Sequence[str] | None) -> list[Any]:
    k = keras()
    kinds = (k.layers.Conv2D, k.layers.DepthwiseConv2D, k.layers.Dense)
    found = [layer for layer in model.layers if isinstance(layer, kinds)]
    if names is not None:
        found = [layer for layer in found if layer.name in set(names)]
    return found


def sparsity_end_step(epochs: int, steps_per_epoch: int) -> int:
    """Step at which the schedule reaches the final sparsity: the end of epoch ⌈epochs/2⌉ (≥ 1 step)."""
    return max(1, -(-epochs // 2) * steps_per_epoch)


def magnitude_targets(model: Any) -> list[Any]:
    """The kernels :func:`magnitude_prune` prunes by default: Conv2D/Dense kernels of at least
    :data:`MIN_PRUNE_WEIGHTS` weights. DepthwiseConv2D kernels (9 weights per channel: at 75 % a 3×3
    filter keeps 2 taps) and tiny kernels such as a 1-channel stem are left dense: they carry much per
    weight and their zeros save almost nothing (measured on the MobileNet-style digits model, mag75 with
    2 epochs: 87.5 % pruning every kernel, 95.6 % leaving them dense; gzip 16.8 kB vs 20.2 kB of 36.9 kB).
    """
    k = keras()
    return [
        layer
        for layer in _kernel_layers(model, None)
        if not isinstance(layer, k.layers.DepthwiseConv2D)
        and int(np.prod(layer.kernel.shape)) >= MIN_PRUNE_WEIGHTS
    ]


def _copy(model: Any) -> Any:
    from compressor.prune import clone_uncompiled

    clone = clone_uncompiled(model)
    clone.set_weights(model.get_weights())
    return clone


def _set_kernel(layer: Any, kernel: np.ndarray) -> None:
    layer.kernel.assign(kernel.astype(np.float32))


def _kernel(layer: Any) -> np.ndarray:
    return np.asarray(layer.kernel.numpy())


def _pruning_callback(
    layers: list[Any], *, final_sparsity: float, initial_sparsity: float, begin: int, end: int, frequency: int
) -> Any:
    k = keras()

    class MagnitudePruning(k.callbacks.Callback):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.step = 0
            self.masks: dict[str, np.ndarray] = {}

        def _remask(self) -> None:
            s = polynomial_decay_sparsity(
                self.step,
                initial_sparsity=initial_sparsity,
                final_sparsity=final_sparsity,
                begin_step=begin,
                end_step=end,
            )
            for layer in layers:
                self.masks[layer.name] = magnitude_mask(_kernel(layer), s)

        def _apply(self) -> None:
            for layer in layers:
                _set_kernel(layer, _kernel(layer) * self.masks[layer.name])

        def on_train_begin(self, logs: dict | None = None) -> None:
            self._remask()
            self._apply()

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.step += 1
            if self.step >= begin and (self.step - begin) % frequency == 0:
                self._remask()
            self._apply()

    return MagnitudePruning()


def magnitude_prune(
    model: Any,
    data: TrainData,
    final_sparsity: float,
    epochs: int,
    *,
    initial_sparsity: float = 0.0,
    begin_step: int = 0,
    end_step: int | None = None,
    frequency: int = 1,
    layers: Sequence[str] | None = None,
    learning_rate: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    distill_from_input: bool = True,
) -> tuple[Any, SparsityReport]:
    """Fine-tune a copy of ``model`` while masking its Conv/Dense kernels to ``final_sparsity``.

    The schedule ends at ``end_step`` (default :func:`sparsity_end_step`: half-way, so the second half of
    the epochs recovers at the final sparsity). ``layers`` names the layers to prune (default:
    :func:`magnitude_targets`, the Conv2D/Dense kernels of ≥ 256 weights). Fine-tuning is
    :func:`compressor.finetune.fine_tune` (distilled from ``model`` unless ``distill_from_input`` is
    false; early stopping only among the epochs at the final sparsity). The returned model is a plain
    Keras model whose kernels contain the zeros; the input model is not modified.
    """
    if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
        raise ValueError("need 0 ≤ initial_sparsity ≤ final_sparsity < 1")
    if epochs < 0 or frequency < 1:
        raise ValueError("epochs must be ≥ 0 and frequency ≥ 1")
    from compressor.prune import _train_arrays

    pruned = _copy(model)
    targets = _kernel_layers(pruned, layers) if layers is not None else magnitude_targets(pruned)
    gzip_before = gzip_size(pruned.get_weights())
    x, _ = _train_arrays(data)
    steps_per_epoch = -(-len(x) // batch_size)
    end = sparsity_end_step(epochs, steps_per_epoch) if end_step is None else end_step
    history: dict[str, list[float]] = {}
    if epochs:
        callback = _pruning_callback(
            targets,
            final_sparsity=final_sparsity,
            initial_sparsity=initial_sparsity,
            begin=begin_step,
            end=end,
            frequency=frequency,
        )
        history = fine_tune(
            pruned,
            data,
            epochs,
            learning_rate=DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate,
            batch_size=batch_size,
            seed=seed,
            teacher=model if distill_from_input else None,
            loss=getattr(model, "loss", None),
            min_epoch=max(1, -(-end // steps_per_epoch)),  # no epoch before the target sparsity
            callbacks=[callback],
        ).history
    for layer in targets:  # "strip": the final mask, applied to the plain weights
        kernel = _kernel(layer)
        _set_kernel(layer, kernel * magnitude_mask(kernel, final_sparsity))
    weights = pruned.get_weights()
    report = SparsityReport(
        target_sparsity=final_sparsity,
        layers=tuple(
            LayerSparsity(layer.name, int(_kernel(layer).size), int((_kernel(layer) == 0).sum()))
            for layer in targets
        ),
        weights_raw_bytes=raw_size(weights),
        weights_gzip_before=gzip_before,
        weights_gzip_after=gzip_size(weights),
        history=history,
    )
    return pruned, report


def _clustering_callback(layers: list[Any], assignments: dict[str, np.ndarray], centroids: dict) -> Any:
    k = keras()

    class KeepClusters(k.callbacks.Callback):  # type: ignore[name-defined]
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            for layer in layers:
                kernel = _kernel(layer)
                a = assignments[layer.name]
                centroids[layer.name] = update_centroids(kernel, a, centroids[layer.name])
                _set_kernel(layer, centroids[layer.name][a])

    return KeepClusters()


def cluster_weights(
    model: Any,
    clusters: int = 16,
    *,
    data: TrainData | None = None,
    epochs: int = 0,
    iterations: int = 10,
    layers: Sequence[str] | None = None,
    learning_rate: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    distill_from_input: bool = True,
) -> tuple[Any, ClusterReport]:
    """Replace every Conv/Dense kernel of a copy of ``model`` by at most ``clusters`` centroid values.

    With ``data`` and ``epochs > 0`` the clustered model is fine-tuned keeping each weight's cluster
    (centroids move by the mean update of their members) by :func:`compressor.finetune.fine_tune`,
    distilled from ``model`` unless ``distill_from_input`` is false. Without, it is clustering only.
    """
    if clusters < 1:
        raise ValueError("clusters must be ≥ 1")
    if epochs and data is None:
        raise ValueError("fine-tuning after clustering needs data")
    out = _copy(model)
    targets = _kernel_layers(out, layers)
    gzip_before = gzip_size(out.get_weights())
    assignments: dict[str, np.ndarray] = {}
    centroids: dict[str, np.ndarray] = {}
    for layer in targets:
        c, a = kmeans_1d(_kernel(layer), clusters, iterations)
        centroids[layer.name], assignments[layer.name] = c, a
        _set_kernel(layer, c[a])
    history: dict[str, list[float]] = {}
    if epochs and data is not None:
        history = fine_tune(
            out,
            data,
            epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            seed=seed,
            teacher=model if distill_from_input else None,
            loss=getattr(model, "loss", None),
            callbacks=[_clustering_callback(targets, assignments, centroids)],
        ).history
        for layer in targets:
            _set_kernel(layer, centroids[layer.name][assignments[layer.name]].astype(np.float32))
    weights = out.get_weights()
    report = ClusterReport(
        clusters=clusters,
        layers=tuple(
            LayerClusters(layer.name, int(_kernel(layer).size), int(np.unique(_kernel(layer)).size))
            for layer in targets
        ),
        weights_raw_bytes=raw_size(weights),
        weights_gzip_before=gzip_before,
        weights_gzip_after=gzip_size(weights),
        fine_tuned_epochs=epochs if data is not None else 0,
        history=history,
    )
    return out, report
