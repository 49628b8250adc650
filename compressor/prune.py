"""Structured channel pruning that really removes filters and neurons, plus a seeded fine-tune.

The rebuilt model has narrower Conv2D/Dense layers (fewer ``filters``/``units``), so the .tflite is smaller
and faster — unlike unstructured sparsity (see :mod:`compressor.sparsity`), whose gain is only in the gzip
size.

How it works (algorithm in numpy, Keras only to read the graph and rebuild it):

1. **Channel groups.** Walking the graph, every Conv2D/Dense output starts a *group* of channels.
   Channel-wise layers pass their input's group through: BatchNormalization (gamma/beta/mean/var are
   sliced), DepthwiseConv2D with ``depth_multiplier=1`` (its kernel/bias are sliced: its channels follow
   its input), pooling, GlobalAveragePooling2D/GlobalMaxPooling2D, Dropout, Activation/ReLU/LeakyReLU,
   ZeroPadding2D. ``Flatten`` turns a group of C channels over P positions into P·C features, element
   ``pos·C + c`` (Keras flattens NHWC channels-last); a Dense after it keeps rows ``pos·C + kept_c``.
2. **Residual ``Add``.** All tensors feeding one Add are merged into one group (union-find): every
   producer of the group keeps the *same* channel set, chosen by the sum of the producers' scores, each
   normalised by its mean so that no layer dominates by scale. A group tied to the model input (an
   identity shortcut from the input), to a model output (the classifier), to a channel-mixing layer
   (Softmax) or to a grouped/depth-multiplied convolution is *left unpruned*.
3. **Importance.** ``l1``: the L1 norm of each output filter (Conv2D) or weight column (Dense); when a
   BatchNormalization alone consumes the layer, the L1 norm of the folded kernel (× ``|γ|/√(σ²+ε)``),
   since BN rescales every channel and the raw kernel's norm then says nothing about its size.
   ``taylor``: first-order Taylor importance (Molchanov et al. 2017), per sample
   ``|Σ_spatial activation·∂loss/∂activation|``, averaged over the batch.
4. **Rebuild.** Each layer is re-created from its own config (``filters``/``units`` changed) and the kept
   weights are copied exactly; before fine-tuning the pruned model computes exactly what the original
   computes with the same channels zeroed (see :func:`zero_pruned_channels`).

5. **Fine-tuning** (:func:`fine_tune`, the shared loop of :mod:`compressor.finetune`): BN statistics
   re-estimated first (pruning leaves every BN after a pruned layer with stale statistics), warm-up +
   cosine learning rate, distillation from the model it was pruned from, early stopping on the
   validation split restoring the best epoch. Measurements and the before/after table: see
   :mod:`compressor.finetune`.

Any other layer type raises :class:`UnsupportedLayerError`; the final classifier's outputs are never pruned.
ReLU6 is ``ReLU(max_value=6)`` or ``Activation("relu6")``: both are channel-wise and pass through.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from compressor._tf import keras, tf
from compressor.data import Dataset
from compressor.errors import CompressorError

Criterion = Literal["l1", "taylor"]
TrainData = Dataset | tuple[np.ndarray, np.ndarray]

TAYLOR_SAMPLES = 256
TAYLOR_BATCH = 64

# pruned model -> the model it was pruned from (the default teacher of its fine-tuning)
_SOURCES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


class UnsupportedLayerError(CompressorError):
    """A layer type structured pruning (or width scaling) does not know how to handle."""

    def __init__(self, layer_name: str, class_name: str, detail: str = "") -> None:
        self.layer_name = layer_name
        self.class_name = class_name
        msg = f"structured pruning does not support layer {layer_name!r} of class {class_name}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


# --------------------------------------------------------------------------------------------------------
# reports


@dataclass(frozen=True, slots=True)
class LayerPrune:
    """One Conv2D/Dense layer: output channels (filters/units) before and after."""

    name: str
    class_name: str
    channels_before: int
    channels_after: int


@dataclass(frozen=True, slots=True)
class PruneReport:
    keep: float
    criterion: str
    layers: tuple[LayerPrune, ...]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    kept_channels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    unpruned_groups: tuple[str, ...] = ()  # why a group of channels was left alone

    def summary(self) -> str:
        lines = [
            f"structured pruning keep={self.keep:g} criterion={self.criterion}: params "
            f"{self.params_before} -> {self.params_after}"
            + (
                f", MACs {self.macs_before} -> {self.macs_after}"
                if self.macs_before is not None and self.macs_after is not None
                else ""
            )
        ]
        lines += [
            f"  {lp.name} ({lp.class_name}): {lp.channels_before} -> {lp.channels_after}"
            for lp in self.layers
        ]
        lines += [f"  unpruned: {why}" for why in self.unpruned_groups]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# pure algorithm (numpy)


def l1_scores(kernel: np.ndarray) -> np.ndarray:
    """L1 norm of each output channel of a Conv2D (kh, kw, in, out) or Dense (in, out) kernel."""
    return np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)


def taylor_scores(activation: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """Per-channel ``mean_n |Σ_spatial a·g|`` for (N, ..., C) activations and loss gradients."""
    prod = (activation.astype(np.float64) * gradient.astype(np.float64)).reshape(
        activation.shape[0], -1, activation.shape[-1]
    )
    return np.abs(prod.sum(axis=1)).mean(axis=0)


def group_scores(scores: Sequence[np.ndarray]) -> np.ndarray:
    """Combine the scores of the producers sharing one channel set: sum of mean-normalised scores."""
    total = np.zeros_like(np.asarray(scores[0], dtype=np.float64))
    for s in scores:
        s64 = np.asarray(s, dtype=np.float64)
        mean = float(s64.mean())
        total += s64 / mean if mean > 0 else s64
    return total


def channels_to_keep(channels: int, keep: float, min_channels: int = 1) -> int:
    return int(min(channels, max(min_channels, 1, round(keep * channels))))


def select_channels(score: np.ndarray, count: int) -> np.ndarray:
    """Indices (ascending) of the ``count`` highest scores; ties go to the lower index (deterministic)."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    return np.sort(order[:count])


