"""Extreme eigenvalues of a curvature estimate: :func:`top_eigenvalues`.

Three routes to the k eigenvalues selected by ``which`` (``"LA"`` largest algebraic, ``"SA"``
smallest algebraic, ``"LM"`` largest magnitude):

* **Lanczos** (``method="lanczos"``): implicitly restarted Lanczos (ARPACK, through
  ``scipy.sparse.linalg.eigsh``) on the operator's matrix-vector products — for a
  :class:`~curvlib.CurvatureEstimate`, on ``as_linear_operator()``. Matrix-free: it needs only
  products C v, a few times k of them per restart. This is how Hessian spectra of networks are
  probed in practice (Ghorbani, Krishnan & Xiao 2019, "An investigation into neural net
  optimization via Hessian eigenvalue density"; Yao et al. 2020, "PyHessian").
* **Structure** (``method="exact"``): the spectrum is read off the estimate without any product.
  A Kronecker estimate is block-diagonal over layers, and each block is
  (U_out ⊗ U_in) diag(vec D) (U_out ⊗ U_in)ᵀ in the row-major [W | b] layout, with D the
  d_out × d_in' eigenbasis diagonal that ``factors()`` exposes: for K-FAC and TKFAC
  D = s_out s_inᵀ / divisor, the products of the factor eigenvalues (the eigenvalues of A ⊗ G
  are all λ_i(A) λ_j(G)); for EKFAC and TEKFAC D is the re-fitted diagonal. The eigenvector of
  D_ij is the matrix u_out,i u_in,jᵀ. For the diagonal estimates (:class:`~curvlib.DiagGGN`,
  :class:`~curvlib.DiagHessian`) the eigenvalues are the diagonal entries and the eigenvectors
  the unit vectors.
* **Dense** (``method="dense"``): ``torch.linalg.eigh`` of the P×P matrix (``to_dense()`` for an
  estimate) — the reference for small P.

``method="auto"`` takes the structure when there is one, the dense route for a dense tensor, and
Lanczos otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor

from curvlib.diagnostics.diagonal import DiagonalEstimate
from curvlib.diagnostics.operand import (
    Operand,
    SymmetricOperand,
    as_operand,
    check_positive_int,
    check_seed,
)
from curvlib.diagnostics.progress import progress_bar
from curvlib.estimate import CurvatureEstimate
from curvlib.partition import Vector

WHICH: tuple[str, ...] = ("LA", "SA", "LM")
METHODS: tuple[str, ...] = ("auto", "lanczos", "exact", "dense")


@dataclass
class StructuredSpectrum:
    """All P eigenvalues of a structured estimate, and a way to build any of its eigenvectors.

    Attributes:
        values: the P eigenvalues (in no particular order).
        vector: index into ``values`` → the unit eigenvector, parameter-aligned.
    """

    values: Tensor
    vector: Callable[[int], Vector]


def _block_tensors(group: list[Tensor], d_out: int, d_cols: int,
                   name: str) -> list[tuple[Tensor, slice]]:
    """For each tensor of a Kronecker block, its columns in the [W | b] matrix (d_out × d_cols).

    The weight (a tensor with ≥ 2 axes) is ``weight.view(d_out, -1)``, the bias a last column.
    """
    placed, start = [], 0
    for p in sorted(group, key=lambda t: -t.dim()):  # the weight's columns come first
        cols = p.numel() // d_out if p.shape[0] == d_out else -1
        if cols <= 0 or cols * d_out != p.numel():
            break
        placed.append((p, slice(start, start + cols)))
        start += cols
    if start != d_cols or len(placed) != len(group):
        raise ValueError(
            f"factors() of module {name!r}: a diagonal of shape ({d_out}, {d_cols}) does not "
            f"match the module's tensors {[tuple(p.shape) for p in group]}."
        )
    return placed


def _block_vector(estimate: CurvatureEstimate, placed: list[tuple[Tensor, slice]],
                  matrix: Tensor) -> Vector:
    """A d_out × d_in' matrix of one block ([W | b] layout) as a parameter-aligned vector that is
    zero outside the block."""
    out = [torch.zeros_like(p) for p in estimate.partition.parameters]
    position = {id(p): i for i, p in enumerate(estimate.partition.parameters)}
    for p, cols in placed:
        out[position[id(p)]] = matrix[:, cols].reshape(p.shape).to(p.dtype)
    return out


def _kronecker_bases(estimate: CurvatureEstimate, name: str, entry: dict[str, Tensor],
                     placed: list[tuple[Tensor, slice]]) -> tuple[Tensor, Tensor]:
    """(U_out, U_in) of a block, told apart by their sizes, or by one product when both are
    square of the same size (``factors()`` names the factors after the method, not by role)."""
    diagonal = entry["diagonal"]
    d_out, d_cols = diagonal.shape
    bases = [v for key, v in entry.items() if key.startswith("eigvecs_")]
    if len(bases) != 2:
        raise ValueError(f"factors() of module {name!r} must give two 'eigvecs_*' entries, "
                         f"got {len(bases)}.")
    first, second = bases
    if d_out != d_cols:
        return (first, second) if first.shape[0] == d_out else (second, first)
    probe = torch.randn(d_out, d_cols, dtype=diagonal.dtype, device=diagonal.device,
                        generator=torch.Generator(device=diagonal.device).manual_seed(0))
    product = estimate.matvec(_block_vector(estimate, placed, probe))
    position = {id(p): i for i, p in enumerate(estimate.partition.parameters)}
    actual = torch.cat([product[position[id(p)]].reshape(d_out, -1) for p, _ in placed], dim=1)
    for out_basis, in_basis in ((first, second), (second, first)):
        expected = out_basis @ ((out_basis.T @ probe @ in_basis) * diagonal) @ in_basis.T
        if torch.allclose(actual.to(expected.dtype), expected, rtol=1e-5,
                          atol=1e-7 * float(expected.abs().max()) + 1e-30):
            return out_basis, in_basis
    raise ValueError(f"factors() of module {name!r} do not reproduce the estimate's matvec.")


@dataclass
class _KroneckerBlock:
    """One layer's block: where its eigenvalues start, its bases and its tensors' columns."""

    start: int
    d_cols: int
    out_basis: Tensor
    in_basis: Tensor
    placed: list[tuple[Tensor, slice]]


def kronecker_spectrum(estimate: CurvatureEstimate) -> StructuredSpectrum:
    """The spectrum of a block-diagonal Kronecker estimate from its ``factors()``.

    Raises:
        ValueError: ``factors()`` does not cover the partition's subsets or its entries do not
            fit the module's tensors.
    """
    factors = estimate.factors()  # type: ignore[attr-defined]
    part = estimate.partition
    if list(factors) != part.names:
        raise ValueError(f"factors() covers modules {list(factors)}, the partition "
                         f"{part.names}: cannot read the spectrum off the factors.")
    values: list[Tensor] = []
    blocks: list[_KroneckerBlock] = []
    start = 0
    for group, (name, entry) in zip(part.groups, factors.items()):
        diagonal = entry["diagonal"]
        placed = _block_tensors(group, *diagonal.shape, name)
        out_basis, in_basis = _kronecker_bases(estimate, name, entry, placed)
        blocks.append(_KroneckerBlock(start, diagonal.shape[1], out_basis, in_basis, placed))
        values.append(diagonal.reshape(-1))
        start += diagonal.numel()
    starts = np.array([block.start for block in blocks])

    def vector(i: int) -> Vector:
        block = blocks[int(np.searchsorted(starts, i, side="right")) - 1]
        row, col = divmod(i - block.start, block.d_cols)
        matrix = torch.outer(block.out_basis[:, row], block.in_basis[:, col])  # u_out u_inᵀ
        return _block_vector(estimate, block.placed, matrix)

    return StructuredSpectrum(torch.cat(values).to(part.dtype), vector)


def diagonal_spectrum(estimate: DiagonalEstimate) -> StructuredSpectrum:
    """The spectrum of Diag(d): the entries of d, with the unit vectors as eigenvectors."""
    part = estimate.partition
    flat = part.flatten(estimate.diagonal())

    def vector(i: int) -> Vector:
        unit = torch.zeros_like(flat)
        unit[i] = 1.0
        return [t.clone() for t in part.unflatten(unit)]

    return StructuredSpectrum(flat, vector)


def structured_spectrum(value: Any) -> StructuredSpectrum | None:
    """The spectrum read off an estimate's structure, or ``None`` when it has none known here.

    Known structures: diagonal estimates, and estimates with a ``factors()`` method returning,
    per partition subset, a d_out × d_in' eigenbasis ``"diagonal"`` and the two factor eigenbases
    ``"eigvecs_*"`` (the Kronecker estimates of :mod:`curvlib.kron`).
    """
    if isinstance(value, DiagonalEstimate):
        return diagonal_spectrum(value)
    if isinstance(value, CurvatureEstimate) and callable(getattr(value, "factors", None)):
        return kronecker_spectrum(value)
    return None


def select(values: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k values selected by ``which``, in the order they are returned."""
    if which == "LA":
        key = -values
    elif which == "SA":
        key = values
    else:
        key = -values.abs()
    return torch.argsort(key, stable=True)[:k]


