"""The optimizers the demo compares, each bound to a model as a :class:`Trainer`.

Every trainer takes one training step on a mini-batch with :meth:`Trainer.step`, following the
protocol of its optimizer:

* SGD and Adam: forward, backward, ``step()``;
* K-FAC, EKFAC, TKFAC, TEKFAC through :class:`~curvlib.optim.NaturalGradient`: the forward runs
  inside ``optimizer.record(targets)``, so the Kronecker statistics come from the training step
  itself (Monte-Carlo Fisher: one extra batched backward, no extra forward);
* :class:`~curvlib.optim.PartitionedNewton` (Wolinski, arXiv 2312.03885) and Adam wrapped in
  :class:`~curvlib.optim.PerLayerLR`: their per-layer learning rates are computed every ``period``
  steps on a *separate* mini-batch drawn from the training set, as the paper prescribes (the
  same batch for the gradient and the curvature biases η).

The default hyper-parameters were tuned once on the digits MLP with a small grid and are shared by
the CNN (docs/performance.md, "Training demo").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlib import EKFAC, KFAC, TEKFAC, TKFAC, ExactGGN, Partition
from curvlib.kron import KroneckerEstimate
from curvlib.optim import NaturalGradient, PartitionedNewton, PerLayerLR

Batches = Iterator[tuple[Tensor, Tensor]]
"""An endless source of mini-batches for the curvature of PartitionedNewton and PerLayerLR."""


@dataclass(frozen=True)
class LayerRates:
    """Per-layer learning rates over training: ``rates[i][s]`` is layer s's rate after
    evaluation ``steps[i]``."""

    names: list[str]
    steps: list[int]
    rates: list[list[float]]


Optimizer = torch.optim.Optimizer | PerLayerLR


class Trainer(ABC):
    """One optimizer bound to one model and loss.

    Attributes:
        param_groups: the optimizer's parameter groups, whose ``"lr"`` the training loop's
            learning-rate schedule scales (for PerLayerLR, the base optimizer's; for
            PartitionedNewton, λ₁).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: Optimizer) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.param_groups: list[dict[str, Any]] = optimizer.param_groups

    @abstractmethod
    def step(self, x: Tensor, y: Tensor) -> float:
        """One training step on (x, y); returns the mini-batch loss before the step."""

    def layer_rates(self) -> LayerRates | None:
        """The per-layer learning rates the method computed, if it computes any."""
        return None


class FirstOrder(Trainer):
    """A plain ``torch.optim`` optimizer."""

    def step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class Natural(Trainer):
    """:class:`NaturalGradient` with statistics recorded from the training forward."""

    optimizer: NaturalGradient

    def step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad()
        with self.optimizer.record(y):
            outputs = self.model(x)
        loss = self.loss_fn(outputs, y)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class SeparateBatch(Trainer):
    """PartitionedNewton or PerLayerLR: every ``period`` steps (``will_evaluate``) the optimizer
    gets a curvature batch from ``batches`` besides the training gradient."""

    optimizer: PartitionedNewton | PerLayerLR

    def __init__(self, model: nn.Module, loss_fn: nn.Module,
                 optimizer: PartitionedNewton | PerLayerLR, batches: Batches) -> None:
        super().__init__(model, loss_fn, optimizer)
        self.batches = batches

    def step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.optimizer.will_evaluate:
            self.optimizer.step(None, *next(self.batches))
        else:
            self.optimizer.step()
        return loss.item()

    def layer_rates(self) -> LayerRates:
        """The applied rates: λ₁·η (PartitionedNewton) or multiplier·η (PerLayerLR)."""
        opt = self.optimizer
        if isinstance(opt, PartitionedNewton):
            history = [(r.step, r.lr * r.eta) for r in opt.history if r.eta is not None]
        else:
            history = [(r.step, opt.multiplier * r.eta) for r in opt.history]
        return LayerRates(list(opt.partition.names), [step for step, _ in history],
                          [eta.tolist() for _, eta in history])