def expand_positions(kept: np.ndarray, channels: int, positions: int) -> np.ndarray:
    """Feature indices ``pos·C + c`` kept after a Flatten of ``positions`` positions × ``channels``."""
    return (np.arange(positions)[:, None] * channels + np.asarray(kept)[None, :]).reshape(-1)


# --------------------------------------------------------------------------------------------------------
# graph analysis


@dataclass
class _Group:
    size: int
    producers: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)  # reasons


@dataclass(frozen=True, slots=True)
class _Info:
    """What a tensor's last axis holds: ``positions`` × the channels of ``group``."""

    group: int
    positions: int = 1


_PASS_THROUGH = (
    "MaxPooling2D",
    "AveragePooling2D",
    "Dropout",
    "SpatialDropout2D",
    "ReLU",
    "LeakyReLU",
    "ZeroPadding2D",
    "Identity",
)
_GLOBAL_POOL = ("GlobalAveragePooling2D", "GlobalMaxPooling2D")
_CHANNEL_MIXING_ACTIVATIONS = ("softmax", "log_softmax")


class _Graph:
    """Producer/consumer structure of a single-input Sequential or functional model (first call node)."""

    def __init__(self, model: Any) -> None:
        k = keras()
        self.model = model
        inputs = getattr(model, "inputs", None)
        if not inputs or len(inputs) != 1:
            raise CompressorError("structured pruning needs a built model with exactly one Input")
        self.input_layer = inputs[0]._keras_history[0]
        self.layers: list[Any] = [
            layer for layer in model.layers if not isinstance(layer, k.layers.InputLayer)
        ]
        by_id = {id(layer): layer for layer in self.layers}
        self.parents: dict[str, list[str | None]] = {}  # None = the model input
        for layer in self.layers:
            if isinstance(layer, k.Model):
                raise UnsupportedLayerError(
                    layer.name, type(layer).__name__, "nested models are not supported"
                )
            try:
                tensors = k.tree.flatten(layer.input)
            except (AttributeError, ValueError) as err:
                raise CompressorError(
                    f"layer {layer.name!r} has no input: build the model with keras.Input first"
                ) from err
            parents: list[str | None] = []
            for t in tensors:
                op = t._keras_history[0]
                parents.append(op.name if id(op) in by_id else None)
            self.parents[layer.name] = parents
        self.by_name = {layer.name: layer for layer in self.layers}
        self.children: dict[str, list[str]] = {layer.name: [] for layer in self.layers}
        for name, parents in self.parents.items():
            for p in parents:
                if p is not None:
                    self.children[p].append(name)
        self.order = self._topological()
        self.outputs = [t._keras_history[0].name for t in model.outputs]
        self.groups: list[_Group] = []
        self.parent_of: list[int] = []
        self.info: dict[str | None, _Info] = {}
        self.in_info: dict[str, list[_Info]] = {}
        self._analyse()

    def _topological(self) -> list[str]:
        names = [layer.name for layer in self.layers]
        done: set[str] = set()
        order: list[str] = []
        while len(order) < len(names):
            progressed = False
            for name in names:
                if name not in done and all(p is None or p in done for p in self.parents[name]):
                    done.add(name)
                    order.append(name)
                    progressed = True
            if not progressed:
                raise CompressorError("the model graph has a cycle or dangling layers")
        return order

    # union-find over groups
    def _new_group(self, size: int, producer: str | None = None, fixed: str | None = None) -> int:
        self.groups.append(_Group(size, [producer] if producer else [], [fixed] if fixed else []))
        self.parent_of.append(len(self.groups) - 1)
        return len(self.groups) - 1

    def find(self, g: int) -> int:
        while self.parent_of[g] != g:
            self.parent_of[g] = self.parent_of[self.parent_of[g]]
            g = self.parent_of[g]
        return g

    def _union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ga, gb = self.groups[ra], self.groups[rb]
        if ga.size != gb.size:
            raise CompressorError(f"Add of tensors with {ga.size} and {gb.size} channels")
        self.parent_of[rb] = ra
        ga.producers += gb.producers
        ga.fixed += gb.fixed
        return ra

    def fix(self, g: int, reason: str) -> None:
        self.groups[self.find(g)].fixed.append(reason)

    def group(self, g: int) -> _Group:
        return self.groups[self.find(g)]

    def _analyse(self) -> None:
        k = keras()
        in_channels = int(self.model.inputs[0].shape[-1])
        self.info[None] = _Info(self._new_group(in_channels, fixed="the model input"))
        for name in self.order:
            layer = self.by_name[name]
            cls = type(layer).__name__
            ins = [self.info[p] for p in self.parents[name]]
            self.in_info[name] = ins
            first = ins[0]

            def needs_unflattened(first: _Info = first, name: str = name, cls: str = cls) -> None:
                if first.positions != 1:
                    raise UnsupportedLayerError(name, cls, "after a Flatten")

            if isinstance(layer, k.layers.DepthwiseConv2D):
                needs_unflattened()
                if layer.depth_multiplier == 1:
                    out = first
                else:
                    self.fix(first.group, f"{name}: depth_multiplier={layer.depth_multiplier}")
                    size = self.group(first.group).size * layer.depth_multiplier
                    out = _Info(self._new_group(size, fixed=f"{name}: depth_multiplier"))
            elif isinstance(layer, k.layers.Conv2D) and cls in ("Conv2D", "Convolution2D"):
                needs_unflattened()
                if layer.groups != 1:
                    self.fix(first.group, f"{name}: grouped convolution")
                    out = _Info(self._new_group(layer.filters, fixed=f"{name}: grouped convolution"))
                else:
                    out = _Info(self._new_group(layer.filters, producer=name))
            elif isinstance(layer, k.layers.Dense):
                out = _Info(self._new_group(layer.units, producer=name))
            elif isinstance(layer, k.layers.BatchNormalization):
                axis = layer.axis if isinstance(layer.axis, int) else None
                rank = len(layer.input.shape)
                if axis not in (-1, rank - 1):
                    raise UnsupportedLayerError(name, cls, "only channels-last (axis=-1) is supported")
                out = first
            elif cls in _GLOBAL_POOL:
                needs_unflattened()
                if getattr(layer, "data_format", "channels_last") != "channels_last":
                    raise UnsupportedLayerError(name, cls, "only channels_last is supported")
                out = first
            elif cls == "Flatten":
                shape = layer.input.shape
                if any(d is None for d in shape[1:]):
                    raise UnsupportedLayerError(name, cls, "needs a static input shape")
                out = _Info(first.group, first.positions * math.prod(int(d) for d in shape[1:-1]))
            elif cls in _PASS_THROUGH:
                if getattr(layer, "data_format", "channels_last") != "channels_last":
                    raise UnsupportedLayerError(name, cls, "only channels_last is supported")
                out = first
            elif cls == "Activation":
                act = getattr(layer.activation, "__name__", str(layer.activation))
                if act in _CHANNEL_MIXING_ACTIVATIONS:
                    self.fix(first.group, f"{name}: {act} mixes channels")
                out = first
            elif cls == "Softmax":
                self.fix(first.group, f"{name}: softmax mixes channels")
                out = first
            elif cls == "Add":
                if len({i.positions for i in ins}) != 1:
                    raise UnsupportedLayerError(name, cls, "inputs flattened differently")
                g = ins[0].group
                for other in ins[1:]:
                    g = self._union(g, other.group)
                out = _Info(g, first.positions)
            else:
                raise UnsupportedLayerError(name, cls)
            self.info[name] = out
        for name in self.outputs:
            self.fix(self.info[name].group, f"model output {name!r} (classifier outputs are never pruned)")

    def prunable_roots(self) -> list[int]:
        roots = sorted({self.find(i) for i in range(len(self.groups))})
        return [r for r in roots if not self.groups[r].fixed and self.groups[r].producers]

    def unpruned_reasons(self) -> list[str]:
        out = []
        for r in sorted({self.find(i) for i in range(len(self.groups))}):
            g = self.groups[r]
            if g.fixed and g.producers:
                out.append(f"{', '.join(g.producers)}: {'; '.join(dict.fromkeys(g.fixed))}")
        return out

    def index(self, info: _Info, kept: Mapping[int, np.ndarray]) -> np.ndarray:
        """Indices kept along the last axis of a tensor described by ``info``."""
        root = self.find(info.group)
        size = self.groups[root].size
        if root not in kept:
            return np.arange(size * info.positions)
        return expand_positions(kept[root], size, info.positions)


