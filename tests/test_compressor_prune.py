"""Structured pruning (compressor.prune) and unstructured sparsity/clustering (compressor.sparsity).

Tiny models on scikit-learn's 8×8 digits keep the whole file to a few tens of seconds on 2 cores.
"""

from __future__ import annotations

import gzip
from typing import Any

import numpy as np
import pytest

from compressor.errors import CompressorError
from compressor.prune import (
    Criterion,
    UnsupportedLayerError,
    channel_importance,
    expand_positions,
    fine_tune,
    l1_scores,
    prune_structured,
    select_channels,
    zero_pruned_channels,
)
from compressor.sparsity import (
    cluster_weights,
    kmeans_1d,
    magnitude_mask,
    magnitude_prune,
    polynomial_decay_sparsity,
)

pytestmark = pytest.mark.slow


def _keras() -> Any:
    from compressor._tf import keras

    return keras()


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    tr, te = idx[:1400], idx[1400:]
    return x[tr], y[tr], x[te], y[te]


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(model(x, training=False)).argmax(-1) == y).mean())


def _outputs(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


def _conv_net(k: Any, filters: int = 16, units: int = 32) -> Any:
    return k.Sequential(
        [
            k.Input((8, 8, 1)),
            k.layers.Conv2D(filters, 3, activation="relu", padding="same", name="conv"),
            k.layers.MaxPooling2D(2, name="pool"),
            k.layers.Flatten(name="flatten"),
            k.layers.Dropout(0.1, name="drop"),
            k.layers.Dense(units, activation="relu", name="fc"),
            k.layers.Dense(10, activation="softmax", name="probs"),
        ],
        name="convnet",
    )


def _residual_net(k: Any) -> Any:
    inp = k.Input((8, 8, 1))
    a = k.layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    a = k.layers.BatchNormalization(name="bn1")(a)
    a = k.layers.ReLU(name="r1")(a)
    b = k.layers.DepthwiseConv2D(3, padding="same", name="dw")(a)
    b = k.layers.BatchNormalization(name="bn2")(b)
    b = k.layers.ReLU(name="r2")(b)
    b = k.layers.Conv2D(8, 1, name="c2")(b)
    b = k.layers.BatchNormalization(name="bn3")(b)
    c = k.layers.Add(name="add")([a, b])
    c = k.layers.Activation("relu", name="r3")(c)
    c = k.layers.AveragePooling2D(2, name="avg")(c)
    c = k.layers.Conv2D(12, 3, padding="same", activation="relu", name="c3")(c)
    c = k.layers.GlobalAveragePooling2D(name="gap")(c)
    out = k.layers.Dense(10, activation="softmax", name="probs")(c)
    model = k.Model(inp, out, name="resnet_tiny")
    rng = np.random.default_rng(3)
    for layer in model.layers:  # non-trivial BN statistics, so slicing them is really tested
        if isinstance(layer, k.layers.BatchNormalization):
            g, b_, mu, v = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, g.shape),
                    rng.normal(0, 0.3, b_.shape),
                    rng.normal(0, 0.3, mu.shape),
                    rng.uniform(0.5, 2.0, v.shape),
                ]
            )
    return model


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return _digits()


@pytest.fixture(scope="module")
def teacher(digits: tuple[np.ndarray, ...]) -> Any:
    k = _keras()
    k.utils.set_random_seed(0)
    model = _conv_net(k, filters=16, units=64)
    xtr, ytr, _, _ = digits
    # peak of the warm-up + cosine schedule (a constant 1e-3 reached the same accuracy before)
    fine_tune(model, (xtr, ytr), 8, learning_rate=3e-3)
    return model


def _tflite(model: Any) -> bytes:
    from compressor._tf import quiet_stdout, tf

    with quiet_stdout():
        return bytes(tf().lite.TFLiteConverter.from_keras_model(model).convert())


# --------------------------------------------------------------------------------------------------------
# numpy parts


