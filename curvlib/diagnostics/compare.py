"""How well one curvature estimate approximates another: :func:`compare`.

Both estimates are materialised (``to_dense``, float64) and read over the *approximation's*
partition: the exact estimate's matrix E is re-indexed, tensor by tensor, into the approximation's
dense order, so that estimates partitioned differently (Kronecker estimates by module, ExactGGN by
tensor) or over different parameter sets (the reference may cover more tensors) are compared on
the tensors of the approximation. For each block s of the approximation's partition (the diagonal
block C_ss) and for the whole matrix (the row ``"overall"``, cross-blocks included), with A the
approximation:

* relative Frobenius error ‖A − E‖_F / ‖E‖_F;
* trace ratio tr A / tr E;
* top-eigenvalue ratio λ_max(A) / λ_max(E);
* with a ``gradient`` g: the cosine between the preconditioned gradients (A + δI)⁻¹ g and
  (E + δI)⁻¹ g — computed on the whole matrices, then restricted to the block, so a block's cosine
  says how the step an optimizer would take differs on that block;
* with a gradient and a direction u (default: u = g): the per-block learning rates η each matrix
  implies (Wolinski, arXiv 2312.03885): with R = V C Vᵀ (S×S, R_st = u_sᵀ C_st u_t, V the block
  directions of u) and g_s = ⟨g_s, u_s⟩, η solves (R + δI) η = (g_s)_s — the step
  θ ← θ − Σ_s η_s u^{(s)} minimising the quadratic model along the blocks of u.

A ratio 0/0 (or a cosine between two zero vectors) reads as agreement: 1 (error 0). Comparing an
estimate with itself therefore gives error 0, ratios 1, cosines 1 and equal learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from curvlib.estimate import CurvatureEstimate, check_damping, dense_symmetric_solve

OVERALL = "overall"

COLUMNS: tuple[tuple[str, str], ...] = (
    ("relative_error", "rel. Frobenius error"),
    ("trace_ratio", "trace ratio"),
    ("top_eigenvalue_ratio", "λ_max ratio"),
    ("cosine", "cos(precond. grads)"),
    ("lr_approx", "η approx"),
    ("lr_exact", "η exact"),
)
"""The numeric columns of a comparison: attribute name and printed header."""


@dataclass(frozen=True)
class ComparisonRow:
    """One block (or ``"overall"``) of a :class:`ComparisonTable`.

    ``cosine`` is ``None`` without a gradient; ``lr_approx``/``lr_exact`` are ``None`` without a
    gradient and for the overall row.
    """

    block: str
    size: int
    relative_error: float
    trace_ratio: float
    top_eigenvalue_ratio: float
    cosine: float | None
    lr_approx: float | None
    lr_exact: float | None


@dataclass(frozen=True)
class ComparisonTable:
    """The result of :func:`compare`: one row per block of the approximation, then ``overall``.

    ``str(table)`` prints an aligned table; :meth:`to_dict` gives plain Python values.
    """

    approx: str
    exact: str
    damping: float
    rows: list[ComparisonRow]

    @property
    def blocks(self) -> list[ComparisonRow]:
        """The per-block rows (without ``overall``)."""
        return [row for row in self.rows if row.block != OVERALL]

    @property
    def overall(self) -> ComparisonRow:
        return self.rows[-1]

    def __getitem__(self, block: str) -> ComparisonRow:
        for row in self.rows:
            if row.block == block:
                return row
        raise KeyError(f"no block {block!r}; blocks are {[row.block for row in self.rows]}.")

    def to_dict(self) -> dict[str, Any]:
        """``{"approx", "exact", "damping", "rows": [{column: value}, ...]}`` in plain Python."""
        return {"approx": self.approx, "exact": self.exact, "damping": self.damping,
                "rows": [asdict(row) for row in self.rows]}

    def __str__(self) -> str:
        headers = ["block", "size", *(title for _, title in COLUMNS)]
        lines = [[row.block, str(row.size),
                  *(_format(getattr(row, name)) for name, _ in COLUMNS)] for row in self.rows]
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]

        def join(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths)))

        title = f"{self.approx} vs {self.exact} (damping {self.damping:g})"
        rule = "-" * len(join(headers))
        return "\n".join([title, join(headers), rule, *(join(line) for line in lines)])


def _format(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0.0:
        return 1.0 if numerator == 0.0 else math.copysign(math.inf, numerator)
    return numerator / denominator


def _relative_error(approx: Tensor, exact: Tensor) -> float:
    error = float(torch.linalg.matrix_norm(approx - exact))
    reference = float(torch.linalg.matrix_norm(exact))
    if reference == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / reference


def _cosine(a: Tensor, b: Tensor) -> float:
    norms = float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(b))
    if norms == 0.0:
        return 1.0 if bool((a == 0).all()) and bool((b == 0).all()) else 0.0
    return float(a @ b) / norms


def _top_eigenvalue(matrix: Tensor) -> float:
    return float(torch.linalg.eigvalsh(0.5 * (matrix + matrix.T))[-1])


def _reference_index(approx: CurvatureEstimate, exact: CurvatureEstimate) -> Tensor:
    """For every entry of the approximation's dense order, its index in the exact's."""
    offsets, start = {}, 0
    for p in exact.partition.parameters:
        offsets[id(p)] = start
        start += p.numel()
    pieces = []
    for name, p in zip(approx.partition.parameter_names, approx.partition.parameters):
        if id(p) not in offsets:
            raise ValueError(
                f"Parameter {name!r} of the approximation is not in the exact estimate's "
                "partition; compare needs every tensor of approx in exact."
            )
        pieces.append(torch.arange(offsets[id(p)], offsets[id(p)] + p.numel()))
    return torch.cat(pieces)


def compare(
    approx: CurvatureEstimate,
    exact: CurvatureEstimate,
    gradient: Sequence[Tensor] | None = None,
    direction: Sequence[Tensor] | None = None,
    damping: float = 1e-3,
    *,
    max_parameters: int = 5000,
) -> ComparisonTable:
    """Compare ``approx`` with ``exact`` per block of ``approx.partition`` and overall.

    Args:
        approx: the estimate under test.
        exact: the reference (e.g. :class:`~curvlib.ExactGGN` on the same data); it must cover
            every tensor of ``approx.partition``.
        gradient: g, aligned with ``approx.partition.parameters``; enables the cosine and
            learning-rate columns.
        direction: u for the learning rates, aligned likewise (default: the gradient).
        damping: δ ≥ 0 added to both matrices in the preconditioned gradients, and to both
            reduced matrices in the learning rates.
        max_parameters: the largest P to materialise (two P×P float64 matrices).

    Returns:
        A :class:`ComparisonTable`.

    Raises:
        ValueError: an argument that is not an estimate, a tensor of approx missing from exact,
            vectors that do not match the partition, a direction without a gradient, negative
            damping, too many parameters, or a damped matrix that is singular.
    """
    for argument, value in (("approx", approx), ("exact", exact)):
        if not isinstance(value, CurvatureEstimate):
            raise ValueError(f"{argument} must be a CurvatureEstimate, got "
                             f"{type(value).__name__}.")
    check_damping(damping)
    part = approx.partition
    if part.numel > max_parameters:
        raise ValueError(
            f"compare materialises P×P matrices and approx has P={part.numel} > max_parameters="
            f"{max_parameters}; compare on a partition of fewer tensors or raise max_parameters."
        )
    if direction is not None and gradient is None:
        raise ValueError("direction needs a gradient: the learning rates solve (R + δI) η = g_s "
                         "with g_s = ⟨gradient_s, direction_s⟩.")
    index = _reference_index(approx, exact)
    a = approx.to_dense().detach().to(torch.float64)
    e = exact.to_dense().detach().to(torch.float64)
    e = e[index][:, index].to(a.device)

    cosines: list[float | None] = [None] * (len(part) + 1)
    lrs: list[tuple[float | None, float | None]] = [(None, None)] * (len(part) + 1)
    if gradient is not None:
        grad = part.flatten(part.check_vector(gradient, "gradient")).detach().to(a)
        step_a = dense_symmetric_solve(a, grad, damping, type(approx).__name__)
        step_e = dense_symmetric_solve(e, grad, damping, type(exact).__name__)
        cosines = [_cosine(step_a[sl], step_e[sl]) for sl in part.subset_slices]
        cosines.append(_cosine(step_a, step_e))
        u = part.check_vector(gradient if direction is None else direction, "direction")
        blocks = part.block_directions([t.detach() for t in u]).to(a)
        g_s = part.subset_dots([t.detach() for t in gradient], [t.detach() for t in u]).to(a)
        eta_a = dense_symmetric_solve(blocks @ a @ blocks.T, g_s, damping,
                                      f"{type(approx).__name__} (reduced)")
        eta_e = dense_symmetric_solve(blocks @ e @ blocks.T, g_s, damping,
                                      f"{type(exact).__name__} (reduced)")
        lrs = [(float(x), float(y)) for x, y in zip(eta_a, eta_e)] + [(None, None)]

    rows = []
    views = [(name, sl) for name, sl in zip(part.names, part.subset_slices)]
    views.append((OVERALL, slice(0, part.numel)))
    for (name, sl), cosine, (lr_a, lr_e) in zip(views, cosines, lrs):
        block_a, block_e = a[sl, sl], e[sl, sl]
        rows.append(ComparisonRow(
            block=name,
            size=block_a.shape[0],
            relative_error=_relative_error(block_a, block_e),
            trace_ratio=_ratio(float(torch.trace(block_a)), float(torch.trace(block_e))),
            top_eigenvalue_ratio=_ratio(_top_eigenvalue(block_a), _top_eigenvalue(block_e)),
            cosine=cosine,
            lr_approx=lr_a,
            lr_exact=lr_e,
        ))
    return ComparisonTable(type(approx).__name__, type(exact).__name__, float(damping), rows)
