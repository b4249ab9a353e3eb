"""Small models and batches shared by the tests, declared as data.

Each case names a model factory and its input shape; :func:`make_case` builds the model, a loss
and a seeded batch for a given loss kind, reduction, batch size and dtype. Models are small enough
for dense P×P autograd references (P ≲ 300).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Residual(nn.Module):
    """x ↦ head(x + tanh(inner(x))): a skip connection around a hidden layer."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + torch.tanh(self.inner(x)))


class SequenceModel(nn.Module):
    """Per-token classifier on [N, T, D] inputs; returns [N, C, T] (CrossEntropyLoss's K-dim form)
    or [N, T, C] for regression losses."""

    def __init__(
        self, dim: int = 3, hidden: int = 4, classes: int = 3, channels_first: bool = True
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, hidden)
        self.head = nn.Linear(hidden, classes)
        self.channels_first = channels_first

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(torch.tanh(self.embed(x)))
        return out.transpose(1, 2) if self.channels_first else out


class SharedLayer(nn.Module):
    """One Linear called twice (weight tying)."""

    def __init__(self, width: int = 3, classes: int = 2) -> None:
        super().__init__()
        self.shared = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def _mlp(classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, classes))


def _cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, kernel_size=3, padding="same"),  # input Gram from correlations
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, classes),
    )


def _conv1d(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 3, kernel_size=3, stride=1, padding=1, dilation=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5, classes),
    )


@dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[[int, str], nn.Module]
    input_shape: tuple[int, ...]  # without the batch axis
    sequence: bool = False  # outputs carry a token axis


CASES: dict[str, Case] = {
    "mlp": Case("mlp", lambda c, loss: _mlp(c), (5,)),
    "cnn": Case("cnn", lambda c, loss: _cnn(c), (2, 5, 5)),
    "conv1d": Case("conv1d", lambda c, loss: _conv1d(c), (2, 7)),
    "residual": Case("residual", lambda c, loss: Residual(4, c), (4,)),
    "sequence": Case(
        "sequence",
        lambda c, loss: SequenceModel(3, 4, c, channels_first=(loss == "cross_entropy")),
        (4, 3),
        sequence=True,
    ),
    "shared": Case("shared", lambda c, loss: SharedLayer(3, c), (3,)),
}

LOSSES: dict[str, Callable[[str], nn.Module]] = {
    "cross_entropy": lambda reduction: nn.CrossEntropyLoss(reduction=reduction),
    "mse": lambda reduction: nn.MSELoss(reduction=reduction),
    "bce": lambda reduction: nn.BCEWithLogitsLoss(reduction=reduction),
}


def make_case(
    name: str, loss: str = "cross_entropy", reduction: str = "mean", batch: int = 3,
    dtype: torch.dtype = torch.float64, seed: int = 0, classes: int = 3,
) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """(model, loss_fn, inputs, targets) for a named case, seeded."""
    case = CASES[name]
    torch.manual_seed(seed)
    model = case.factory(classes, loss).to(dtype)
    inputs = torch.randn(batch, *case.input_shape, dtype=dtype)
    with torch.no_grad():
        outputs = model(inputs)
    if loss == "cross_entropy":
        index_shape = outputs.shape[:1] + outputs.shape[2:]
        targets = torch.randint(0, classes, index_shape)
    elif loss == "mse":
        targets = torch.randn_like(outputs)
    else:
        targets = torch.rand_like(outputs).round()
    return model, LOSSES[loss](reduction), inputs, targets