# --------------------------------------------------------------------------------------------------------
# importance


def channel_importance(
    model: Any, criterion: Criterion = "l1", data: TrainData | None = None
) -> dict[str, np.ndarray]:
    """Score of each output channel of every prunable Conv2D/Dense layer (higher = more important).

    ``taylor`` needs labelled ``data`` (a Dataset or ``(x, y)``); up to 256 samples are used.
    Layers whose channels cannot be pruned (the classifier, shortcuts from the input) are not listed.
    """
    graph = _Graph(model)
    names = [p for r in graph.prunable_roots() for p in graph.groups[r].producers]
    return _importance(graph, names, criterion, data)


def _bn_scale(graph: _Graph, name: str) -> np.ndarray | float:
    """``|γ|/√(σ²+ε)`` of the BatchNormalization that alone consumes ``name`` (else 1).

    A BN rescales every channel of its conv, so the conv kernel's own L1 norm says nothing about the
    channel's size downstream; the folded kernel's L1 norm (kernel · |γ|/√(σ²+ε)) does.
    """
    k = keras()
    children = graph.children.get(name, [])
    if len(children) != 1 or not isinstance(graph.by_name[children[0]], k.layers.BatchNormalization):
        return 1.0
    bn = graph.by_name[children[0]]
    gamma = np.abs(np.asarray(bn.gamma)) if bn.scale else 1.0
    return np.asarray(gamma / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon), dtype=np.float64)