def test_numpy_helpers() -> None:
    kernel = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10
    assert np.allclose(l1_scores(kernel), np.abs(kernel).sum(axis=(0, 1)))
    assert select_channels(np.array([1.0, 5.0, 5.0, 0.5]), 2).tolist() == [1, 2]
    # Flatten of 2 positions × 3 channels keeping channels 0 and 2 keeps features 0, 2, 3, 5
    assert expand_positions(np.array([0, 2]), 3, 2).tolist() == [0, 2, 3, 5]


def test_polynomial_decay_schedule() -> None:
    kw: dict[str, Any] = {"initial_sparsity": 0.0, "final_sparsity": 0.8, "begin_step": 0, "end_step": 100}
    assert polynomial_decay_sparsity(0, **kw) == 0.0
    assert polynomial_decay_sparsity(100, **kw) == pytest.approx(0.8)
    assert polynomial_decay_sparsity(500, **kw) == pytest.approx(0.8)
    assert polynomial_decay_sparsity(50, **kw) == pytest.approx(0.8 - 0.8 * 0.5**3)


def test_magnitude_mask_and_kmeans() -> None:
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 5))
    mask = magnitude_mask(w, 0.75)
    assert (~mask).sum() == round(0.75 * w.size)
    assert np.abs(w[~mask]).max() <= np.abs(w[mask]).min()
    centroids, assign = kmeans_1d(w, 16)
    assert centroids.shape == (16,) and assign.shape == w.shape
    again = kmeans_1d(w, 16)
    assert np.array_equal(centroids, again[0]) and np.array_equal(assign, again[1])
    assert np.abs(centroids[assign] - w).max() < (w.max() - w.min()) / 8


