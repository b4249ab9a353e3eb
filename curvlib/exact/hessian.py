"""The exact Hessian of the loss, ∇²L, as a :class:`~curvlib.CurvatureEstimate`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.func import grad, vjp, vmap

from curvlib.exact.base import ExactEstimate
from curvlib.partition import Vector
from curvlib.partitioned.derivatives import partitioned_derivatives


class ExactHessian(ExactEstimate):
    """The Hessian of the loss w.r.t. the partition's parameters, over all batches given.

    Hessian-vector products are reverse-over-reverse: one gradient graph per batch, then a
    vmapped vector-Jacobian product of it for K vectors at once (H is symmetric, so vᵀH = (Hv)ᵀ).
    The loss may be any differentiable scalar ``loss_fn(outputs, targets)``.
    """

    def reduced(self, u: Sequence[torch.Tensor]) -> torch.Tensor:
        """H̄ = Σ_b w_b H̄_b, entry (s, t) = u_sᵀ ∇²L u_t (Wolinski, arXiv 2312.03885).

        Each kept batch's H̄_b comes from :func:`~curvlib.partitioned.partitioned_derivatives`
        (S pruned second-order passes, instead of the S full Hessian-vector products of the
        generic fallback), weighted as :meth:`matmat` weights the batches.
        """
        u = self.partition.check_vector(u, "u")
        terms = [
            w * partitioned_derivatives(self.model, self.loss_fn, inputs, targets, u,
                                        self.partition, order=2).H
            for (inputs, targets, _), w in zip(self._batches, self._weights())
        ]
        return torch.stack(terms).sum(dim=0)

    def _batch_matmat(self, inputs: Any, targets: Any, vectors: tuple[torch.Tensor, ...]) -> Vector:
        def loss(*values: torch.Tensor) -> torch.Tensor:
            return self.loss_fn(self._call(values, inputs), targets)

        gradient = grad(loss, argnums=tuple(range(len(vectors))))
        _, pullback = vjp(gradient, *self._primals())
        return list(vmap(pullback, chunk_size=self.chunk_size)(vectors))