def _importance(
    graph: _Graph, names: list[str], criterion: str, data: TrainData | None
) -> dict[str, np.ndarray]:
    if criterion == "l1":
        return {
            n: l1_scores(np.asarray(graph.by_name[n].get_weights()[0])) * _bn_scale(graph, n) for n in names
        }
    if criterion != "taylor":
        raise ValueError(f"unknown importance criterion {criterion!r}; use 'l1' or 'taylor'")
    if data is None:
        raise ValueError("the taylor criterion needs labelled data")
    if not names:
        return {}
    k, t = keras(), tf()
    x, y = _train_arrays(data)
    x, y = x[:TAYLOR_SAMPLES], y[:TAYLOR_SAMPLES]
    model = graph.model
    probe = k.Model(model.inputs, [graph.by_name[n].output for n in names] + [model.outputs[0]])
    logits = _outputs_logits(model)
    totals = {n: np.zeros(graph.by_name[n].output.shape[-1]) for n in names}
    for start in range(0, len(x), TAYLOR_BATCH):
        xb = t.convert_to_tensor(x[start : start + TAYLOR_BATCH])
        yb = t.convert_to_tensor(y[start : start + TAYLOR_BATCH])
        with t.GradientTape() as tape:
            outs = probe(xb, training=False)
            acts, pred = outs[:-1], outs[-1]
            loss = t.reduce_sum(k.losses.sparse_categorical_crossentropy(yb, pred, from_logits=logits))
        grads = tape.gradient(loss, acts)
        for n, a, g in zip(names, acts, grads, strict=True):
            totals[n] += taylor_scores(np.asarray(a), np.asarray(g)) * len(xb)
    return {n: v / len(x) for n, v in totals.items()}