@dataclass(frozen=True)
class Method:
    """A compared method: its name on the command line, its label in tables and how to build it.

    ``build(model, loss_fn, batches)`` returns the trainer; ``settings`` lists the
    hyper-parameters for the report.
    """

    name: str
    label: str
    settings: str
    build: Callable[[nn.Module, nn.Module, Batches], Trainer]


# Hyper-parameters shared by the four Kronecker methods (tuned on the digits MLP).
KRON_LR = 0.05
KRON_DAMPING = 0.1
KRON_MOMENTUM = 0.9
KRON_KL_CLIP = 0.01
KRON_EMA = 0.95
KRON_REFRESH = 5


def _natural(
    estimate_cls: type[KroneckerEstimate],
) -> Callable[[nn.Module, nn.Module, Batches], Trainer]:
    def build(model: nn.Module, loss_fn: nn.Module, batches: Batches) -> Trainer:
        estimate = estimate_cls(model, loss_fn, fisher="mc", ema_decay=KRON_EMA)
        optimizer = NaturalGradient(
            model.parameters(), estimate, lr=KRON_LR, damping=KRON_DAMPING,
            momentum=KRON_MOMENTUM, kl_clip=KRON_KL_CLIP, refresh_every=KRON_REFRESH,
        )
        return Natural(model, loss_fn, optimizer)

    return build


def _sgd(model: nn.Module, loss_fn: nn.Module, batches: Batches) -> Trainer:
    return FirstOrder(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9))


def _adam(model: nn.Module, loss_fn: nn.Module, batches: Batches) -> Trainer:
    return FirstOrder(model, loss_fn, torch.optim.Adam(model.parameters(), lr=1e-2))


def _partitioned_newton(model: nn.Module, loss_fn: nn.Module, batches: Batches) -> Trainer:
    # One warm-up evaluation instead of the paper's three: the demo's runs are short (110 steps),
    # and three evaluations every 10 steps would freeze the first quarter of them. λ₁ 0.2, not
    # the 0.5 that trains seeds 0 and 1 fastest: 0.5 diverged on seeds 2 (CNN) and 3 (MLP), 0.3
    # nearly on seed 3 (docs/performance.md, "How the defaults were chosen").
    optimizer = PartitionedNewton(model.parameters(), model, loss_fn, order=3, lr=0.2, warmup=1)
    return SeparateBatch(model, loss_fn, optimizer, batches)


def _adam_per_layer(model: nn.Module, loss_fn: nn.Module, batches: Batches) -> Trainer:
    estimate = ExactGGN(model, loss_fn, Partition.by_module(model))
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer = PerLayerLR(base, estimate, period=10, damping=1e-6, multiplier=0.1)
    return SeparateBatch(model, loss_fn, optimizer, batches)


_KRON = f"lr {KRON_LR}, damping {KRON_DAMPING}, momentum {KRON_MOMENTUM}, " \
        f"KL-clip {KRON_KL_CLIP}, MC Fisher, EMA {KRON_EMA}, eigenbases every {KRON_REFRESH} steps"

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("sgd", "SGD", "lr 0.3, momentum 0.9", _sgd),
    Method("adam", "Adam", "lr 1e-2", _adam),
    Method("kfac", "K-FAC", _KRON, _natural(KFAC)),
    Method("ekfac", "EKFAC", _KRON, _natural(EKFAC)),
    Method("tkfac", "TKFAC", _KRON, _natural(TKFAC)),
    Method("tekfac", "TEKFAC", _KRON, _natural(TEKFAC)),
    Method("pnewton", "PartitionedNewton", "order 3, λ₁ (lr) 0.2, SGD-momentum 0.9 direction, "
           "period 10, window 3, warm-up 1, per-tensor subsets", _partitioned_newton),
    Method("adam-plr", "Adam+PerLayerLR", "Adam lr 1e-2; η from the exact GGN per layer every "
           "10 steps, damping 1e-6, multiplier 0.1", _adam_per_layer),
]}
"""Every method of the demo by command-line name, in table order."""
