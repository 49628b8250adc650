"""edgefleet compressor: one Keras model into TFLite variants. TensorFlow is imported lazily, never here.

Entry points other packages use::

    compressor.pipeline.build_demo_bundle(out, *, epochs=8, seed=0, variants=None, model_id="digits",
                                          progress=None) -> agent.wire.Manifest
    compressor.pipeline.build_bundle(model_or_keras_path, data, out, ...) -> BuildResult
    compressor.cli.register(subparsers)            # adds `edgefleet compress`
    compressor.errors.CompressorError              # base of everything raised on purpose
"""
