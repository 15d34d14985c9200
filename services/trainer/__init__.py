"""The Ferry trainer: PyTorch training jobs over gRPC, each in its own process."""
