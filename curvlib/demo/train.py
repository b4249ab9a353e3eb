"""The demo's training loop: seeded, timed, with the training loss recorded along the way.

Every run of a model starts from the same initial weights (``torch.manual_seed(seed)`` before the
model is built) and sees the same mini-batches in the same order (a generator seeded with ``seed``
shuffles each epoch), so the methods differ only by their updates. Separate curvature batches
(PartitionedNewton, PerLayerLR) come from another seeded generator.

Every method runs under the same learning-rate schedule, a cosine decay over the run
(lr_k = lr_0 · ½(1 + cos(π k / K)) at step k of K, Loshchilov & Hutter 2017), applied to its
optimizer's ``param_groups`` (λ₁ for PartitionedNewton, the base optimizer's rate for PerLayerLR):
without a decay the final training loss of every method is dominated by the noise of its last
few steps, and the comparison says little.

The clock runs only around the training steps: the evaluations of the full training loss that
draw the curves are excluded from the wall time, and on CUDA the device is synchronised before
each reading.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvlib.demo.data import Split
from curvlib.demo.methods import LayerRates, Method
from curvlib.demo.models import MODELS
from curvlib.diagnostics.progress import progress_bar


@dataclass
class Run:
    """One method trained on one model.

    Attributes:
        steps, seconds, train_loss: the curve: after ``steps[i]`` steps and ``seconds[i]`` seconds
            of training, the loss on the whole training set was ``train_loss[i]``.
        test_accuracy: accuracy on the test set after training.
        wall_time: seconds spent in training steps.
        num_steps: steps taken.
        layer_rates: the per-layer learning rates, for methods that compute them.
    """

    model: str
    method: Method
    steps: list[int]
    seconds: list[float]
    train_loss: list[float]
    test_accuracy: float
    wall_time: float
    num_steps: int
    layer_rates: LayerRates | None

    @property
    def final_train_loss(self) -> float:
        return self.train_loss[-1]

    @property
    def time_per_step(self) -> float:
        return self.wall_time / self.num_steps


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on (x, y)."""
    outputs = model(x)
    return loss_fn(outputs, y).item(), (outputs.argmax(dim=1) == y).float().mean().item()


def random_batches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterator[tuple[Tensor,
                                                                                      Tensor]]:
    """An endless stream of mini-batches drawn uniformly (without replacement within a batch)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        index = torch.randperm(len(x), generator=gen)[:batch_size].to(x.device)
        yield x[index], y[index]


def cosine_factor(step: int, total: int) -> float:
    """½(1 + cos(π·step/total)): 1 at the first step, decaying to 0 at ``total``."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train(
    model_name: str,
    method: Method,
    data: Split,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    evaluations_per_epoch: int = 4,
    progress: bool | None = None,
) -> Run:
    """Train ``MODELS[model_name]`` with ``method`` on ``data`` (on ``data``'s device).

    Args:
        model_name: a key of :data:`~curvlib.demo.models.MODELS`.
        method: the optimizer to use.
        data: the split, already on the device to train on.
        epochs: passes over the training set.
        batch_size: examples per training (and curvature) mini-batch.
        seed: seeds the initial weights, the batch order and the methods' own randomness.
        evaluations_per_epoch: points of the training-loss curve per epoch.
        progress: show a tqdm bar (None: only on a terminal).
    """
    device = data.x_train.device
    torch.manual_seed(seed)
    model = MODELS[model_name]().to(device)
    loss_fn = nn.CrossEntropyLoss()
    trainer = method.build(model, loss_fn,
                           random_batches(data.x_train, data.y_train, batch_size, seed + 1))
    order = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    per_epoch = -(-n // batch_size)
    total = epochs * per_epoch
    base_lrs = [group["lr"] for group in trainer.param_groups]
    eval_every = max(1, per_epoch // evaluations_per_epoch)
    steps, seconds = [0], [0.0]
    train_loss = [evaluate(model, loss_fn, data.x_train, data.y_train)[0]]
    wall, step = 0.0, 0
    with progress_bar(total, f"{model_name} {method.label}", progress) as bar:
        for _ in range(epochs):
            permutation = torch.randperm(n, generator=order).to(device)
            for start in range(0, n, batch_size):
                index = permutation[start : start + batch_size]
                for group, lr in zip(trainer.param_groups, base_lrs):
                    group["lr"] = lr * cosine_factor(step, total)
                begin = _now(device)
                loss = trainer.step(data.x_train[index], data.y_train[index])
                wall += _now(device) - begin
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")
                if step % eval_every == 0 or step == total:
                    steps.append(step)
                    seconds.append(wall)
                    train_loss.append(evaluate(model, loss_fn, data.x_train, data.y_train)[0])
    _, accuracy = evaluate(model, loss_fn, data.x_test, data.y_test)
    return Run(model_name, method, steps, seconds, train_loss, accuracy, wall, step,
               trainer.layer_rates())
