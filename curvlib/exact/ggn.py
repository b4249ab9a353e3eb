"""The exact generalized Gauss-Newton matrix, JᵀHJ, as a :class:`~curvlib.CurvatureEstimate`.

For the supported losses (negative log-likelihoods in natural parameters: cross-entropy, MSE,
BCE-with-logits) the GGN equals the type-2 Fisher (Martens 2020, "New insights and perspectives on
the natural gradient method"). With f the model output and H_f = ∇²_f L the loss Hessian w.r.t.
the outputs (positive semi-definite for these losses),

    G = Jᵀ H_f J,   J = ∂f/∂θ.

Products are J v by forward mode, H_f analytically (:meth:`LossFunction.hessian_matvec`), and Jᵀ by
reverse mode, all vmapped over K vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from curvlib.exact.base import ExactEstimate
from curvlib.losses import LossFunction
from curvlib.partition import Partition, Vector


class ExactGGN(ExactEstimate):
    """The generalized Gauss-Newton matrix (type-2 Fisher) over all batches given.

    Args:
        model: the model.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        partition: defaults to :meth:`Partition.by_tensor`.
        chunk_size: vectors per vmapped product.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        partition: Partition | None = None,
        chunk_size: int = 64,
    ) -> None:
        self.loss = LossFunction(loss_fn)  # raises for an unsupported loss
        super().__init__(model, loss_fn, partition, chunk_size)

    def _check_batch(self, outputs: Any, targets: Any) -> None:
        self.loss.check(outputs, targets)

    def _batch_matmat(self, inputs: Any, targets: Any, vectors: tuple[Tensor, ...]) -> Vector:
        primals = self._primals()

        def forward(*values: Tensor) -> Tensor:
            return self._call(values, inputs)

        outputs, pullback = vjp(forward, *primals)

        def ggn_vector(*tangents: Tensor) -> tuple[Tensor, ...]:
            _, jv = jvp(forward, primals, tangents)
            return pullback(self.loss.hessian_matvec(outputs, targets, jv))

        return list(vmap(ggn_vector, chunk_size=self.chunk_size)(*vectors))