# --------------------------------------------------------------------------------------------------------
# pruning


def _plan(
    graph: _Graph, keep: float, criterion: str, data: TrainData | None, min_channels: int
) -> dict[int, np.ndarray]:
    roots = graph.prunable_roots()
    names = [p for r in roots for p in graph.groups[r].producers]
    scores = _importance(graph, names, criterion, data)
    kept: dict[int, np.ndarray] = {}
    for r in roots:
        g = graph.groups[r]
        count = channels_to_keep(g.size, keep, min_channels)
        if count < g.size:
            kept[r] = select_channels(group_scores([scores[p] for p in g.producers]), count)
    return kept


def _slice_weights(graph: _Graph, name: str, kept: Mapping[int, np.ndarray]) -> list[np.ndarray]:
    k = keras()
    layer = graph.by_name[name]
    weights = [np.asarray(w) for w in layer.get_weights()]
    if not weights:
        return weights
    ins = graph.in_info[name]
    in_idx = graph.index(ins[0], kept)
    if isinstance(layer, k.layers.DepthwiseConv2D):
        return [weights[0][:, :, in_idx, :], *(w[in_idx] for w in weights[1:])]
    if isinstance(layer, k.layers.BatchNormalization):
        return [w[in_idx] for w in weights]
    out_idx = graph.index(graph.info[name], kept)
    if isinstance(layer, k.layers.Conv2D):
        return [weights[0][:, :, in_idx, :][..., out_idx], *(w[out_idx] for w in weights[1:])]
    if isinstance(layer, k.layers.Dense):
        return [weights[0][in_idx][:, out_idx], *(w[out_idx] for w in weights[1:])]
    raise UnsupportedLayerError(name, type(layer).__name__, "has weights it cannot slice")


