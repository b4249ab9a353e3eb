"""Eigendecompositions of Kronecker factors and the diagonal fit in a Kronecker eigenbasis.

**Eigendecomposition** (pitfall P8). A factor is symmetric as read — the running statistics
accumulate its lower triangle and mirror it (:func:`~curvlib.kron.statistics.mirror_lower`), and
LAPACK reads the lower triangle alone. It is decomposed in its own dtype (at least
float32: statistics never accumulate in less), retried in float64 if the solver fails or returns
non-finite values, and its eigenvalues are clamped at 0 — a factor is a sum of outer products, so
negative eigenvalues are rounding noise and would make the damped inverse blow up.

**Rank-deficient factors.** A factor summed from r rows (r = rows folded so far: examples ×
positions, times the K backpropagated vectors for the output factor) has rank ≤ r whatever the
averaging, so when r is well below its size d (wide layers early in training, or a linear head
after a flattened convolution: W2's 2049 × 2049 input factor from 128 rows) the decomposition is
computed on the range alone (Halko, Martinsson & Tropp 2011, §4–5): with a Gaussian Ω ∈ ℝ^{d×k},
k = r + p (oversampling p), the complete QR of Y = F Ω gives an orthonormal Q = [Q_k Q_⊥] whose
first k columns span range(F); the Rayleigh–Ritz matrix B = Q_kᵀ F Q_k = V Λ Vᵀ then gives
F = (Q_k V) Λ (Q_k V)ᵀ, and Q_⊥ completes the basis with eigenvalue 0. The cost is
O(d² k) instead of O(d³) (a fifth of the time of the full solver at k = d/10, about 0.6× at
k = 0.4 d, where the switch is). A random probe certifies the result, ‖(I − Q_k Q_kᵀ) F ω‖ at
rounding level; otherwise (a rank bound that does not hold) the full solver runs.

**Factors of one batch's rows.** When the rows R ∈ ℝ^{r×d} the factor was summed from are at
hand — right after the first statistics step the factor is that step alone, F = α RᵀR, and
every estimate keeps that step's rows where they would be decomposed (the inputs as references
to the forward's tensors, the gradient rows when at most 0.6 d² entries) — no range finder or
Rayleigh–Ritz product with F is needed: the complete QR of Rᵀ = Q [S; 0] gives
F = α Q_r (S Sᵀ) Q_rᵀ, and the r × r eigendecomposition S Sᵀ = V Λ Vᵀ gives the basis
[Q_⊥  Q_r V] with eigenvalues [0, α Λ] (the SVD route of single-batch EKFAC implementations,
here with the null space kept). It costs the QR, O(d² r), and pays up to r ≈ 0.6 d (1 thread,
d = 785, r = 256: 19 ms against 28 ms from the range and 45 ms from the full solver). A probe
F ω = α Rᵀ R ω certifies that the rows are the factor's; α = tr F / ‖R‖²_F.

**Diagonal in an eigenbasis** (EKFAC, George et al. 2018, arXiv 1806.03884; TEKFAC, Gao et al.,
arXiv 2011.13609). For orthogonal bases U_in (d_in' × d_in') and U_out (d_out × d_out) of a layer,
the diagonal D that minimises ‖F − (U_in ⊗ U_out) diag(D) (U_in ⊗ U_out)ᵀ‖_F is
D = diag((U_in ⊗ U_out)ᵀ F (U_in ⊗ U_out)), which for F = c Σ_{n,k} u_{n,k} u_{n,k}ᵀ is, in matrix
form with the per-example gradients U_{n,k} = Σ_t g_{n,t,k} ā_{n,t}ᵀ (positions summed *before*
squaring, pitfall P9),

    D = c Σ_{n,k} (U_outᵀ U_{n,k} U_in)^{∘2}.

:func:`eigenbasis_squares` evaluates it without loops over examples, by the cheapest of three
routes:

* no sharing (T = 1): U_outᵀ g ā ᵀ U_in is an outer product, so its square factorises and
  D = c (Σ_k (g̃_k)^{∘2})ᵀ (ã^{∘2}) with g̃ = g U_out, ã = ā U_in — one matmul, no per-example
  gradient is formed;
* per-example gradients: P_{n,k} = U_outᵀ (Σ_t g_{n,t,k} ā_{n,t}ᵀ) U_in, then D = c Σ P^{∘2}
  (K N T d_out d_in' multiply-adds to form them). Each side is rotated where it is cheaper:
  the N·T input rows before forming P (N T d_in'² multiply-adds; on CPU a convolution's rows
  are never formed for it: :meth:`~curvlib.kron.collect.LayerInputs.convolved_chunks`) or the
  N·K formed gradients after (N K d_out d_in'²) — rows when T < K d_out; likewise the output
  side, rows (N K T d_out²) when T < d_in', else the gradients (N K d_out² d_in'). On W2's second
  convolution (T = 256 positions, d_in' = 289, d_out = 64) rotating the gradients on the input
  side does a quarter of the work of rotating the rows;
* Gram form: D_ij = c Σ_n Σ_{t,s} (Σ_k g̃_{ntki} g̃_{nski}) (ã_{ntj} ã_{nsj})
  (≈ N T² d_out d_in' multiply-adds, cheaper when T ≪ K).

Examples are processed in chunks so that no intermediate exceeds ``max_elements`` entries.

**The refit from the factors' own step.** When the factors were summed from this very step alone
(the first refresh, e.g. a one-batch estimate), every row ā lies in range(A) and every g in
range(G) — under expand or without shared positions; under reduce the factors only see the
rows' means or sums — so the rotated rows vanish outside the r trailing eigenvectors of each
basis (r = rank bound; eigenvalues ascend). Only that r_out × r_in block of D is computed; the rest
is zero (W1, first layer: 256 of 785 and 512 columns, a ninth of the products).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor

from curvlib.kron.collect import LayerInputs
from curvlib.losses import all_finite, check_finite

LOW_RANK_OVERSAMPLING = 8
LOW_RANK_MAX_FRACTION = 0.4
ROWS_MAX_FRACTION = 0.6


def decomposed_from_rows(rows: int, d: int) -> bool:
    """Whether a d × d factor summed from ``rows`` rows at hand is decomposed from them
    (:func:`eigh_psd`), which is also when they are worth keeping."""
    return rows <= ROWS_MAX_FRACTION * d


def eigh_psd(
    matrix: Tensor, what: str, rank_bound: int | None = None,
    rows: Callable[[], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """(eigenvalues ≥ 0, orthonormal eigenvectors) of a symmetric positive semi-definite factor.

    ``matrix`` must be symmetric (the full solver reads its lower triangle, the range-only one
    all of it).

    Eigenvalues are in ascending order. ``rank_bound`` (the number of rows the factor was summed
    from, if known) enables the range-only decomposition of the module docstring when
    ``rank_bound + LOW_RANK_OVERSAMPLING ≤ LOW_RANK_MAX_FRACTION · d``. ``rows``, if given, forms
    those rows R [rank_bound, d], with ``matrix`` ∝ RᵀR; they are formed and decomposed instead
    when ``rank_bound ≤ ROWS_MAX_FRACTION · d``.

    Raises:
        ValueError: the factor is not finite, or no eigendecomposition succeeds even in float64.
    """
    check_finite(matrix, what)
    work = matrix if matrix.dtype == torch.float64 else matrix.to(torch.float32)
    if rank_bound is not None and rows is not None and decomposed_from_rows(rank_bound, len(work)):
        found = _eigh_rows(work, rows().to(work.dtype))
        if found is not None:
            return found[0].to(matrix.dtype), found[1].to(matrix.dtype)
    if rank_bound is not None:
        k = rank_bound + LOW_RANK_OVERSAMPLING
        if k <= LOW_RANK_MAX_FRACTION * matrix.shape[0]:
            found = _eigh_range(work, k)
            if found is not None:
                return found[0].clamp_min(0).to(matrix.dtype), found[1].to(matrix.dtype)
    for attempt in (work, matrix.to(torch.float64)):
        try:
            values, vectors = torch.linalg.eigh(attempt)
        except torch.linalg.LinAlgError:
            continue
        if all_finite(values) and all_finite(vectors):
            return values.clamp_min(0).to(matrix.dtype), vectors.to(matrix.dtype)
    raise ValueError(f"The eigendecomposition of {what} failed, also in float64.")


def _eigh_range(sym: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """The eigendecomposition of a symmetric PSD matrix of rank < k from its range (see the
    module docstring), ascending; None when the probe finds range(F) not captured."""
    d = sym.shape[0]
    # A fixed seed: the same factor always gets the same basis (reproducible refreshes).
    generator = torch.Generator(device=sym.device).manual_seed(0x5EED)
    probes = torch.randn(d, k + 1, generator=generator, dtype=sym.dtype, device=sym.device)
    images = sym @ probes
    try:
        q, _ = torch.linalg.qr(images[:, :k], mode="complete")
        q_k = q[:, :k]
        ritz = q_k.T @ sym @ q_k
        values, vectors = torch.linalg.eigh(0.5 * (ritz + ritz.T))
    except torch.linalg.LinAlgError:
        return None
    check = images[:, k]
    residual = check - q_k @ (q_k.T @ check)
    # Rounding alone leaves ≈ eps·√d of the probe's image outside the computed range (measured
    # 0.3–2.5 eps·√d in float32 and float64); a missed direction leaves its eigenvalue's share.
    tolerance = 20 * math.sqrt(d) * torch.finfo(sym.dtype).eps * float(check.norm())
    if not (all_finite(values) and float(residual.norm()) <= tolerance):
        return None
    return torch.cat([values.new_zeros(d - k), values]), _basis(q[:, k:], q_k, vectors)


def _basis(null: Tensor, range_: Tensor, rotation: Tensor) -> Tensor:
    """[null  range_ · rotation], column-major like LAPACK's eigenvectors (``torch.kron`` of
    bases in mixed memory layouts fails)."""
    d, m = null.shape
    out = null.new_empty(d, d).T
    out[:, :m] = null
    torch.mm(range_, rotation, out=out[:, m:])
    return out


def _eigh_rows(sym: Tensor, rows: Tensor) -> tuple[Tensor, Tensor] | None:
    """The eigendecomposition of sym = α RᵀR from the rows R [r, d], r < d (see the module
    docstring), ascending; None when a probe finds sym not proportional to RᵀR."""
    r, d = rows.shape
    if r >= d:
        return None
    frobenius = rows.square().sum()
    if not bool(frobenius > 0):
        return None
    alpha = sym.diagonal().sum() / frobenius
    generator = torch.Generator(device=sym.device).manual_seed(0x5EED)
    probe = torch.randn(d, generator=generator, dtype=sym.dtype, device=sym.device)
    image = sym @ probe
    residual = image - alpha * (rows.T @ (rows @ probe))
    # The factor and the product add the same r·d terms in other orders: rounding leaves
    # ≈ eps·√r of the image (relative); a factor of other rows differs in its leading digits.
    tolerance = 20 * math.sqrt(r) * torch.finfo(sym.dtype).eps * float(image.norm())
    if not float(residual.norm()) <= tolerance:
        return None
    try:
        q, triangle = torch.linalg.qr(rows.T, mode="complete")
        square = triangle[:r]
        values, vectors = torch.linalg.eigh(square @ square.T)
    except torch.linalg.LinAlgError:
        return None
    if not (all_finite(values) and all_finite(vectors)):
        return None
    values = torch.cat([values.new_zeros(d - r), (alpha * values).clamp_min(0)])
    return values, _basis(q[:, r:], q[:, :r], vectors)


SquaresRoute = Literal["auto", "outer", "per_example", "gram"]


def eigenbasis_squares(
    inputs: LayerInputs,
    grads: Tensor,
    basis_in: Tensor,
    basis_out: Tensor,
    max_elements: int = 1 << 19,
    route: SquaresRoute = "auto",
    support: tuple[int, int] | None = None,
    *,
    alpha: float = 1.0,
    out: Tensor | None = None,
    accumulate: bool = False,
) -> Tensor:
    """α Σ_{n,k} (U_outᵀ U_{n,k} U_in)^{∘2} for ā [N, T, d_in'] (formed a chunk of examples at a
    time) and g [K, N, T, d_out] (no c).

    The bases may carry zero columns beyond their size (:func:`pad_columns`, which is applied
    here otherwise); the result is d_out × d_in'. ``route`` forces one of the routes of the module
    docstring (``"auto"``: the cheapest; ``"outer"`` needs T = 1). ``max_elements`` bounds one
    chunk's intermediates: chunks that stay in cache, each product writing into one reused
    buffer, are ≈1.5× faster than whole-batch products on W2's convolutions (measured, CPU).
    ``support`` = (s_in, s_out): the rows lie in the span of the last s_in columns of U_in and
    the gradient rows in that of the last s_out of U_out (the module docstring); only that block
    is computed, the rest of the result is zero.

    ``out``: a [w_out, w_in] tensor (the padded bases' widths) the result is written into, or with
    ``accumulate`` added to; the result is its leading d_out × d_in' block. A caller that folds
    every step reuses one, and α scales the products themselves: zeroing a fresh result and
    scaling it in a pass of its own took 0.5–0.7 ms and 0.1–0.4 ms of a 30–34 ms W1 EKFAC step
    (``torch.profiler``, 1 thread).
    """
    widths = (padded_width(basis_out.shape[1]), padded_width(basis_in.shape[1]))
    if accumulate and out is None:
        raise ValueError("eigenbasis_squares: accumulate=True needs the result to add to in out.")
    if out is not None and out.shape != widths:
        raise ValueError(f"eigenbasis_squares: out has shape {tuple(out.shape)}, the padded bases "
                         f"need {widths}.")
    if support is not None:
        d_in, d_out = inputs.shape[2], grads.shape[-1]
        s_in, s_out = min(support[0], d_in), min(support[1], d_out)
        block = eigenbasis_squares(inputs, grads, basis_in[:, d_in - s_in : d_in],
                                   basis_out[:, d_out - s_out : d_out], max_elements, route,
                                   alpha=alpha)
        result = (block.new_zeros(d_out, d_in) if out is None
                  else out if accumulate else out.zero_())[:d_out, :d_in]
        result[d_out - s_out :, d_in - s_in :] += block[:s_out, :s_in]  # cut the padding
        return result
    n, t, d_in = inputs.shape
    k, d_out = grads.shape[0], grads.shape[-1]
    rows_in, rows_out = t < k * d_out, t < d_in  # where per-example gradients rotate rows
    per_example_cost = (
        (t * d_in * d_in if rows_in else k * d_out * d_in * d_in)
        + (k * t * d_out * d_out if rows_out else k * d_out * d_out * d_in)
        + k * t * d_out * d_in
    )
    gram_cost = t * d_in * d_in + k * t * d_out * d_out + t * t * (k * d_out + d_in + d_out * d_in)
    if route == "auto":
        route = "outer" if t == 1 else "gram" if gram_cost < per_example_cost else "per_example"
    if route == "outer" and t != 1:
        raise ValueError(f"eigenbasis_squares: route='outer' needs one position, got T={t}.")
    if route != "per_example":
        rows_in = rows_out = True
    basis_in, basis_out = pad_columns(basis_in), pad_columns(basis_out)
    w_in, w_out = basis_in.shape[1], basis_out.shape[1]
    if route == "outer":
        per_example = k * w_out + w_in
    elif route == "per_example":
        per_example = k * w_out * w_in + t * (w_in + k * w_out)
    else:
        per_example = t * t * (w_out + w_in)
    result = out if out is not None else grads.new_empty(w_out, w_in)
    # The outer route's first product overwrites (β = 0) instead of adding to zeros.
    overwrite = not accumulate and route == "outer" and n > 0
    if not accumulate and not overwrite:
        result.zero_()
    chunk = max(1, min(n, max_elements // max(per_example, 1)))
    # One workspace per product, reused by every chunk: a fresh buffer per chunk costs page
    # faults on CPU comparable to the product itself.
    # An example's K gradients enter one product as a [K·d_out, T] left factor. Gradients stored
    # with d_out innermost (linear layers) and K > 1 are packed [m, T, K, d_out] so that it is a
    # transposed view; per-example [d_out, T] blocks (convolutions) copy into it along T.
    packed = route == "per_example" and k > 1 and grads.stride(-1) == 1
    rotated_out = None if not rows_out else (
        grads.new_empty(chunk * t * k, w_out) if packed else grads.new_empty(k, chunk, t, w_out))
    for start, a in _input_chunks(inputs, chunk, basis_in if rows_in else None):
        m = a.shape[0]
        g = grads[:, start : start + m]  # g [K, m, T, d_out]
        if packed:
            g = g.permute(1, 2, 0, 3).reshape(-1, d_out)  # [m·T·K, d_out]
            if rotated_out is not None:
                g = torch.mm(g, basis_out, out=rotated_out[: m * t * k])
        elif rotated_out is not None:
            g = _rotate_rows(g, basis_out, rotated_out[:, :m])
        if route == "outer":
            # A sum over one vector is still a zero-filled output and a pass over it.
            squares_out = g[0, :, 0].square_() if k == 1 else g[:, :, 0].square_().sum(0)
            result.addmm_(squares_out.T, a[:, 0].square_(), beta=0.0 if overwrite else 1.0,
                          alpha=alpha)
            overwrite = False
        elif route == "per_example":
            left = (g.view(m, t, -1).transpose(1, 2) if packed
                    else g.permute(1, 0, 3, 2).reshape(m, -1, t))  # [m, K·d_out, T]
            per = torch.bmm(left, a).view(m, k, -1, a.shape[-1])  # [m, K, d_out, d_in']
            per = per if rows_out else torch.matmul(basis_out.T, per)
            per = per if rows_in else per @ basis_in
            result.add_(per.square_().sum((0, 1)), alpha=alpha)
        else:
            gram_out = torch.einsum("knti,knsi->ntsi", g, g)
            gram_in = a.unsqueeze(2) * a.unsqueeze(1)  # [m, T, T, d_in']
            result.add_(torch.einsum("ntsi,ntsj->ij", gram_out, gram_in), alpha=alpha)
    return result[:d_out, :d_in]


def _input_chunks(inputs: LayerInputs, chunk: int, basis: Tensor | None
                  ) -> Iterator[tuple[int, Tensor]]:
    """(first example, ā [m, T, d_in']) for chunks of ``chunk`` examples, or with a basis U
    [d_in', w] the rows rotated, ā U [m, T, w].

    A convolution's rows are rotated as a convolution where
    :meth:`LayerInputs.convolved_chunks` applies; rows that are a linear layer's recorded input
    (:meth:`LayerInputs.features`) are rotated from that input, the homogeneous coordinate's 1
    adding the basis' last row, instead of being copied beside a column of ones first. Other
    rotated rows are formed and multiplied; both products write into one reused buffer.
    """
    n, t, d_in = inputs.shape
    if basis is None:
        yield from inputs.chunks(chunk * t * d_in)  # one reused buffer
        return
    d = inputs.layout.d_in
    # The homogeneous coordinate's row, contiguous once: a column-major basis' row is strided,
    # which slows the products that broadcast it (as addmm's bias or a convolution's).
    bias = basis[d].contiguous() if inputs.layout.has_bias else None
    convolved = inputs.convolved_chunks(basis[:d], bias, chunk)
    if convolved is not None:
        yield from convolved
        return
    rotated = basis.new_empty(chunk, t, basis.shape[1])
    features = inputs.features()
    if features is None:
        for start, a in inputs.chunks(chunk * t * d_in):
            yield start, torch.matmul(a, basis, out=rotated[: a.shape[0]])
        return
    for start in range(0, n, chunk):
        x = features[start : start + chunk].reshape(-1, d)
        m = x.shape[0] // t
        out = rotated[:m].view(m * t, -1)
        if bias is not None:
            torch.addmm(bias, x, basis[:d], out=out)
        else:
            torch.mm(x, basis, out=out)
        yield start, rotated[:m]


def _rotate_rows(grads: Tensor, basis: Tensor, out: Tensor) -> Tensor:
    """g U for gradient rows g [K, m, T, d] into ``out`` [K, m, T, w] (each vector's block
    contiguous), returned.

    A chunk of examples sliced from all N is not one matrix across the K vectors; ``matmul``
    then runs one product per example and vector — K·m matrix-vector products at T = 1, about
    5 G multiply-adds/s against 42 as one matrix product per vector (W1's type-2 fold, 1 thread).
    Each vector's rows that form a matrix are rotated by one product.
    """
    if grads.shape[0] > 1 and not grads.is_contiguous() and grads[0].is_contiguous():
        d, w = grads.shape[-1], out.shape[-1]
        for k in range(grads.shape[0]):
            torch.mm(grads[k].view(-1, d), basis, out=out[k].view(-1, w))
        return out
    return torch.matmul(grads, basis, out=out)


def padded_width(columns: int, multiple: int = 16) -> int:
    """The number of columns :func:`pad_columns` pads ``columns`` to."""
    return columns + (-columns % multiple)


def pad_columns(basis: Tensor, multiple: int = 16) -> Tensor:
    """``basis`` with zero columns appended up to a multiple of ``multiple`` columns.

    CPU BLAS writes products whose rows are a multiple of the vector width ≈1.5× faster (measured,
    1 thread: 8192×577 @ 577×577 in 101 ms, @ 577×592 in 67 ms); a zero column only adds a zero
    column to the rotated rows and to the squares, which are cut off at the end.
    """
    rows, columns = basis.shape
    width = padded_width(columns, multiple)
    if width == columns:
        return basis
    # Eigenvectors come column-major from LAPACK: padded in that layout, the copy is contiguous.
    column_major = basis.stride(0) == 1 and basis.stride(1) == rows
    padded = basis.new_zeros(width, rows).T if column_major else basis.new_zeros(rows, width)
    padded[:, :columns] = basis
    return padded
