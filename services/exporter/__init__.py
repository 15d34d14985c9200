"""The exporter: PyTorch checkpoint -> verified, optimised ONNX model version in the store."""
