"""edgefleet device agent. Importing this package loads nothing heavy (no TFLite runtime, no TensorFlow)."""

__version__ = "0.1.0"
