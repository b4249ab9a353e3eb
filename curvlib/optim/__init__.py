"""Optimizers built on curvature estimates."""

from curvlib.optim.natural_gradient import NaturalGradient
from curvlib.optim.partitioned_newton import PartitionedNewton
from curvlib.optim.per_layer_lr import PerLayerLR

__all__ = ["NaturalGradient", "PartitionedNewton", "PerLayerLR"]
