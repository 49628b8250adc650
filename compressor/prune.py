"""Structured channel pruning that really removes filters and neurons, plus a seeded fine-tune.

The rebuilt model has narrower Conv2D/Dense layers (fewer ``filters``/``units``), so the .tflite is smaller
and faster — unlike unstructured sparsity (see :mod:`compressor.sparsity`), whose gain is only in the gzip
size.

How it works (algorithm in numpy, Keras only to read the graph and rebuild it):

1. **Channel groups.** Walking the graph, every Conv1D/2D/3D, Conv*DTranspose, Dense and Embedding output
   starts a *group* of channels. Channel-wise layers pass their input's group through: BatchNormalization
   (gamma/beta/mean/var are sliced), DepthwiseConv with ``depth_multiplier=1`` (its kernel/bias are
   sliced: its channels follow its input), pooling, global pooling, dropout, ReLU-like activations,
   padding, cropping, upsampling. ``Flatten`` turns a group of C channels over P positions into P·C
   features, element ``pos·C + c`` (Keras flattens channels-last); a Dense after it keeps rows
   ``pos·C + kept_c``. ``Concatenate`` on the last axis puts its inputs' groups side by side.
2. **Element-wise merges** (Add, Multiply, Average, ...). All tensors feeding one merge are tied into one
   group (union-find): every producer of the group keeps the *same* channel set, chosen by the sum of the
   producers' scores, each normalised by its mean so that no layer dominates by scale. A group tied to a
   model input or output, or consumed by a *barrier*, is *left unpruned*: a barrier is any layer this
   module cannot slice (attention, LayerNormalization, recurrent layers, Softmax, Reshape, nested models,
   grouped or depth-multiplied convolutions...). It is copied unchanged and the rest of the model is
   still pruned; the report lists every group left alone and why.
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

A model in which no group can be pruned raises :class:`UnsupportedLayerError`; model outputs are never
pruned.
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
    """A model, or one of its layers, that structured pruning (or width scaling) cannot handle."""

    def __init__(self, layer_name: str, class_name: str, detail: str = "", *, message: str = "") -> None:
        self.layer_name = layer_name
        self.class_name = class_name
        msg = f"structured pruning does not support layer {layer_name!r} of class {class_name}"
        super().__init__(message or (f"{msg}: {detail}" if detail else msg))


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
    """L1 norm of each output channel (last axis) of a kernel: Conv (…, in, out), Dense (in, out)."""
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
    """What a tensor's last axis holds: ``positions`` × the channels of ``parts`` (several groups side by
    side after a Concatenate; one group otherwise)."""

    parts: tuple[int, ...]
    positions: int = 1

    @property
    def group(self) -> int:
        """The one group of a tensor that is not a concatenation (a producer's output)."""
        if len(self.parts) != 1:
            raise CompressorError("internal: a concatenated tensor has no single channel group")
        return self.parts[0]


_PASS_THROUGH = (
    "MaxPooling1D",
    "MaxPooling2D",
    "MaxPooling3D",
    "AveragePooling1D",
    "AveragePooling2D",
    "AveragePooling3D",
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "ZeroPadding1D",
    "ZeroPadding2D",
    "ZeroPadding3D",
    "Cropping1D",
    "Cropping2D",
    "Cropping3D",
    "UpSampling1D",
    "UpSampling2D",
    "UpSampling3D",
    "Identity",
)
_GLOBAL_POOL = (
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalAveragePooling3D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "GlobalMaxPooling3D",
)
_ELEMENTWISE = ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
_CHANNEL_MIXING_ACTIVATIONS = ("softmax", "log_softmax")

_Key = tuple[str, int]  # (layer name, output index): one tensor of the graph


def _is_conv(layer: Any) -> bool:
    """A plain (not depthwise, separable or transposed) 1-D, 2-D or 3-D convolution."""
    k = keras()
    return isinstance(layer, k.layers.Conv1D | k.layers.Conv2D | k.layers.Conv3D) and type(
        layer
    ).__name__ in ("Conv1D", "Conv2D", "Conv3D", "Convolution1D", "Convolution2D", "Convolution3D")


def _is_conv_transpose(layer: Any) -> bool:
    return type(layer).__name__ in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")


def _kernel_axes(layer: Any) -> tuple[int | None, int]:
    """(input-channel axis or None, output-channel axis) of a producer's kernel: Conv (…, in, out), Dense
    (in, out), transposed Conv (…, out, in), Embedding (vocabulary, out)."""
    if _is_conv_transpose(layer):
        return -1, -2
    if type(layer).__name__ == "Embedding":
        return None, -1
    return -2, -1


def width_key(layer: Any) -> str:
    """The config entry holding a producer's output channels."""
    cfg = layer.get_config()
    for key in ("units", "filters", "output_dim"):
        if key in cfg:
            return key
    raise UnsupportedLayerError(layer.name, type(layer).__name__, "has no channel count in its config")


def _only_unit_axes(layer: Any) -> bool:
    """A reshape that adds or drops axes of size 1 around the channels, (N, C) <-> (N, 1, 1, C): the
    squeeze-and-excitation pattern; channels pass through unchanged."""
    shapes = [layer.input.shape, layer.output.shape]
    if any(s[-1] is None or any(d is None for d in s[1:-1]) for s in shapes):
        return False
    return shapes[0][-1] == shapes[1][-1] and all(math.prod(s[1:-1]) == 1 for s in shapes)


def _weights(op: Any) -> list[Any]:
    """A layer's weights; none for a Keras op applied to tensors (``x + y``)."""
    return list(op.get_weights()) if isinstance(op, keras().layers.Layer) else []


def _take(array: np.ndarray, axis: int, idx: np.ndarray | None) -> np.ndarray:
    return array if idx is None else np.take(array, idx, axis=axis)


class _Graph:
    """Producer/consumer structure of a Sequential or functional model (each layer's first call).

    Conv1D/2D/3D, Conv*DTranspose, Dense and Embedding produce channels that can be pruned; channel-wise
    layers pass their input's channels through; element-wise merges tie their inputs' channels together;
    Concatenate (last axis) puts them side by side. Any other layer (attention, normalisation across
    channels, recurrent layers, reshapes, nested models...) is a *barrier*: it is copied unchanged, and the
    channels it consumes and produces are left unpruned (reported), so the rest of the model still is.
    """

    def __init__(self, model: Any) -> None:
        k = keras()
        self.model = model
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise CompressorError("structured pruning needs a built model: build it with keras.Input first")
        self.inputs = [t._keras_history[0].name for t in inputs]
        # a functional model's operations include the Keras ops applied to tensors (``x + y``, ops.mean)
        ops = getattr(model, "operations", None) or model.layers
        self.layers: list[Any] = [op for op in ops if not isinstance(op, k.layers.InputLayer)]
        self.by_name = {layer.name: layer for layer in self.layers}
        self.parents: dict[str, list[_Key]] = {}
        # the nodes of this model's graph (a layer also has nodes from other models built on it)
        graph_nodes = getattr(model, "_nodes", None) or getattr(
            getattr(model, "_functional", None), "_nodes", None
        )
        for layer in self.layers:
            nodes = getattr(layer, "_inbound_nodes", [])
            own = [
                n
                for i, n in enumerate(nodes)
                if n.arguments is not None
                and n.arguments.keras_tensors
                # Keras keys a model's nodes "<id(op)>_ib-<node index>" (keras.src.ops.function)
                and (not graph_nodes or f"{id(layer)}_ib-{i}" in graph_nodes)
            ]
            if not own:
                raise CompressorError(
                    f"layer {layer.name!r} has no input: build the model with keras.Input first"
                )
            if len(own) > 1:  # one name, several tensors: this walk keys tensors by layer name
                raise UnsupportedLayerError(layer.name, type(layer).__name__, "a shared layer (called twice)")
            self.parents[layer.name] = [
                (t._keras_history[0].name, int(t._keras_history[2])) for t in own[0].arguments.keras_tensors
            ]
        known = set(self.by_name) | set(self.inputs)
        for name, parents in self.parents.items():
            if any(p not in known for p, _ in parents):
                raise CompressorError(f"layer {name!r} reads a tensor from outside the model")
        self.children: dict[str, list[str]] = {layer.name: [] for layer in self.layers}
        for name, parents in self.parents.items():
            for p, _ in parents:
                if p in self.children:
                    self.children[p].append(name)
        self.order = self._topological()
        self.outputs: list[_Key] = [
            (t._keras_history[0].name, int(t._keras_history[2])) for t in model.outputs
        ]
        self.groups: list[_Group] = []
        self.parent_of: list[int] = []
        self.tensors: dict[_Key, _Info] = {}
        self.info: dict[str, _Info] = {}  # a layer's (first) output
        self.in_info: dict[str, list[_Info]] = {}
        self._analyse()

    def _topological(self) -> list[str]:
        names = [layer.name for layer in self.layers]
        done: set[str] = set(self.inputs)
        order: list[str] = []
        while len(order) < len(names):
            progressed = False
            for name in names:
                if name not in done and all(p in done for p, _ in self.parents[name]):
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
            raise CompressorError(f"internal: merging channel groups of {ga.size} and {gb.size}")
        self.parent_of[rb] = ra
        ga.producers += gb.producers
        ga.fixed += gb.fixed
        return ra

    def fix(self, g: int, reason: str) -> None:
        self.groups[self.find(g)].fixed.append(reason)

    def fix_all(self, info: _Info, reason: str) -> None:
        for g in info.parts:
            self.fix(g, reason)

    def group(self, g: int) -> _Group:
        return self.groups[self.find(g)]

    def sizes(self, info: _Info) -> list[int]:
        return [self.group(g).size for g in info.parts]

    def _fixed_tensor(self, size: int, reason: str) -> _Info:
        return _Info((self._new_group(size, fixed=reason),))

    def _barrier(self, name: str, layer: Any, ins: list[_Info], why: str) -> list[_Info]:
        """Channels into and out of ``layer`` left alone; its outputs start fixed groups."""
        reason = f"{name} ({type(layer).__name__}) {why}"
        for i in ins:
            self.fix_all(i, reason)
        outs = []
        for t in keras().tree.flatten(layer.output):
            last = t.shape[-1] if len(t.shape) else 1
            outs.append(self._fixed_tensor(int(last) if last is not None else 0, reason))
        return outs

    def _analyse(self) -> None:
        for name, t in zip(self.inputs, self.model.inputs, strict=True):
            last = t.shape[-1] if len(t.shape) else 1
            self.tensors[(name, 0)] = self._fixed_tensor(int(last or 0), "the model input")
        for name in self.order:
            layer = self.by_name[name]
            ins = [self.tensors[p] for p in self.parents[name]]
            self.in_info[name] = ins
            outs = self._step(name, layer, ins)
            for i, info in enumerate(outs):
                self.tensors[(name, i)] = info
            self.info[name] = outs[0]
        for key in self.outputs:
            self.fix_all(self.tensors[key], f"model output {key[0]!r} (model outputs are never pruned)")

    def _step(self, name: str, layer: Any, ins: list[_Info]) -> list[_Info]:
        """The output(s) of one layer, from its inputs (module docstring)."""
        k = keras()
        cls = type(layer).__name__
        first = ins[0]
        channels_last = getattr(layer, "data_format", "channels_last") in ("channels_last", None)
        if not channels_last:
            return self._barrier(name, layer, ins, "is channels_first")
        if cls in ("DepthwiseConv1D", "DepthwiseConv2D"):
            if first.positions != 1:
                return self._barrier(name, layer, ins, "follows a Flatten")
            if layer.depth_multiplier == 1:
                return [first]
            return self._barrier(name, layer, ins, f"has depth_multiplier={layer.depth_multiplier}")
        if _is_conv(layer) or _is_conv_transpose(layer):
            if first.positions != 1:
                return self._barrier(name, layer, ins, "follows a Flatten")
            if getattr(layer, "groups", 1) != 1:
                return self._barrier(name, layer, ins, "is a grouped convolution")
            return [_Info((self._new_group(layer.filters, producer=name),))]
        if isinstance(layer, k.layers.Dense):
            return [_Info((self._new_group(layer.units, producer=name),))]
        if cls == "Embedding":
            return [_Info((self._new_group(layer.output_dim, producer=name),))]
        if isinstance(layer, k.layers.BatchNormalization):
            axis = layer.axis if isinstance(layer.axis, int) else None
            if axis not in (-1, len(layer.input.shape) - 1):
                return self._barrier(name, layer, ins, "normalises another axis than the last")
            return [first]
        if cls in _GLOBAL_POOL:
            if first.positions != 1:
                return self._barrier(name, layer, ins, "follows a Flatten")
            return [first]
        if cls == "Flatten":
            shape = layer.input.shape
            if any(d is None for d in shape[1:]):
                return self._barrier(name, layer, ins, "has a dynamic input shape")
            return [_Info(first.parts, first.positions * math.prod(int(d) for d in shape[1:-1]))]
        if cls in _PASS_THROUGH or (cls == "Reshape" and _only_unit_axes(layer)):
            return [first]
        if cls == "Activation":
            act = getattr(layer.activation, "__name__", str(layer.activation))
            if act in _CHANNEL_MIXING_ACTIVATIONS:
                return self._barrier(name, layer, ins, f"applies {act} across channels")
            return [first]
        if cls == "Softmax":
            return self._barrier(name, layer, ins, "applies softmax across channels")
        if cls in _ELEMENTWISE:
            return self._merge(name, layer, ins)
        if cls == "Concatenate":
            rank = len(layer.output.shape)
            if layer.axis not in (-1, rank - 1) or any(i.positions != 1 for i in ins):
                return self._barrier(name, layer, ins, "does not join channels on the last axis")
            return [_Info(tuple(g for i in ins for g in i.parts))]
        return self._barrier(name, layer, ins, "is not channel-wise")

    def _merge(self, name: str, layer: Any, ins: list[_Info]) -> list[_Info]:
        """Element-wise merge: inputs with the same channel layout share one channel set, part by part."""
        layouts = {(tuple(self.sizes(i)), i.positions) for i in ins}
        if len(layouts) != 1 or any(len(t.shape) == 0 for t in keras().tree.flatten(layer.input)):
            return self._barrier(name, layer, ins, "merges tensors of different channel layouts")
        first = ins[0]
        parts = list(first.parts)
        for other in ins[1:]:
            parts = [self._union(a, b) for a, b in zip(parts, other.parts, strict=True)]
        return [_Info(tuple(parts), first.positions)]

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

    def index(self, info: _Info, kept: Mapping[int, np.ndarray]) -> np.ndarray | None:
        """Indices kept along the last axis of a tensor described by ``info`` (None: all of them)."""
        roots = [self.find(g) for g in info.parts]
        if not any(r in kept for r in roots):
            return None
        pieces, offset = [], 0
        for r in roots:
            size = self.groups[r].size
            pieces.append(np.asarray(kept[r] if r in kept else np.arange(size)) + offset)
            offset += size
        channels = np.concatenate(pieces)
        if info.positions == 1:
            return channels
        return expand_positions(channels, offset, info.positions)

    def width(self, name: str, kept: Mapping[int, np.ndarray]) -> int:
        """Output channels a producer keeps."""
        idx = self.index(self.info[name], kept)
        return self.group(self.info[name].group).size if idx is None else len(idx)


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
            n: l1_scores(
                np.moveaxis(
                    np.asarray(graph.by_name[n].get_weights()[0]), _kernel_axes(graph.by_name[n])[1], -1
                )
            )
            * _bn_scale(graph, n)
            for n in names
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
    """``name``'s weights with the pruned channels removed (unchanged for a barrier layer)."""
    layer = graph.by_name[name]
    weights = [np.asarray(w) for w in _weights(layer)]
    return _select_channels(graph, name, weights, kept, _take)


def _select_channels(
    graph: _Graph,
    name: str,
    weights: list[np.ndarray],
    kept: Mapping[int, np.ndarray],
    apply: Callable[[np.ndarray, int, np.ndarray | None], np.ndarray],
) -> list[np.ndarray]:
    """``apply(weight, axis, kept indices)`` along every channel axis of ``name``'s weights: the one walk
    both slicing (prune_structured) and zeroing (zero_pruned_channels) take."""
    if not weights:
        return weights
    layer = graph.by_name[name]
    cls = type(layer).__name__
    in_idx = graph.index(graph.in_info[name][0], kept)
    if cls in ("DepthwiseConv1D", "DepthwiseConv2D"):  # channel-wise: kernel (…, C, 1), bias (C,)
        return [apply(weights[0], -2, in_idx), *(apply(w, 0, in_idx) for w in weights[1:])]
    if cls == "BatchNormalization":
        return [apply(w, 0, in_idx) for w in weights]
    if name not in graph.group(graph.info[name].parts[0]).producers:
        if in_idx is not None or graph.index(graph.info[name], kept) is not None:
            raise UnsupportedLayerError(name, cls, "has weights it cannot slice")  # pragma: no cover
        return weights  # a barrier (or a weightless channel-wise layer): left as it is
    out_idx = graph.index(graph.info[name], kept)
    in_axis, out_axis = _kernel_axes(layer)
    kernel = apply(weights[0], out_axis, out_idx)
    if in_axis is not None:
        kernel = apply(kernel, in_axis, in_idx)
    return [kernel, *(apply(w, 0, out_idx) for w in weights[1:])]


def clone_uncompiled(model: Any, clone_function: Callable[[Any], Any] | None = None) -> Any:
    """``keras.models.clone_model`` without its compile step.

    Keras recompiles a compiled functional clone from the compile config, which raises on a user's
    unregistered custom loss or metric ("Could not locate function"); the transforms compile what they
    train themselves, so the clone needs no compile state.
    """
    k = keras()
    compiled = getattr(model, "compiled", False)
    try:
        model.compiled = False
        return k.models.clone_model(model, clone_function=clone_function or _fresh_or_shared)
    finally:
        model.compiled = compiled


def _fresh_or_shared(layer: Any) -> Any:
    """A new layer from ``layer``'s config; a layer without weights (Reshape, Rescaling, a Lambda...) is
    shared as is: nothing of it can change, and a Lambda's Python function may not survive its config."""
    if not _weights(layer) and not isinstance(layer, keras().layers.InputLayer):
        return layer  # also a Keras op applied to tensors (x + y): not a layer, nothing to re-create
    return type(layer).from_config(layer.get_config())


def _rebuild(graph: _Graph, config_for: Callable[[Any], dict], name_suffix: str) -> Any:
    """A new model with the same topology, each layer created from ``config_for(layer)`` (a producer's new
    width in its config); a unit-axes Reshape follows the width of the channels it carries."""
    k = keras()
    configs = {n: config_for(op) for n, op in graph.by_name.items() if isinstance(op, k.layers.Layer)}
    widths: dict[int, int] = {}  # group root -> its channels after the rebuild
    for n, cfg in configs.items():
        parts = graph.info[n].parts
        if len(parts) == 1 and n in graph.group(parts[0]).producers:
            widths[graph.find(parts[0])] = int(cfg[width_key(graph.by_name[n])])
    for n, cfg in configs.items():
        if type(graph.by_name[n]).__name__ == "Reshape" and graph.info[n] == graph.in_info[n][0]:
            channels = sum(widths.get(graph.find(g), graph.group(g).size) for g in graph.info[n].parts)
            cfg["target_shape"] = (*tuple(cfg["target_shape"])[:-1], channels)

    def clone(layer: Any) -> Any:
        cfg = configs.get(layer.name)
        if isinstance(layer, k.layers.InputLayer) or cfg is None:
            return _fresh_or_shared(layer)
        if not _weights(layer) and cfg == layer.get_config():
            return layer  # weightless and unchanged: shared (see _fresh_or_shared)
        return type(layer).from_config(cfg)

    model = clone_uncompiled(graph.model, clone)
    model.name = f"{graph.model.name}{name_suffix}"
    return model


def prune_structured(
    model: Any,
    keep: float,
    criterion: Criterion = "l1",
    data: TrainData | None = None,
    min_channels: int = 1,
) -> tuple[Any, PruneReport]:
    """Keep ``round(keep·C)`` (≥ ``min_channels``) output channels of every prunable producer (Conv, Dense,
    transposed Conv, Embedding).

    Returns a new, narrower, uncompiled model (same layer names) and a :class:`PruneReport`. The input
    model is not modified. Channels tied by an element-wise merge keep one shared channel set; channels
    next to a layer pruning cannot handle are kept (``PruneReport.unpruned_groups`` says why).
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if min_channels < 1:
        raise ValueError("min_channels must be ≥ 1")
    from compressor.models import count_macs, count_params

    graph = _Graph(model)
    if not graph.prunable_roots():
        why = "; ".join(graph.unpruned_reasons()) or "it has no Conv, Dense or Embedding layer"
        raise UnsupportedLayerError(
            model.name,
            type(model).__name__,
            message=f"structured pruning finds no channels to prune in {model.name!r}: {why}",
        )
    kept = _plan(graph, keep, criterion, data, min_channels)

    def config_for(layer: Any) -> dict:
        cfg = dict(layer.get_config())
        if layer.name in graph.info and layer.name in graph.group(graph.info[layer.name].parts[0]).producers:
            cfg[width_key(layer)] = graph.width(layer.name, kept)
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
        group = graph.group(graph.info[n].parts[0])
        if n in group.producers:
            idx = graph.index(graph.info[n], kept)
            kept_channels[n] = tuple(int(i) for i in (np.arange(group.size) if idx is None else idx))
            layers.append(LayerPrune(n, type(layer).__name__, group.size, len(kept_channels[n])))
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

    The reference the pruned model must match exactly before fine-tuning: for every producer the filters
    not kept (kernel slices and bias) and the input rows fed by pruned channels are set to 0, and the
    channel-wise layers (BatchNormalization, depthwise) between them keep only the kept channels' values
    (a zeroed BN channel would add its beta back).
    """
    graph = _Graph(model)
    kept: dict[int, np.ndarray] = {}
    for name, idx in report.kept_channels.items():
        root = graph.find(graph.info[name].group)
        if len(idx) < graph.groups[root].size:
            kept[root] = np.asarray(idx, dtype=int)

    def zero_outside(w: np.ndarray, axis: int, idx: np.ndarray | None) -> np.ndarray:
        if idx is None:
            return w
        mask = np.zeros(w.shape[axis], dtype=bool)
        mask[idx] = True
        shape = [1] * w.ndim
        shape[axis] = -1
        return np.where(mask.reshape(shape), w, 0.0).astype(w.dtype)

    clone = clone_uncompiled(model)
    clone.set_weights(model.get_weights())
    for n in graph.order:
        layer = graph.by_name[n]
        if n not in graph.group(graph.info[n].parts[0]).producers:
            continue  # channel-wise layers keep their values: a pruned channel is 0 wherever it comes from
        weights = [np.array(w) for w in layer.get_weights()]
        clone.get_layer(n).set_weights(_select_channels(graph, n, weights, kept, zero_outside))
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
