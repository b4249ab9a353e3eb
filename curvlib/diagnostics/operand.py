"""What a diagnostic reads: a symmetric P×P operator, seen only through products with vectors.

Every diagnostic takes ``estimate_or_operator``, one of

* a :class:`~curvlib.CurvatureEstimate` — products go through its batched ``matmat`` (for the
  exact estimates one vmapped pass per chunk of vectors), and vectors handed back to the user are
  parameter-aligned lists of tensors;
* a SciPy ``LinearOperator`` of shape P×P acting on NumPy vectors;
* a dense symmetric P×P ``torch.Tensor``.

:func:`as_operand` turns any of them into a :class:`SymmetricOperand` with one method,
``matmat`` (P×K tensors in, P×K tensors out, in the dense order of the partition for an estimate),
that counts the products it has made. The helpers at the end validate the arguments that several
diagnostics share and draw the seeded random probes they all use.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, aslinearoperator
from torch import Tensor

from curvlib.estimate import CurvatureEstimate
from curvlib.partition import Partition, Vector

Operand = CurvatureEstimate | LinearOperator | Tensor


class SymmetricOperand:
    """A symmetric P×P operator applied to blocks of vectors, counting its products.

    Build one with :func:`as_operand`. Exactly one of ``estimate``, ``dense`` and
    ``linear_operator`` is set.

    Attributes:
        size: P.
        dtype, device: of the tensors ``matmat`` takes and returns.
        num_matvecs: how many matrix-vector products have been made so far (a P×K block counts K).
    """

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        device: torch.device,
        estimate: CurvatureEstimate | None = None,
        dense: Tensor | None = None,
        linear_operator: LinearOperator | None = None,
    ) -> None:
        self.size = size
        self.dtype = dtype
        self.device = device
        self.estimate = estimate
        self.dense = dense
        self.linear_operator = linear_operator
        self.num_matvecs = 0

    @property
    def partition(self) -> Partition | None:
        """The estimate's partition, or ``None`` for a bare operator."""
        return None if self.estimate is None else self.estimate.partition

    def matmat(self, block: Tensor) -> Tensor:
        """C X for a P×K block X (columns are vectors in the dense order)."""
        self.num_matvecs += block.shape[1]
        if self.dense is not None:
            return self.dense @ block
        if self.estimate is not None:
            part = self.estimate.partition
            # estimates take K vectors as [K, *p.shape] tensors: the transpose of the P×K block
            products = self.estimate.matmat(part.unflatten_batched(block.T.contiguous()))
            return part.flatten_batched([p.detach() for p in products]).T
        assert self.linear_operator is not None
        out = self.linear_operator.matmat(block.detach().cpu().numpy())
        return torch.as_tensor(np.asarray(out), dtype=self.dtype, device=self.device)

    def to_scipy(self) -> LinearOperator:
        """The operator as a SciPy ``LinearOperator`` (an estimate's ``as_linear_operator``)."""
        if self.estimate is not None:
            return self.estimate.as_linear_operator()
        if self.dense is not None:
            return aslinearoperator(self.dense.detach().cpu().numpy())
        assert self.linear_operator is not None
        return self.linear_operator

    def to_vector(self, flat: Tensor) -> Vector | Tensor:
        """A P-vector in the dense order as the user expects it back: parameter-aligned for an
        estimate, the flat tensor itself for a bare operator."""
        part = self.partition
        return flat if part is None else [t.clone() for t in part.unflatten(flat)]


def as_operand(value: Any, argument: str = "estimate_or_operator") -> SymmetricOperand:
    """Read a CurvatureEstimate, a SciPy LinearOperator or a dense symmetric tensor.

    Raises:
        ValueError: anything else, a non-square operator, or a dense tensor that is not finite or
            not symmetric; the message names ``argument``.
    """
    if isinstance(value, CurvatureEstimate):
        part = value.partition
        return SymmetricOperand(part.numel, part.dtype, part.device, estimate=value)
    if isinstance(value, Tensor):
        if value.dim() != 2 or value.shape[0] != value.shape[1] or value.shape[0] == 0:
            raise ValueError(f"{argument} must be a square P×P matrix, got shape "
                             f"{tuple(value.shape)}.")
        if not value.is_floating_point():
            raise ValueError(f"{argument} must be a floating-point tensor, got {value.dtype}.")
        dense = value.detach()
        if not bool(torch.isfinite(dense).all()):
            raise ValueError(f"{argument} is not finite (contains NaN or inf).")
        scale = float(dense.abs().max())
        asymmetry = float((dense - dense.T).abs().max())
        # products of exact estimates are symmetric only up to rounding; a real asymmetry is large
        if asymmetry > math.sqrt(torch.finfo(dense.dtype).eps) * scale:
            raise ValueError(f"{argument} is not symmetric (max |C − Cᵀ| = {asymmetry:.3e} for "
                             f"max |C| = {scale:.3e}).")
        return SymmetricOperand(dense.shape[0], dense.dtype, dense.device, dense=dense)
    if isinstance(value, LinearOperator):
        rows, cols = value.shape
        if rows != cols or rows == 0:
            raise ValueError(f"{argument} must be a square P×P operator, got shape {value.shape}.")
        dtype = torch.float32 if np.dtype(value.dtype) == np.float32 else torch.float64
        return SymmetricOperand(rows, dtype, torch.device("cpu"), linear_operator=value)
    raise ValueError(
        f"{argument} must be a CurvatureEstimate, a scipy LinearOperator or a square "
        f"torch.Tensor, got {type(value).__name__}."
    )


def check_positive_int(value: Any, argument: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer ≥ ``minimum``, else raise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{argument} must be an integer ≥ {minimum}, got {value!r}.")
    return int(value)


def check_seed(seed: Any) -> int | None:
    """A seed is ``None`` (fresh randomness) or a non-negative integer."""
    if seed is None:
        return None
    return check_positive_int(seed, "seed", minimum=0)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: probes are drawn on the CPU so that a seed means the same on any device."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def rademacher(
    size: int, count: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A size×count block of independent ±1 entries (Rademacher probes: E[z zᵀ] = I)."""
    signs = torch.randint(0, 2, (size, count), generator=generator).to(dtype) * 2 - 1
    return signs.to(device)
