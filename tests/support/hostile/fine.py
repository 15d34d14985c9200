"""A well-behaved factory under the same prefix, so a test sees the allowed path work."""

from torch import nn

from tests.support.hostile import mark


def make(in_features: int = 4, num_classes: int = 3) -> nn.Module:
    mark("fine")
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