# --------------------------------------------------------------------------------------------------------
# structured pruning: exactness and graph handling


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_conv_pool_flatten_dense_exact(keep: float) -> None:
    k = _keras()
    k.utils.set_random_seed(1)
    model = _conv_net(k)
    x = np.random.default_rng(0).random((32, 8, 8, 1), dtype=np.float32)
    before = _outputs(model, x)
    pruned, report = prune_structured(model, keep)
    assert np.array_equal(before, _outputs(model, x)), "the input model must not change"
    reference = zero_pruned_channels(model, report)
    assert np.abs(_outputs(pruned, x) - _outputs(reference, x)).max() < 1e-5
    assert pruned.get_layer("conv").filters == round(16 * keep)
    assert pruned.get_layer("fc").units == round(32 * keep)
    assert pruned.get_layer("probs").units == 10
    assert pruned.get_layer("fc").get_weights()[0].shape[0] == 16 * round(16 * keep)  # 4×4 positions
    assert report.params_after < report.params_before
    assert report.macs_after is not None and report.macs_before is not None
    assert report.macs_after < report.macs_before
    by_name = {lp.name: lp for lp in report.layers}
    assert (by_name["conv"].channels_before, by_name["conv"].channels_after) == (16, round(16 * keep))
    assert "probs" in report.summary()


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_residual_bn_depthwise_exact(criterion: Criterion) -> None:
    k = _keras()
    k.utils.set_random_seed(2)
    model = _residual_net(k)
    rng = np.random.default_rng(0)
    x = rng.random((32, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, 32)
    pruned, report = prune_structured(model, 0.5, criterion=criterion, data=(x, y))
    reference = zero_pruned_channels(model, report)
    assert np.abs(_outputs(pruned, x) - _outputs(reference, x)).max() < 1e-5
    # the residual group shares one channel set
    assert report.kept_channels["c1"] == report.kept_channels["c2"]
    assert len(report.kept_channels["c1"]) == 4
    assert pruned.get_layer("dw").get_weights()[0].shape[2] == 4
    assert pruned.get_layer("bn2").get_weights()[0].shape == (4,)
    assert pruned.get_layer("c3").filters == 6
    assert pruned.count_params() < model.count_params()


def test_l1_importance_folds_batchnorm() -> None:
    k = _keras()
    k.utils.set_random_seed(2)
    model = _residual_net(k)
    scores = channel_importance(model)
    kernel = model.get_layer("c1").get_weights()[0]
    gamma, _, _, var = model.get_layer("bn1").get_weights()
    bn = model.get_layer("bn1")
    expected = l1_scores(kernel) * np.abs(gamma) / np.sqrt(var + bn.epsilon)
    assert np.allclose(scores["c1"], expected, rtol=1e-5)
    assert not np.allclose(scores["c1"], l1_scores(kernel), rtol=1e-2)  # BN changed the ranking scale
    assert np.allclose(scores["c3"], l1_scores(model.get_layer("c3").get_weights()[0]))  # no BN: plain L1


def test_shortcut_from_input_and_classifier_are_not_pruned() -> None:
    k = _keras()
    inp = k.Input((8, 8, 2))
    a = k.layers.Conv2D(2, 3, padding="same", name="c1")(inp)
    s = k.layers.Add(name="add")([inp, a])
    h = k.layers.Conv2D(8, 3, activation="relu", name="c2")(s)
    h = k.layers.GlobalMaxPooling2D(name="gmp")(h)
    out = k.layers.Dense(3, activation="softmax", name="out")(h)
    model = k.Model(inp, out)
    pruned, report = prune_structured(model, 0.5)
    assert pruned.get_layer("c1").filters == 2  # tied to the model input by the Add
    assert pruned.get_layer("c2").filters == 4
    assert pruned.get_layer("out").units == 3
    assert any("model input" in why for why in report.unpruned_groups)
    assert set(channel_importance(model)) == {"c2"}


def test_unsupported_layer_is_named() -> None:
    k = _keras()
    model = k.Sequential(
        [
            k.Input((8, 8, 1)),
            k.layers.Conv2D(4, 3, name="conv"),
            k.layers.Reshape((36, 4), name="reshape"),
            k.layers.Flatten(),
            k.layers.Dense(3, activation="softmax"),
        ]
    )
    with pytest.raises(
        UnsupportedLayerError, match=r"no channels to prune.*reshape \(Reshape\) is not channel"
    ) as info:
        prune_structured(model, 0.5)
    assert isinstance(info.value, CompressorError)


def _exact(model: Any, x: Any, keep: float = 0.5) -> tuple[Any, Any]:
    """Prune ``model`` and check the pruned model computes what the original does with the pruned
    channels zeroed (every output, every input form)."""
    pruned, report = prune_structured(model, keep)
    reference = zero_pruned_channels(model, report)
    got, want = pruned(x, training=False), reference(x, training=False)
    got = got if isinstance(got, list | tuple) else [got]
    want = want if isinstance(want, list | tuple) else [want]
    for g, w in zip(got, want, strict=True):
        assert np.abs(np.asarray(g) - np.asarray(w)).max() < 1e-4
    assert pruned.count_params() < model.count_params()
    return pruned, report


def test_text_model_embedding_conv1d_and_attention_barrier() -> None:
    """Embedding and Conv1D are pruned; a LayerNormalization/attention block is a barrier kept whole, and
    the layers around it are still pruned."""
    k = _keras()
    k.utils.set_random_seed(3)
    tokens = k.Input((12,), dtype="int32")
    e = k.layers.Embedding(50, 16, name="emb")(tokens)
    c = k.layers.Conv1D(24, 3, padding="same", activation="relu", name="conv1d")(e)
    c = k.layers.MaxPooling1D(2)(c)
    h = k.layers.Dense(16, name="proj")(c)
    a = k.layers.MultiHeadAttention(2, 8, name="mha")(h, h)
    h = k.layers.LayerNormalization(name="ln")(h + a)  # a Keras op in the graph, not a layer
    h = k.layers.Dense(32, activation="relu", name="ffn")(h)
    h = k.layers.GlobalAveragePooling1D()(h)
    h = k.layers.Dense(8, activation="relu", name="head")(h)
    h = k.ops.sqrt(k.ops.square(h) + 1.0)  # Keras ops outside the known set: a barrier
    out = k.layers.Dense(4, activation="softmax", name="out")(h)
    model = k.Model(tokens, out)
    x = np.random.default_rng(0).integers(0, 50, (8, 12)).astype(np.int32)
    pruned, report = _exact(model, x)
    assert pruned.get_layer("emb").output_dim == 8
    assert pruned.get_layer("conv1d").filters == 12
    assert pruned.get_layer("ffn").units == 16
    assert pruned.get_layer("head").units == 8  # feeds the ops: kept
    assert pruned.get_layer("proj").units == 16  # feeds the attention block: kept
    assert any("mha (MultiHeadAttention) is not channel-wise" in why for why in report.unpruned_groups)


def test_unet_concatenate_transpose_and_two_inputs() -> None:
    """Two inputs, a Lambda, a skip connection by Concatenate, Conv2DTranspose, a squeeze-and-excitation
    style gate and two outputs."""
    k = _keras()
    k.utils.set_random_seed(4)
    img = k.Input((8, 8, 3), name="img")
    meta = k.Input((5,), name="meta")
    scaled = k.layers.Lambda(lambda t: t * 2.0 - 1.0, name="scale")(k.layers.Rescaling(0.5)(img))
    d1 = k.layers.Conv2D(8, 3, padding="same", activation="relu", name="d1")(scaled)
    d2 = k.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="d2")(d1)
    gate = k.layers.Dense(16, activation="sigmoid", name="gate")(meta)
    d2 = k.layers.Multiply(name="mul")([d2, k.layers.Reshape((1, 1, 16))(gate)])
    u1 = k.layers.Conv2DTranspose(8, 2, strides=2, name="up")(d2)
    cat = k.layers.Concatenate(name="cat")([u1, d1])
    h = k.layers.BatchNormalization(name="bn")(cat)
    h = k.layers.Conv2D(12, 3, padding="same", activation="relu", name="mix")(h)
    mask = k.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(h)
    score = k.layers.Dense(1, name="score")(k.layers.GlobalAveragePooling2D()(h))
    model = k.Model([img, meta], [mask, score])
    rng = np.random.default_rng(0)
    x = [rng.random((4, 8, 8, 3), dtype=np.float32), rng.random((4, 5), dtype=np.float32)]
    pruned, report = _exact(model, x)
    assert pruned.get_layer("d1").filters == 4 and pruned.get_layer("up").filters == 4
    assert pruned.get_layer("mix").filters == 6
    assert pruned.get_layer("bn").get_weights()[0].shape == (8,)  # 4 + 4 concatenated channels
    assert pruned.get_layer("mix").get_weights()[0].shape[2] == 8
    # squeeze-and-excitation: the gate, reshaped (N, C) -> (N, 1, 1, C), multiplies d2 channel by channel:
    # one channel set for both, and the Reshape's target follows it
    assert pruned.get_layer("d2").filters == 8 and pruned.get_layer("gate").units == 8
    assert report.kept_channels["d2"] == report.kept_channels["gate"]
    assert pruned.get_layer("mask").filters == 1 and pruned.get_layer("score").units == 1
    assert [t.name for t in pruned.inputs] == ["img", "meta"]