def _lanczos(operand: SymmetricOperand, k: int, which: str, tol: float, max_restarts: int | None,
             seed: int | None, want_vectors: bool,
             progress: bool | None) -> tuple[Tensor, Tensor | None]:
    base = operand.to_scipy()
    size = operand.size
    bar = progress_bar(None, "Lanczos", progress, unit="matvec")

    def matvec(x: np.ndarray) -> np.ndarray:
        bar.update(1)
        return base.matvec(x)

    counted = LinearOperator((size, size), matvec=matvec, rmatvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(size)
    with bar:
        result = eigsh(counted, k=k, which=which, v0=v0, tol=tol, maxiter=max_restarts,
                       return_eigenvectors=want_vectors)
    values, vectors = result if want_vectors else (result, None)
    values_t = torch.as_tensor(np.asarray(values), dtype=operand.dtype, device=operand.device)
    order = select(values_t, k, which)
    values_t = values_t[order]
    if vectors is None:
        return values_t, None
    vectors_t = torch.as_tensor(np.asarray(vectors), dtype=operand.dtype, device=operand.device)
    return values_t, vectors_t[:, order]


def _dense(operand: SymmetricOperand, k: int, which: str,
           want_vectors: bool) -> tuple[Tensor, Tensor | None]:
    if operand.dense is not None:
        matrix = operand.dense
    elif operand.estimate is not None:
        matrix = operand.estimate.to_dense()
    else:
        eye = torch.eye(operand.size, dtype=operand.dtype, device=operand.device)
        matrix = operand.matmat(eye)
    matrix = 0.5 * (matrix + matrix.T)
    if not want_vectors:
        values = torch.linalg.eigvalsh(matrix)
        return values[select(values, k, which)], None
    values, vectors = torch.linalg.eigh(matrix)
    order = select(values, k, which)
    return values[order], vectors[:, order]


def top_eigenvalues(
    estimate_or_operator: Operand,
    k: int = 1,
    which: str = "LA",
    *,
    method: str = "auto",
    return_eigenvectors: bool = False,
    tol: float = 0.0,
    max_restarts: int | None = None,
    seed: int | None = 0,
    progress: bool | None = None,
) -> Tensor | tuple[Tensor, list[Vector] | list[Tensor]]:
    """The k extreme eigenvalues of a symmetric curvature operator (see the module docstring).

    Args:
        estimate_or_operator: a :class:`~curvlib.CurvatureEstimate`, a SciPy ``LinearOperator``
            or a dense symmetric tensor.
        k: how many eigenvalues (1 ≤ k ≤ P; Lanczos needs k < P).
        which: ``"LA"`` (largest algebraic, returned in decreasing order), ``"SA"`` (smallest,
            increasing) or ``"LM"`` (largest magnitude, decreasing |λ|).
        method: ``"auto"``, ``"lanczos"``, ``"exact"`` (from the estimate's structure) or
            ``"dense"``.
        return_eigenvectors: also return the k unit eigenvectors.
        tol: relative accuracy asked of ARPACK (0: machine precision).
        max_restarts: ARPACK's ``maxiter`` (default: 10 P).
        seed: seeds Lanczos's starting vector (``None``: fresh randomness).
        progress: a progress bar over Lanczos's products (``None``: only on a terminal).

    Returns:
        The k eigenvalues as a tensor; with ``return_eigenvectors`` the pair (eigenvalues,
        eigenvectors), eigenvectors a list of k vectors — each parameter-aligned (a list of
        tensors over ``partition.parameters``) for an estimate, a P-vector for a bare operator.

    Raises:
        ValueError: bad ``k``, ``which``, ``method`` or ``seed``; ``method="exact"`` on an estimate
            without known structure; ``method="lanczos"`` with k ≥ P.
    """
    operand = as_operand(estimate_or_operator)
    size = operand.size
    k = check_positive_int(k, "k")
    if k > size:
        raise ValueError(f"k={k} exceeds the number of eigenvalues P={size}.")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    seed = check_seed(seed)
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number ≥ 0, got {tol!r}.")
    if max_restarts is not None:
        max_restarts = check_positive_int(max_restarts, "max_restarts")

    structure = structured_spectrum(estimate_or_operator) if method in ("auto", "exact") else None
    if method == "exact" and structure is None:
        raise ValueError(
            f"method='exact' needs an estimate with known structure (Kronecker or diagonal), "
            f"got {type(estimate_or_operator).__name__}; use method='lanczos' or 'dense'."
        )
    if structure is not None:
        order = select(structure.values, k, which)
        values = structure.values[order]
        if not return_eigenvectors:
            return values
        return values, [structure.vector(int(i)) for i in order]

    if method == "dense" or (method == "auto" and operand.dense is not None):
        values, vectors = _dense(operand, k, which, return_eigenvectors)
    else:
        if k >= size:
            raise ValueError(f"k={k} must be < P={size} for Lanczos (ARPACK); use "
                             "method='dense' for the whole spectrum.")
        values, vectors = _lanczos(operand, k, which, tol, max_restarts, seed,
                                   return_eigenvectors, progress)
    if vectors is None:
        return values
    return values, [operand.to_vector(vectors[:, i].contiguous()) for i in range(k)]
