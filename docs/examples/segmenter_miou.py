"""An evaluator for `edgefleet compress --evaluator docs/examples/segmenter_miou.py:miou`.

The compressor calls it once per variant with that variant's predictions on the held-out rows (one
float32 array per model output, in the model's output order) and the held-out data; it returns named
metrics with their direction. Here: mean intersection-over-union of a binary segmenter's masks against
the ground-truth masks given as ``y_train``/``y_val``/``y_test`` in ``--data`` (arrays that are not class
labels are kept as ``data.targets``).
"""

import numpy as np

from compressor.metrics import EvalData, Metric


def miou(predictions: list[np.ndarray], data: EvalData) -> dict[str, Metric]:
    if data.targets is None:
        raise ValueError("miou needs ground-truth masks: give y_* masks in --data")
    pred = predictions[0] > 0.5
    truth = data.targets > 0.5
    inter = (pred & truth).reshape(len(pred), -1).sum(axis=1)
    union = (pred | truth).reshape(len(pred), -1).sum(axis=1)
    return {"miou": Metric(float(np.mean(inter / np.maximum(union, 1))), "higher")}
