"""scikit-learn's 8×8 handwritten digits (ships with scikit-learn, no download), split and
standardised with statistics of the training part only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor


@dataclass(frozen=True)
class Split:
    """Training and test tensors: inputs [N, 64] (or [N, 1, 8, 8]) float32, labels [N] int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device | str) -> Split:
        return Split(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test,
                                               self.y_test)))


def digits(
    seed: int = 0, test_fraction: float = 0.25, images: bool = False, train_size: int | None = None
) -> Split:
    """The digits data set (1797 images of 8×8 pixels, 10 classes), stratified split.

    Args:
        seed: seed of the split.
        test_fraction: fraction of the examples held out for the test accuracy.
        images: return inputs as [N, 1, 8, 8] images (for a CNN) instead of [N, 64] vectors.
        train_size: keep only the first ``train_size`` training examples (for quick runs).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    bunch = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data, bunch.target, test_size=test_fraction, random_state=seed,
        stratify=bunch.target,
    )
    if train_size is not None:
        if train_size < 1:
            raise ValueError(f"train_size must be ≥ 1, got {train_size!r}.")
        x_train, y_train = x_train[:train_size], y_train[:train_size]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # the always-blank border pixels stay at 0 instead of dividing by 0
    shape = (-1, 1, 8, 8) if images else (-1, 64)

    def inputs(x: object) -> Tensor:
        return torch.as_tensor((x - mean) / std, dtype=torch.float32).reshape(shape)

    def labels(y: object) -> Tensor:
        return torch.as_tensor(y, dtype=torch.int64)

    return Split(inputs(x_train), labels(y_train), inputs(x_test), labels(y_test))