def _rebuild(graph: _Graph, config_for: Callable[[Any], dict], name_suffix: str) -> Any:
    """A new model with the same topology, each layer created from ``config_for(layer)``."""
    k = keras()
    model = graph.model
    spec = model.inputs[0]
    new_layers = {n: type(graph.by_name[n]).from_config(config_for(graph.by_name[n])) for n in graph.order}
    if isinstance(model, k.Sequential):
        inp = k.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype)
        layers = [inp, *(new_layers[layer.name] for layer in graph.layers)]
        return k.Sequential(layers, name=f"{model.name}{name_suffix}")
    inp = k.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name=graph.input_layer.name)
    tensors: dict[str | None, Any] = {None: inp}
    for n in graph.order:
        args = [tensors[p] for p in graph.parents[n]]
        tensors[n] = new_layers[n](args if len(args) > 1 else args[0])
    outputs = [tensors[n] for n in graph.outputs]
    return k.Model(inp, outputs if len(outputs) > 1 else outputs[0], name=f"{model.name}{name_suffix}")


def prune_structured(
    model: Any,
    keep: float,
    criterion: Criterion = "l1",
    data: TrainData | None = None,
    min_channels: int = 1,
) -> tuple[Any, PruneReport]:
    """Keep ``round(keep·C)`` (≥ ``min_channels``) output channels of every prunable Conv2D/Dense layer.

    Returns a new, narrower, uncompiled model (same layer names) and a :class:`PruneReport`. The input
    model is not modified. Residual groups (tensors meeting in an ``Add``) keep one shared channel set.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if min_channels < 1:
        raise ValueError("min_channels must be ≥ 1")
    k = keras()
    from compressor.models import count_macs, count_params

    graph = _Graph(model)
    kept = _plan(graph, keep, criterion, data, min_channels)

    def config_for(layer: Any) -> dict:
        cfg = dict(layer.get_config())
        if isinstance(layer, k.layers.Conv2D) and not isinstance(layer, k.layers.DepthwiseConv2D):
            cfg["filters"] = len(graph.index(graph.info[layer.name], kept))
        elif isinstance(layer, k.layers.Dense):
            cfg["units"] = len(graph.index(graph.info[layer.name], kept))
        return cfg

    new_model = _rebuild(graph, config_for, "_pruned")
    _SOURCES[new_model] = model
    for n in graph.order:
        weights = _slice_weights(graph, n, kept)
        if weights:
            new_model.get_layer(n).set_weights(weights)

    layers = []
    kept_channels: dict[str, tuple[int, ...]] = {}
    for n in graph.order:
        layer = graph.by_name[n]
        if n in graph.group(graph.info[n].group).producers:
            idx = graph.index(graph.info[n], kept)
            kept_channels[n] = tuple(int(i) for i in idx)
            before = graph.group(graph.info[n].group).size
            layers.append(LayerPrune(n, type(layer).__name__, before, len(idx)))
    report = PruneReport(
        keep=keep,
        criterion=criterion,
        layers=tuple(layers),
        params_before=count_params(model),
        params_after=count_params(new_model),
        macs_before=count_macs(model),
        macs_after=count_macs(new_model),
        kept_channels=kept_channels,
        unpruned_groups=tuple(graph.unpruned_reasons()),
    )
    return new_model, report


def pruned_from(model: Any) -> Any | None:
    """The model :func:`prune_structured` pruned ``model`` from (None for any other model)."""
    try:
        return _SOURCES.get(model)
    except TypeError:  # not weak-referenceable or unhashable: not one of ours
        return None


def zero_pruned_channels(model: Any, report: PruneReport) -> Any:
    """A copy of ``model`` whose pruned channels are zeroed: their filters and their downstream weights.

    The reference the pruned model must match exactly before fine-tuning: for every Conv2D/Dense the
    filters not kept (kernel columns and bias) and the input rows fed by pruned channels are set to 0.
    """
    k = keras()
    graph = _Graph(model)
    kept: dict[int, np.ndarray] = {}
    for name, idx in report.kept_channels.items():
        root = graph.find(graph.info[name].group)
        if len(idx) < graph.groups[root].size:
            kept[root] = np.asarray(idx, dtype=int)
    clone = k.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for n in graph.order:
        layer = graph.by_name[n]
        if isinstance(layer, k.layers.DepthwiseConv2D) or not isinstance(
            layer, k.layers.Conv2D | k.layers.Dense
        ):
            continue
        weights = [np.array(w) for w in layer.get_weights()]
        in_size = weights[0].shape[-2]
        in_mask = np.zeros(in_size, dtype=bool)
        in_mask[graph.index(graph.in_info[n][0], kept)] = True
        out_mask = np.zeros(weights[0].shape[-1], dtype=bool)
        out_mask[graph.index(graph.info[n], kept)] = True
        weights[0][..., ~in_mask, :] = 0.0
        weights[0][..., ~out_mask] = 0.0
        for w in weights[1:]:
            w[~out_mask] = 0.0
        clone.get_layer(n).set_weights(weights)
    return clone


# --------------------------------------------------------------------------------------------------------
# fine-tuning


def _train_arrays(data: TrainData) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, Dataset):
        return data.x_train, data.y_train
    x, y = data
    return np.asarray(x, dtype=np.float32), np.asarray(y)


def _val_arrays(data: TrainData) -> tuple[np.ndarray, np.ndarray] | None:
    return (data.x_val, data.y_val) if isinstance(data, Dataset) else None


def _outputs_logits(model: Any) -> bool:
    """True when the model ends in Dense(K) with no activation (logits), see compressor.validate."""
    from compressor.errors import DataError
    from compressor.validate import keras_signature

    try:
        return keras_signature(model).output == "logits"
    except DataError:
        return False


def classifier_loss(model: Any) -> Any:
    """Sparse categorical cross-entropy on the model's output: probabilities, or logits for Dense(K)."""
    if _outputs_logits(model):
        return keras().losses.SparseCategoricalCrossentropy(from_logits=True)
    return "sparse_categorical_crossentropy"


