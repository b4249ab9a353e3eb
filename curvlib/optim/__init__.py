"""Optimizers built on curvature estimates."""

from curvlib.optim.natural_gradient import NaturalGradient
from curvlib.optim.per_layer_lr import PerLayerLR

__all__ = ["NaturalGradient", "PerLayerLR"]
