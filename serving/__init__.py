"""The serving side: loads exported ONNX bundles with onnxruntime. Never imports torch."""