@pytest.mark.parametrize("app", ["MobileNetV3Small", "EfficientNetB0"])
def test_keras_applications_prune_exactly(app: str) -> None:
    """Real architectures users bring: hard-swish, squeeze-and-excitation (Reshape + Multiply), Rescaling,
    residual Adds, depthwise blocks; every group but the classifier's is pruned, exactly."""
    k = _keras()
    k.utils.set_random_seed(5)
    model = getattr(k.applications, app)(weights=None, input_shape=(32, 32, 3), classes=5)
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32) * 255
    _, report = _exact(model, x)
    assert report.params_after < 0.4 * report.params_before
    assert len(report.unpruned_groups) == 1, report.unpruned_groups  # the classifier only


def test_bad_arguments() -> None:
    k = _keras()
    model = _conv_net(k)
    with pytest.raises(ValueError, match="keep"):
        prune_structured(model, 0.0)
    with pytest.raises(ValueError, match="taylor"):
        channel_importance(model, "taylor")
    unbuilt = k.Sequential([k.layers.Dense(3)])
    with pytest.raises(CompressorError):
        prune_structured(unbuilt, 0.5)


# --------------------------------------------------------------------------------------------------------
# on a trained model: fine-tuning, smaller .tflite, sparsity, clustering


def test_prune_and_fine_tune_digits(teacher: Any, digits: tuple[np.ndarray, ...]) -> None:
    xtr, ytr, xte, yte = digits
    base = _accuracy(teacher, xte, yte)
    assert base >= 0.95  # measured 0.977
    results = {}
    for keep in (0.5, 0.25):
        pruned, report = prune_structured(teacher, keep, data=(xtr, ytr))
        fine_tune(pruned, (xtr, ytr), 3)
        results[keep] = (_accuracy(pruned, xte, yte), report)
    # measured: keep 0.5 → 0.970, keep 0.25 → 0.899 (3 fine-tune epochs)
    assert results[0.5][0] >= 0.93
    assert results[0.25][0] >= 0.80
    assert results[0.25][1].params_after < results[0.5][1].params_after < results[0.5][1].params_before
    pruned = prune_structured(teacher, 0.5)[0]
    assert len(_tflite(pruned)) < 0.5 * len(_tflite(teacher))


