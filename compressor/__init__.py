"""edgefleet compressor: one Keras model into TFLite variants. TensorFlow is imported lazily, never here."""
