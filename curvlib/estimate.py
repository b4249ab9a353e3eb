"""The one interface every curvature estimate implements: :class:`CurvatureEstimate`.

An estimate approximates a P×P symmetric curvature matrix C of the loss (the Hessian, the
generalized Gauss-Newton / type-2 Fisher, a Monte-Carlo or empirical Fisher, or a structured
approximation of one of them) over the parameters of a :class:`~curvlib.Partition`, in the scale of
the user's loss (``reduction="mean"`` → curvature of the mean loss; ``"sum"`` → of the sum).

Subclasses implement ``update``, ``matvec``, ``state_dict`` and ``load_state_dict``; everything else
has a generic fallback here, written once and overridden where structure gives a faster path:

* ``matmat`` applies C to K vectors at once (fallback: K ``matvec`` calls);
* ``to_dense`` applies C to the P basis vectors, in chunks;
* ``reduced(u)`` is the S×S matrix of u_sᵀ C_st u_t, from S products C u^{(t)};
* ``solve`` is a dense eigen-solve for small P and conjugate gradients otherwise;
* ``trace`` is the sum of the diagonal; ``as_linear_operator`` wraps ``matvec`` for SciPy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from curvlib.partition import Partition, Vector


class CurvatureEstimate(ABC):
    """Abstract base of all curvature estimates.

    Attributes:
        partition: the parameters the estimate is defined over, grouped into S subsets.
        dense_solve_max: ``solve`` materialises C and solves densely up to this many parameters,
            and runs conjugate gradients above it.
        chunk_size: how many basis vectors ``to_dense`` pushes through ``matmat`` at once.
    """

    partition: Partition
    dense_solve_max: int = 4096
    chunk_size: int = 256

    # ---------------------------------------------------------------- to implement
    @abstractmethod
    def update(self, inputs: Any, targets: Any) -> None:
        """Accumulate statistics from one batch."""

    @abstractmethod
    def matvec(self, v: Sequence[Tensor]) -> Vector:
        """C v for a parameter-aligned vector v."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the estimate's statistics."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict`."""

    # ---------------------------------------------------------------- shared behaviour
    def matmat(self, vectors: Sequence[Tensor]) -> Vector:
        """C applied to K vectors stored as tensors of shape [K, *p.shape]."""
        k = self.partition.check_batched_vector(vectors)
        columns = [self.matvec([v[i] for v in vectors]) for i in range(k)]
        return [torch.stack([col[j] for col in columns]) for j in range(len(vectors))]

    def to_dense(self) -> Tensor:
        """The P×P matrix C in the dense order (``torch.cat([p.flatten() ...])``)."""
        part = self.partition
        size = part.numel
        ref = part.parameters[0]
        rows = []
        for start in range(0, size, self.chunk_size):
            stop = min(start + self.chunk_size, size)
            basis = torch.zeros(stop - start, size, dtype=ref.dtype, device=ref.device)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            rows.append(part.flatten_batched(self.matmat(part.unflatten_batched(basis))))
        dense = torch.cat(rows)
        # C is symmetric; the products are exact up to rounding, so the columns are kept as is.
        return dense.T.contiguous()

    def diagonal(self) -> Vector:
        """diag(C) as a parameter-aligned vector (fallback: from the dense matrix)."""
        return self.partition.unflatten(torch.diagonal(self.to_dense()).clone())

    def trace(self) -> Tensor:
        """tr C."""
        return sum(d.sum() for d in self.diagonal())

    def reduced(self, u: Sequence[Tensor]) -> Tensor:
        """The S×S matrix with entries u_sᵀ C_st u_t (Wolinski's H̄ when C is the Hessian)."""
        part = self.partition
        u = part.check_vector(u, "u")
        columns = self.matmat([torch.stack([part.restrict(u, t)[j] for t in range(len(part))])
                               for j in range(len(u))])
        out = torch.stack([
            part.subset_dots(u, [c[t] for c in columns]) for t in range(len(part))
        ], dim=1)
        return 0.5 * (out + out.T)

    def solve(self, v: Sequence[Tensor], damping: float = 0.0) -> Vector:
        """(C + damping·I)⁻¹ v.

        Dense eigen-solve in float64 when P ≤ ``dense_solve_max``, conjugate gradients otherwise.

        Raises:
            ValueError: negative damping, or C + damping·I singular (e.g. zero damping on a
                rank-deficient estimate) or, on the CG path, not positive definite.
        """
        part = self.partition
        v = part.check_vector(v, "v")
        check_damping(damping)
        if part.numel <= self.dense_solve_max:
            dense = self.to_dense().to(torch.float64)
            rhs = part.flatten(v).to(torch.float64)
            x = dense_symmetric_solve(dense, rhs, damping, type(self).__name__)
            return [t.to(p.dtype) for t, p in zip(part.unflatten(x), v)]
        return self._cg_solve(v, damping)

    def _cg_solve(
        self, v: Vector, damping: float, rtol: float = 1e-10, max_iter: int | None = None
    ) -> Vector:
        part = self.partition
        b = part.flatten(v)
        max_iter = max_iter or 10 * part.numel

        def apply(x: Tensor) -> Tensor:
            return part.flatten(self.matvec(part.unflatten(x))) + damping * x

        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = r @ r
        target = rtol * rtol * (b @ b)
        for _ in range(max_iter):
            if rs <= target:
                break
            ap = apply(p)
            curvature = p @ ap
            if curvature <= 0:
                raise ValueError(
                    f"{type(self).__name__}.solve: C + {damping}·I is not positive definite "
                    "(conjugate gradients met non-positive curvature); increase the damping."
                )
            alpha = rs / curvature
            x = x + alpha * p
            r = r - alpha * ap
            rs_new = r @ r
            p = r + (rs_new / rs) * p
            rs = rs_new
        else:
            raise ValueError(
                f"{type(self).__name__}.solve: conjugate gradients did not converge in "
                f"{max_iter} iterations; increase the damping."
            )
        return part.unflatten(x)

    def as_linear_operator(self, dtype: np.dtype | type = np.float64) -> LinearOperator:
        """C as a SciPy ``LinearOperator`` acting on NumPy P-vectors in the dense order."""
        part = self.partition
        ref = part.parameters[0]

        def to_torch(x: np.ndarray) -> Tensor:
            return torch.as_tensor(np.ascontiguousarray(x), dtype=ref.dtype, device=ref.device)

        def matvec(x: np.ndarray) -> np.ndarray:
            out = part.flatten(self.matvec(part.unflatten(to_torch(x.reshape(-1)))))
            return out.detach().cpu().numpy().astype(dtype)

        def matmat(x: np.ndarray) -> np.ndarray:
            batched = part.unflatten_batched(to_torch(x.T))
            out = part.flatten_batched(self.matmat(batched))
            return out.T.detach().cpu().numpy().astype(dtype)

        size = part.numel
        return LinearOperator(
            (size, size), matvec=matvec, rmatvec=matvec, matmat=matmat, dtype=dtype
        )


def check_damping(damping: float) -> None:
    """Raise a ValueError for a negative or non-finite damping."""
    if not np.isfinite(float(damping)) or damping < 0:
        raise ValueError(f"damping must be a finite number ≥ 0, got {damping}.")


def dense_symmetric_solve(matrix: Tensor, rhs: Tensor, damping: float, owner: str) -> Tensor:
    """(M + damping·I)⁻¹ rhs for a symmetric M through its eigendecomposition.

    Raises a ValueError when M + damping·I is singular to working precision, instead of returning
    a huge or non-finite answer.
    """
    evals, evecs = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    shifted = evals + damping
    scale = max(float(evals.abs().max()), float(damping), 1e-300)
    tol = matrix.shape[0] * torch.finfo(matrix.dtype).eps * scale
    if bool((shifted.abs() <= tol).any()):
        raise ValueError(
            f"{owner}.solve: the estimate plus damping={damping} is singular "
            f"(smallest |eigenvalue| {float(shifted.abs().min()):.3e}); use a positive damping."
        )
    return evecs @ ((evecs.T @ rhs) / shifted)
