"""The compressor's exception tree. Everything it refuses or cannot do raises one of these::

    CompressorError            base; the CLI prints its message on stderr and exits 2
    ├── DataError              a dataset or model file is missing, unreadable or has the wrong keys/shapes
    │   ├── DataMismatchError  the data does not fit the model (sample shape, class indices, label count)
    │   ├── NotAClassifierError  labels were given but output 0 is not a (batch, K >= 2) class vector
    │   ├── CustomOpsError     a .tflite needs custom ops and --allow-custom-ops was not given
    │   └── EvaluatorError     a --evaluator cannot be imported, raised, or returned no named metrics
    │                          (compressor.metrics)
    ├── ConversionError        TensorFlow could not turn the model into a .tflite for a recipe
    │   └── ChangedNothingError  a quantized variant holds nothing of what was asked (not shipped)
    ├── EvaluationError        the interpreter could not load or run a converted variant
    └── BundleWriteError       the bundle directory could not be written (or would clobber other files)

Errors are raised with ``raise ... from err`` so the TensorFlow/numpy cause stays in the traceback, and
their messages say what to check. A failure in one variant is recorded as a :class:`VariantFailure`
by the pipeline and does not stop the others (only the float32 baseline is mandatory); so is any other
exception a variant raises. Input problems (DataError and its subclasses) are found by
``compressor.validate`` before any training starts. Recipe problems raise
``compressor.recipe.RecipeError`` (a CompressorError), structured pruning's
``compressor.prune.UnsupportedLayerError`` likewise.
"""

from __future__ import annotations

from dataclasses import dataclass


class CompressorError(Exception):
    """Base of everything the compressor raises on purpose."""


class DataError(CompressorError):
    """Input data (a .npz, a built-in dataset name) or an input model file cannot be used."""


class DataMismatchError(DataError):
    """The data does not fit the model: sample shape, class indices or label count (compressor.validate)."""


class NotAClassifierError(DataError):
    """The model is not a single-input classifier ending in K >= 2 class scores (compressor.validate)."""


class CustomOpsError(DataError):
    """A .tflite needs custom ops that the stock runtimes lack, and --allow-custom-ops was not given."""


class ConversionError(CompressorError):
    """Conversion of a Keras model to a TFLite variant failed."""


class ChangedNothingError(ConversionError):
    """A quantized variant is byte-identical to the baseline or holds no tensors of the asked type."""


class EvaluationError(CompressorError):
    """A converted .tflite could not be loaded or run by the interpreter on the host."""


class BundleWriteError(CompressorError):
    """The bundle directory could not be written."""


@dataclass(frozen=True, slots=True)
class VariantFailure:
    """One variant that could not be built; the others carry on."""

    variant: str
    stage: str  # "transform" | "convert" | "evaluate" | "skipped" (needs a Keras source)
    message: str