def test_magnitude_prune_gzip_only(teacher: Any, digits: tuple[np.ndarray, ...]) -> None:
    xtr, ytr, xte, yte = digits
    before = [w.copy() for w in teacher.get_weights()]
    pruned, report = magnitude_prune(teacher, (xtr, ytr), 0.8, 2)
    assert all(np.array_equal(a, b) for a, b in zip(before, teacher.get_weights(), strict=True))
    for layer in report.layers:
        assert abs(layer.sparsity - 0.8) <= 0.01, layer
    assert abs(report.overall_sparsity - 0.8) <= 0.01
    assert _accuracy(pruned, xte, yte) >= 0.8  # measured 0.894 after 2 epochs
    assert report.weights_gzip_after < 0.5 * report.weights_gzip_before
    assert "gzip" in report.summary() and "same latency" in report.note
    dense_file, sparse_file = _tflite(teacher), _tflite(pruned)
    assert abs(len(sparse_file) - len(dense_file)) <= 0.02 * len(dense_file)  # raw size: the same
    assert len(gzip.compress(sparse_file)) < 0.6 * len(gzip.compress(dense_file))


def test_cluster_weights(teacher: Any, digits: tuple[np.ndarray, ...]) -> None:
    xtr, ytr, xte, yte = digits
    clustered, report = cluster_weights(teacher, 16)
    assert all(layer.unique_values <= 16 for layer in report.layers)
    assert _accuracy(clustered, xte, yte) >= 0.93  # measured 0.970 without fine-tuning
    assert report.weights_gzip_after < 0.4 * report.weights_gzip_before
    tuned, report8 = cluster_weights(teacher, 8, data=(xtr, ytr), epochs=1)
    for layer in report8.layers:
        assert layer.unique_values <= 8
        assert np.unique(tuned.get_layer(layer.name).get_weights()[0]).size <= 8
    assert _accuracy(tuned, xte, yte) >= 0.9  # measured 0.960


def test_a_layer_called_twice_is_named() -> None:
    k = _keras()
    inp = k.Input((8,))
    act = k.layers.ReLU(name="shared_relu")
    h = act(k.layers.Dense(8, name="a")(inp))
    h = act(k.layers.Dense(8, name="b")(h))
    model = k.Model(inp, k.layers.Dense(2, name="out")(h))
    with pytest.raises(UnsupportedLayerError, match=r"'shared_relu'.*called twice"):
        prune_structured(model, 0.5)
