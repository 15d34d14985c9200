"""The inference worker: ONNX Runtime sessions behind the KServe v2 gRPC API."""
