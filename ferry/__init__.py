"""Ferry: train, export and serve PyTorch models over the KServe v2 gRPC protocol."""

__version__ = "0.1.0"