def fine_tune(
    model: Any,
    data: TrainData,
    epochs: int,
    *,
    learning_rate: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    loss: Any = None,
    callbacks: Sequence[Any] = (),
    teacher: Any = "auto",
    patience: int | None = 3,
) -> dict[str, list[float]]:
    """Fine-tune ``model`` with :func:`compressor.finetune.fine_tune` and return its per-epoch history.

    BN statistics re-estimated, warm-up + cosine learning rate peaking at ``learning_rate`` (default
    :data:`compressor.finetune.DEFAULT_LEARNING_RATE`), early stopping on
    ``data``'s validation split (a Dataset) restoring the best epoch. ``teacher="auto"``: a model returned
    by :func:`prune_structured` is distilled from the model it was pruned from (label loss otherwise);
    pass a model to distil from it, or None for the label loss (``loss``, default sparse categorical
    cross-entropy on the output).
    """
    from compressor.finetune import DEFAULT_LEARNING_RATE
    from compressor.finetune import fine_tune as run

    if isinstance(teacher, str):
        if teacher != "auto":
            raise ValueError(f"teacher must be 'auto', a model or None, not {teacher!r}")
        teacher = pruned_from(model)
    report = run(
        model,
        data,
        epochs,
        learning_rate=DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate,
        batch_size=batch_size,
        seed=seed,
        teacher=teacher,
        loss=None if teacher is not None else loss,
        patience=patience,
        callbacks=callbacks,
    )
    return report.history
