"""Shared machinery of the exact estimates: kept batches, weighting, functional calls.

An exact estimate keeps every batch given to ``update`` and applies the curvature of the loss over
all of them, weighted as the loss reduces: with ``reduction="mean"`` batch b (of N_b examples)
contributes (N_b / Σ N) · C_b, where C_b is the curvature of its own mean loss; with ``"sum"``
every batch contributes C_b. Products are computed batch by batch with ``torch.func`` (vmapped
over K vectors in chunks), so the P×P matrix is never formed unless ``to_dense`` asks for it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlib.estimate import CurvatureEstimate
from curvlib.partition import Partition, Vector

Batch = tuple[Any, Any]


def batch_size(inputs: Any) -> int:
    """N, the size of the first axis of the (first) input tensor."""
    first = inputs[0] if isinstance(inputs, tuple | list) else inputs
    if not isinstance(first, Tensor) or first.dim() == 0:
        raise ValueError("inputs must be a tensor (or a tuple of tensors) with a batch axis.")
    return first.shape[0]


def as_args(inputs: Any) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def check_no_training_batchnorm(model: nn.Module) -> None:
    """BatchNorm in training mode couples the examples and updates buffers during every pass."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"Module {name!r} ({type(module).__name__}) is in training mode: its batch "
                "statistics couple the examples and change with every pass. Call model.eval()."
            )


def parameter_names(model: nn.Module, partition: Partition) -> list[str]:
    """The model's name of every tensor of the partition (ValueError if one is not the model's)."""
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [partition.parameter_names[i] for i, p in enumerate(partition.parameters)
               if id(p) not in names]
    if missing:
        raise ValueError(f"Partition tensors {missing} are not parameters of the model.")
    return [names[id(p)] for p in partition.parameters]


class ExactEstimate(CurvatureEstimate):
    """Base of estimates that keep their batches and apply the exact curvature of each.

    Args:
        model: the model; only the partition's tensors are differentiated.
        loss_fn: ``loss_fn(outputs, targets)`` → scalar; its ``reduction`` attribute ("mean" or
            "sum", default "mean") says how batches are weighted.
        partition: defaults to :meth:`Partition.by_tensor`.
        chunk_size: how many vectors one vmapped product handles at once (bounds memory).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        partition: Partition | None = None,
        chunk_size: int = 64,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.partition = partition if partition is not None else Partition.by_tensor(model)
        self.reduction = getattr(loss_fn, "reduction", "mean")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(
                f"{type(loss_fn).__name__} has reduction={self.reduction!r}; "
                "only 'mean' and 'sum' are supported."
            )
        self.chunk_size = chunk_size
        self._names = parameter_names(model, self.partition)
        self._batches: list[tuple[Any, Any, int]] = []

    # ---------------------------------------------------------------- statistics
    def update(self, inputs: Any, targets: Any) -> None:
        """Keep one batch (detached); its loss must be finite."""
        check_no_training_batchnorm(self.model)
        n = batch_size(inputs)
        with torch.no_grad():
            outputs = self.model(*as_args(inputs))
            self._check_batch(outputs, targets)
            loss = self.loss_fn(outputs, targets)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}.")
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"The loss of this batch is not finite ({float(loss)}).")
        if isinstance(inputs, tuple | list):
            inputs = tuple(map(_detach, inputs))
        else:
            inputs = _detach(inputs)
        self._batches.append((inputs, _detach(targets), n))

    def _check_batch(self, outputs: Any, targets: Any) -> None:
        """Validate a batch's outputs and targets (subclasses with a known loss override it)."""

    def clear(self) -> None:
        """Forget every batch."""
        self._batches.clear()

    @property
    def num_data(self) -> int:
        return sum(n for _, _, n in self._batches)

    def _weights(self) -> list[float]:
        if not self._batches:
            raise ValueError(f"{type(self).__name__} has no data: call update() first.")
        total = self.num_data
        return [n / total if self.reduction == "mean" else 1.0 for _, _, n in self._batches]

    def state_dict(self) -> dict[str, Any]:
        return {"batches": list(self._batches), "reduction": self.reduction}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("reduction") != self.reduction:
            raise ValueError(
                f"state_dict was saved with reduction={state.get('reduction')!r}, "
                f"this estimate uses {self.reduction!r}."
            )
        self._batches = list(state["batches"])

    # ---------------------------------------------------------------- products
    def _primals(self) -> tuple[Tensor, ...]:
        return tuple(p.detach() for p in self.partition.parameters)

    def _call(self, values: Sequence[Tensor], inputs: Any) -> Any:
        return functional_call(self.model, dict(zip(self._names, values)), as_args(inputs))

    @abstractmethod
    def _batch_matmat(self, inputs: Any, targets: Any, vectors: tuple[Tensor, ...]) -> Vector:
        """C_b applied to K vectors ([K, *p.shape] each) for one batch."""

    def matmat(self, vectors: Sequence[Tensor]) -> Vector:
        self.partition.check_batched_vector(vectors)
        weights = self._weights()
        vectors = tuple(v.to(p.dtype) for v, p in zip(vectors, self.partition.parameters))
        total: Vector | None = None
        for (inputs, targets, _), w in zip(self._batches, weights):
            out = self._batch_matmat(inputs, targets, vectors)
            total = [w * o for o in out] if total is None else [
                t + w * o for t, o in zip(total, out)]
        assert total is not None
        return total

    def matvec(self, v: Sequence[Tensor]) -> Vector:
        v = self.partition.check_vector(v, "v")
        return [o[0] for o in self.matmat([t.unsqueeze(0) for t in v])]
