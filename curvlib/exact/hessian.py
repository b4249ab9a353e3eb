"""The exact Hessian of the loss, ∇²L, as a :class:`~curvlib.CurvatureEstimate`."""

from __future__ import annotations

from typing import Any

import torch
from torch.func import grad, vjp, vmap

from curvlib.exact.base import ExactEstimate
from curvlib.partition import Vector


class ExactHessian(ExactEstimate):
    """The Hessian of the loss w.r.t. the partition's parameters, over all batches given.

    Hessian-vector products are reverse-over-reverse: one gradient graph per batch, then a
    vmapped vector-Jacobian product of it for K vectors at once (H is symmetric, so vᵀH = (Hv)ᵀ).
    The loss may be any differentiable scalar ``loss_fn(outputs, targets)``.
    """

    def _batch_matmat(self, inputs: Any, targets: Any, vectors: tuple[torch.Tensor, ...]) -> Vector:
        def loss(*values: torch.Tensor) -> torch.Tensor:
            return self.loss_fn(self._call(values, inputs), targets)

        gradient = grad(loss, argnums=tuple(range(len(vectors))))
        _, pullback = vjp(gradient, *self._primals())
        return list(vmap(pullback, chunk_size=self.chunk_size)(vectors))
