"""The two demo models: a tanh MLP on flattened digits and a small tanh CNN on 8×8 images.

Smooth activations keep the third derivatives that PartitionedNewton uses informative; every
layer is a Linear or a Conv2d, so the whole model is covered by the Kronecker estimates.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def mlp(hidden: int = 64, classes: int = 10) -> nn.Sequential:
    """64 → hidden → hidden → classes, tanh."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.Tanh(),
        nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, classes),
    )


def cnn(channels: int = 8, classes: int = 10) -> nn.Sequential:
    """[1, 8, 8] → conv 3×3 (channels) → conv 3×3 stride 2 (2·channels, 4×4) → linear, tanh."""
    return nn.Sequential(
        nn.Conv2d(1, channels, kernel_size=3, padding=1), nn.Tanh(),
        nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1), nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * channels * 4 * 4, classes),
    )


MODELS: dict[str, Callable[[], nn.Sequential]] = {"mlp": mlp, "cnn": cnn}
"""Model factories by name; ``cnn`` takes images, ``mlp`` flattened vectors."""
