"""Running statistics kept as sums with their counts, and the factor statistics of K-FAC and TKFAC.

**Sums with counts.** Every statistic is a pair (numerator, count) that batches add to. With
``ema_decay=None`` both are plain sums, so the average over all batches is exact and an
all-reduce over ranks of both is exact too; with ``ema_decay=β`` both are exponential moving
averages started at zero, ``x ← β x + (1 − β) x_b``, whose *ratio* is the batch-weighted EMA
without start-up bias (the (1 − β^t) debiasing factors cancel).

Two kinds of statistic (kfac_family.md §1.5):

* *row means*, the input factor A: numerator Σ_rows ā āᵀ, count = number of rows, read as the
  mean — over examples and shared positions (expand) or over examples (reduce);
* *curvature-scale* statistics (G, TKFAC's δ, Φ_raw, Ψ_raw, the EKFAC/TEKFAC diagonals), which
  carry the reduction factor c of their batch. Batch b adds ``w_b · X_b`` with count ``w_b``;
  ``w_b = N_b`` for ``reduction="mean"`` (the batch-size weighted average, which is exactly how the
  mean loss over all batches weighs each batch's mean loss) and ``w_b = 1`` for ``"sum"``. With
  the exact average a sum-reduced statistic is read as the numerator itself (Σ_b X_b, the curvature
  of the summed loss over all batches, as :class:`~curvlib.ExactGGN` does); under an EMA it is read
  as the average (the curvature of one batch's summed loss, tracked over time).

**K-FAC** (Martens & Grosse 2015; Grosse & Martens 2016; Eschenhagen et al. 2023) keeps
A = mean ā āᵀ and G = c Σ_{rows,k} g gᵀ; the block is A ⊗ G (cvec), i.e. V ↦ G V A on [W | b].

**TKFAC** (Gao et al., AAAI 2021, arXiv 2011.10741) keeps, over the same rows m and vectors k,

    δ = c Σ_m ‖ā_m‖² Σ_k ‖g_{m,k}‖²,
    Φ_raw = c Σ_m (Σ_k ‖g_{m,k}‖²) ā_m ā_mᵀ,   Ψ_raw = c Σ_{m,k} ‖ā_m‖² g_{m,k} g_{m,k}ᵀ,

averaged as *undivided* statistics (pitfall P10) and divided only when read: the block is
Φ_raw ⊗ Ψ_raw / δ = δ Φ ⊗ Ψ with Φ = Φ_raw/δ, Ψ = Ψ_raw/δ of unit trace.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvlib.kron.collect import InputRows, sum_of_squares
from curvlib.kron.syrk import lower_gram, syrk_pays


def gram(
    rows: Tensor, weights: Tensor | None = None, width: int = 128, chunk: int = 1 << 18,
    mirror: bool = True, out: Tensor | None = None, accumulate: bool = False, alpha: float = 1.0,
    norms: Tensor | None = None,
) -> Tensor:
    """α Σ_m w_m r_m r_mᵀ for rows [M, d] (w_m = 1 without ``weights``), computing only the lower
    triangle of blocks.

    The columns are cut into p = ⌈d / width⌉ blocks, rows = [X₁ … X_p]. Block row i of the lower
    triangle, (w ⊙ X_i)ᵀ [X₁ … X_i], is one product written straight into the result; the strict
    upper triangle is its mirror. That is (p + 1)/(2p) of the multiply-adds of one full product in
    p wide products (which keep the matrix multiply near its peak rate), with the same result:
    every entry is still one dot product over M. Unweighted rows that
    :func:`~curvlib.kron.syrk.syrk_pays` takes (CPU, 128 columns and more) go to BLAS syrk
    instead, which writes the lower triangle alone at nearly a full product's rate.

    With weights, the rows are read a chunk of about ``chunk`` entries at a time; the scaled
    panels w ⊙ X_i of a chunk are formed in one reused buffer and the products accumulate over
    the chunks, so no temporary of the rows' size is allocated (for TKFAC's type-2 gradients that
    would be K·M·d_out entries). Chunks of 2¹⁸ entries (1 MiB in float32) are still in cache when
    their panels are multiplied: 20,480 weighted rows in 7.9 ms at d = 128 and 94 ms at d = 512,
    against 9.3 and 98 ms with 2²⁰ (CPU, 1 thread, medians of 15).

    ``norms``: an [M] tensor to write ‖r_m‖² into. Weighted, each chunk's norms are taken while
    the chunk is in cache for its products, which saves TKFAC a pass over its largest rows:
    20,480 weighted rows of d = 384 with their norms in 50.5 ms, against 54.0 ms for the products
    and a pass of their own (CPU, 1 thread).

    ``mirror=False`` writes only the blocks on and below the diagonal blocks (syrk: the entries
    on and below the diagonal) — zero above them in a new result, left as they were in ``out``
    —: the *lower storage* the running statistics
    accumulate (:class:`RunningSum` with ``symmetric=True`` mirrors once, when read), which saves
    the strided mirror copy on every statistics step, and, as a batch's numerator is written over
    the previous one's, zeroing the upper blocks too.

    ``out``: a d × d tensor to write the result into (whatever it held), instead of a new one;
    with ``accumulate``, one that holds an earlier result of the same ``width`` and ``mirror`` to
    add this one to. α scales the products themselves (no pass of its own over the result).
    """
    m, d = rows.shape
    bounds = gram_bounds(d, width)
    if accumulate and out is None:
        raise ValueError("gram: accumulate=True needs the result to add to in out.")
    if weights is None:
        if out is None:
            out = rows.new_empty(d, d) if mirror else rows.new_zeros(d, d)
        if syrk_pays(rows) and out.is_contiguous():
            lower_gram(rows, out, accumulate, alpha)
        else:
            for lo, hi in pairwise(bounds):  # β = 0 overwrites, whatever out held (NaN included)
                out[lo:hi, :hi].addmm_(rows[:, lo:hi].T, rows[:, :hi], beta=float(accumulate),
                                       alpha=alpha)
        if norms is not None:
            norms.copy_(squared_norms(rows, chunk))
    else:
        if out is None:
            out = rows.new_zeros(d, d)
        elif not accumulate:
            out.zero_()
        widest = max(hi - lo for lo, hi in pairwise(bounds))
        step = max(1, chunk // d)
        panel = torch.empty_like(rows[:step, :widest])  # the rows' memory order, so no transpose
        for start in range(0, m, step):
            part = rows[start : start + step]
            if norms is not None:
                norms[start : start + step] = squared_norms(part, chunk)
            scale = weights[start : start + step, None]
            for lo, hi in pairwise(bounds):
                scaled = torch.mul(part[:, lo:hi], scale, out=panel[: part.shape[0], : hi - lo])
                out[lo:hi, :hi].addmm_(scaled.T, part[:, :hi], alpha=alpha)
    return mirror_lower(out, width) if mirror else out


def _block_bounds(d: int, width: int) -> list[int]:
    """Cuts of 0 … d into ⌈d / width⌉ blocks of (nearly) equal size."""
    blocks = max(1, -(-d // width))
    return [d * i // blocks for i in range(blocks + 1)]


def gram_bounds(d: int, width: int) -> list[int]:
    """The column blocks of :func:`gram`: ⌈d / width⌉, but at least two from d = 64 up.

    One block is the full product, twice the multiply-adds of the lower triangle; two cost 3/4 of
    it in products still wide enough to run near peak (CPU, 1 thread, 2048 rows × 128: 0.84 ms in
    one block, 0.71 ms in two; 8192 × 128: 3.40 → 2.96 ms).
    """
    return _block_bounds(d, width if d < 64 else min(width, -(-d // 2)))


def mirror_lower(matrix: Tensor, width: int = 128) -> Tensor:
    """Overwrite the strict upper triangle of a square ``matrix`` with the transpose of its strict
    lower triangle, in place, and return it.

    In panels of at most ``width`` columns: a whole-triangle transpose (or ``tril() +
    tril(-1).T``) strides through memory far beyond the cache — 3.5× slower at d = 2049.
    """
    for lo, hi in pairwise(_block_bounds(matrix.shape[0], width)):
        matrix[:lo, lo:hi] = matrix[lo:hi, :lo].T
        block = matrix[lo:hi, lo:hi]
        block.copy_(block.tril() + block.tril(-1).T)
    return matrix


def input_gram(rows: InputRows, weights: Tensor | None = None, mirror: bool = True,
               out: Tensor | None = None, accumulate: bool = False, alpha: float = 1.0) -> Tensor:
    """α Σ_m w_m ā_m ā_mᵀ over input rows formed a chunk at a time (:class:`InputRows`), each
    chunk's :func:`gram` added to the earlier ones'; ``weights`` [M] (w_m ≥ 0; w_m = 1
    without), ``mirror``, ``out``, ``accumulate`` and α as in :func:`gram`.

    Weighted rows are scaled by √w_m in the chunk itself (a buffer of :class:`InputRows`,
    rewritten by the next chunk) and summed as a plain Gram, instead of through the weighted
    :func:`gram`'s scaled copies. Rows that are a linear layer's recorded input
    (:meth:`InputRows.features`) are not formed: their Gram is that of the input (scaled in one
    pass where weighted), with the homogeneous coordinate's row added from sums. Reduce rows are
    the kept :meth:`InputRows.means`, read by :func:`gram` as they are. Unweighted expand rows of
    a stride-1 convolution are not formed either where their Gram comes cheaper from shifted
    correlations of the input (:meth:`LayerInputs.correlation_gram`).

    Rows read by several layers (:attr:`InputRows.readers`) have their unweighted Gram formed
    once, kept in :attr:`InputRows.gram`, and scaled into each reader's result: every reader
    gets the same bits, so that equal factors are decomposed once at the refresh.
    """
    if accumulate and out is None:
        raise ValueError("input_gram: accumulate=True needs the result to add to in out.")
    if weights is None and rows.readers > 1:
        if rows.gram is None:
            rows.gram = _input_gram(rows, None, mirror=False, out=None, accumulate=False,
                                    alpha=1.0)
        return _scaled(rows.gram, mirror, out, accumulate, alpha, owned=False)
    return _input_gram(rows, weights, mirror, out, accumulate, alpha)


def _scaled(matrix: Tensor, mirror: bool, out: Tensor | None, accumulate: bool, alpha: float,
            owned: bool) -> Tensor:
    """α ``matrix`` (a Gram in lower storage at least) as :func:`gram` returns its products:
    written into ``out``, added to it, or (no ``out``) in ``matrix`` itself where ``owned``, else
    in a new tensor."""
    if out is None:
        out = matrix.mul_(alpha) if owned else matrix * alpha
    elif accumulate:
        out.add_(matrix, alpha=alpha)
    else:
        torch.mul(matrix, alpha, out=out)
    return mirror_lower(out) if mirror else out


def _input_gram(rows: InputRows, weights: Tensor | None, mirror: bool, out: Tensor | None,
                accumulate: bool, alpha: float) -> Tensor:
    """:func:`input_gram` of rows formed for this reader alone."""
    roots = None if weights is None else weights.sqrt()
    features = rows.features()
    if features is not None:
        return _homogeneous_gram(features, rows.inputs.shape[2], roots, mirror, out, accumulate,
                                 alpha)
    if rows.reduce:  # the kept means: N rows, not to be scaled in place
        return gram(rows.means(), weights, mirror=mirror, out=out, accumulate=accumulate,
                    alpha=alpha)
    correlated = None if weights is not None else rows.inputs.correlation_gram()
    if correlated is not None:  # both triangles: lower storage and mirrored alike
        return _scaled(correlated, False, out, accumulate, alpha, owned=True)
    first = True
    for start, chunk in rows.chunks():
        if roots is not None:
            chunk.mul_(roots[start : start + chunk.shape[0], None])
        out = gram(chunk, mirror=False, out=out, accumulate=accumulate or not first, alpha=alpha)
        first = False
    assert out is not None
    return mirror_lower(out) if mirror else out


def _homogeneous_gram(features: Tensor, d_cols: int, roots: Tensor | None, mirror: bool,
                      out: Tensor | None, accumulate: bool, alpha: float) -> Tensor:
    """α Σ_m w_m ā_m ā_mᵀ of the rows ā_m = [x_m; 1] (the trailing 1 where d_cols = d + 1) from
    x [M, d] alone (``roots``: √w_m, or None for w_m = 1): the Gram of the rows √w_m x_m, with
    Σ_m w_m x_mᵀ and Σ_m w_m as the last row."""
    m, d = features.shape
    out = features.new_zeros(d_cols, d_cols) if out is None else out
    scaled = features if roots is None else features * roots[:, None]
    gram(scaled, mirror=False, out=out[:d, :d], accumulate=accumulate, alpha=alpha)
    if d_cols > d:
        sums, corner = out[d, :d], out[d, d]
        if not accumulate:
            sums.zero_()
            corner.zero_()
        if roots is None:
            sums.add_(features.sum(0), alpha=alpha)
            corner.add_(alpha * m)
        else:
            sums.addmv_(scaled.T, roots, alpha=alpha)
            corner.add_(roots.square().sum(), alpha=alpha)
    return mirror_lower(out) if mirror else out


def squared_norms(rows: Tensor, chunk: int = 1 << 18) -> Tensor:
    """‖r_m‖² of every row of rows [M, d].

    Rows stored row-major go to :func:`~curvlib.kron.collect.sum_of_squares`; feature-major ones
    are squared and summed over chunks of about ``chunk`` entries: no temporary of the rows'
    size, and a plain sum of products is fast in that memory order (``vector_norm`` is not).
    """
    m, d = rows.shape
    if rows.stride(1) == 1:
        return sum_of_squares(rows, 1).view(m)
    out = rows.new_empty(m)
    step = max(1, chunk // max(d, 1))
    for start in range(0, m, step):
        part = rows[start : start + step]
        torch.sum(part * part, dim=-1, out=out[start : start + step])
    return out


def example_blocks(grads: Tensor) -> Tensor | None:
    """A [K, N, d, T] view of gradient rows g [K, N, T, d] stored per example as [d, T] blocks
    (a convolution's output gradient as the backward returns it), or None for other layouts.

    Such rows do not merge into one [K·N·T, d] matrix without a transposing copy of all of them;
    :func:`output_gram` works on the blocks instead.
    """
    if grads.dim() != 4 or grads.shape[2] == 1:
        return None
    blocks = grads.transpose(2, 3)
    return blocks if blocks.is_contiguous() else None


def output_gram(grads: Tensor, weights: Tensor | None = None, chunk: int = 1 << 18,
                mirror: bool = True, out: Tensor | None = None, accumulate: bool = False,
                alpha: float = 1.0, norms: Tensor | None = None) -> Tensor:
    """α Σ_{k,m} w_m g_{k,m} g_{k,m}ᵀ for gradient rows g [K, *R, d] (R row axes holding M rows)
    and row weights w [*R] shared by the K vectors (w_m = 1 without ``weights``).

    Rows that merge into a [K·M, d] matrix go to :func:`gram`. Rows stored as per-example
    blocks X_{k,n} = [g_{k,n,1} … g_{k,n,T}] ∈ ℝ^{d × T} (:func:`example_blocks`) are summed as
    Σ_{k,n} (X_{k,n} diag(w_n)) X_{k,n}ᵀ: batched products over about ``chunk`` entries of blocks
    at a time, whose [B, d, d] results (and scaled blocks) live in reused buffers, so no copy of
    the rows is made. ``mirror``, ``out``, ``accumulate`` and α as in :func:`gram` (the blocks'
    products are always full).

    ``norms``: an [*R] tensor that Σ_k ‖g_{k,m}‖² is added to, taken from each chunk of rows or
    blocks while it is in cache for the products (TKFAC's Φ_raw and δ weigh by them).
    """
    blocks = example_blocks(grads)
    if blocks is None:
        flat = grads.reshape(-1, grads.shape[-1])
        if weights is not None:
            weights = weights.reshape(-1).repeat(grads.shape[0])
        flat_norms = None if norms is None else flat.new_empty(flat.shape[0])
        out = gram(flat, weights, mirror=mirror, out=out, accumulate=accumulate, alpha=alpha,
                   norms=flat_norms)
        if norms is not None:
            norms += flat_norms.view(grads.shape[0], *norms.shape).sum(0)
        return out
    if accumulate and out is None:
        raise ValueError("output_gram: accumulate=True needs the result to add to in out.")
    k, n, d, t = blocks.shape
    step = max(1, min(n, chunk // (d * t)))
    if out is None:
        out = blocks.new_zeros(d, d)
    elif not accumulate:
        out.zero_()
    products = blocks.new_empty(step, d, d)
    scaled = None if weights is None else blocks.new_empty(step, d, t)
    for kk in range(k):
        for start in range(0, n, step):
            part = blocks[kk, start : start + step]
            b = part.shape[0]
            if norms is not None:
                norms[start : start + step] += sum_of_squares(part, 1).squeeze(1)
            left = part if scaled is None else torch.mul(
                part, weights[start : start + step, None], out=scaled[:b])
            torch.bmm(left, part.transpose(1, 2), out=products[:b])
            out.add_(products[:b].sum(0), alpha=alpha)
    return out


class RunningSum:
    """A numerator tensor and a count, summed (exact) or exponentially averaged (EMA).

    Args:
        ema_decay: None for exact sums, else β ∈ [0, 1).
        total: read the numerator itself instead of numerator / count (sum reduction, exact).
        symmetric: the numerators are symmetric matrices in lower storage (``gram(...,
            mirror=False)``: only entries on or below the diagonal are meaningful, the others are
            finite leftovers); the value read and the state dict hold the full symmetric matrix.
    """

    def __init__(self, ema_decay: float | None, total: bool = False,
                 symmetric: bool = False) -> None:
        self.ema_decay = ema_decay
        self.total = total
        self.symmetric = symmetric
        self.numerator: Tensor | None = None
        self.count: float = 0.0

    def add(self, numerator: Tensor, count: float) -> None:
        """Fold a batch's numerator in; the first one is kept (not copied), so pass a tensor
        nobody else writes to."""
        # In place: the running numerator is private — value() and state_dict() hand out copies.
        if self.numerator is None:
            keep = 1.0 if self.ema_decay is None else 1.0 - self.ema_decay
            self.numerator = numerator if keep == 1.0 else numerator.mul_(keep)
            self.count = keep * count
        else:
            running, alpha = self.accumulator(count)
            running.add_(numerator, alpha=alpha)

    def accumulator(self, count: float) -> tuple[Tensor, float]:
        """Count a batch whose numerator X the caller adds to the running numerator itself, as
        α X (e.g. by the products that form X, scaled by α): the numerator (decayed here under
        an EMA) and α. Nothing takes a batch back out, so X must be known to be finite first;
        the first batch goes to :meth:`add`."""
        if self.numerator is None:
            raise ValueError("RunningSum.accumulator: no numerator to add to; add() the first.")
        if self.ema_decay is None:
            self.count += count
            return self.numerator, 1.0
        beta = self.ema_decay
        self.count = beta * self.count + (1.0 - beta) * count
        return self.numerator.mul_(beta), 1.0 - beta

    @property
    def empty(self) -> bool:
        return self.numerator is None or self.count == 0.0

    def value(self) -> Tensor:
        """The statistic as read: numerator / count, or the numerator for a total (a new
        tensor either way)."""
        if self.numerator is None or self.count == 0.0:
            raise ValueError("A Kronecker statistic was read before any data was added.")
        if self.symmetric:
            full = mirror_lower(self.numerator.clone())
            return full if self.total else full.div_(self.count)
        return self.numerator.clone() if self.total else self.numerator / self.count

    def state_dict(self) -> dict[str, Any]:
        numerator = None if self.numerator is None else self.numerator.clone()
        if numerator is not None and self.symmetric:
            mirror_lower(numerator)
        return {"numerator": numerator, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        numerator = state["numerator"]
        self.numerator = None if numerator is None else numerator.clone()
        self.count = float(state["count"])


class CurvatureWeights:
    """How batches weigh curvature-scale statistics (see the module docstring)."""

    def __init__(self, reduction: str, ema_decay: float | None) -> None:
        self.reduction = reduction
        self.ema_decay = ema_decay

    def running(self, symmetric: bool = False) -> RunningSum:
        """A fresh curvature-scale statistic (``symmetric``: see :class:`RunningSum`)."""
        return RunningSum(self.ema_decay, total=self.reduction == "sum" and self.ema_decay is None,
                          symmetric=symmetric)

    def weight(self, num_examples: int) -> float:
        """w_b of a batch of N_b examples."""
        return float(num_examples) if self.reduction == "mean" else 1.0


@dataclass(frozen=True)
class Target:
    """Where the products forming one batch's numerator of a matrix statistic write: ``out``
    (None: a new tensor), overwritten or, with ``accumulate``, added to, the products scaled by
    ``alpha`` (the statistic's factor: 1 for row means, w_b·c_b for curvature-scale ones)."""

    out: Tensor | None
    accumulate: bool
    alpha: float


@dataclass(frozen=True)
class FactorRows:
    """Functions that form the rows R of one batch whose Gram RᵀR is proportional to a layer's
    input factor ([M, d_in']) and output factor ([K·M, d_out]) of that batch alone; None where
    that side's rows are not kept (:func:`~curvlib.kron.eigen.eigh_psd` decomposes them instead
    of the factor)."""

    input: Callable[[], Tensor] | None = None
    output: Callable[[], Tensor] | None = None


class FactorStatistics(ABC):
    """The running statistics of one layer, and the two Kronecker factors they define.

    The layer's block is ``(input_factor ⊗ output_factor) / divisor`` in cvec order, that is
    ``V ↦ output_factor · V · input_factor / divisor`` on the [W | b] matrix.

    ``row_means`` names the statistics counted in rows (read as means over rows); every other one
    is curvature-scale, counted in batch weights w_b. ``matrices`` names the d × d statistics,
    Grams whose products :meth:`start` points at a :class:`Target`. ``crosses_sides``: some
    statistic weighs one side's rows by the other's squared norms (its trace is at most the
    product of the two sides' traces).

    A batch: :meth:`start`, :meth:`output_terms` for each chunk of the K vectors, :meth:`batch`,
    then — once the caller has checked what :meth:`batch` returned — :meth:`fold`.
    """

    row_means: ClassVar[frozenset[str]] = frozenset()
    matrices: ClassVar[frozenset[str]] = frozenset()
    crosses_sides: ClassVar[bool] = False

    def __init__(self, weights: CurvatureWeights) -> None:
        self.weights = weights
        # Batch numerators already folded, overwritten by the next batch (``out=`` of gram and
        # output_gram) instead of allocating: a fresh d × d tensor comes from the operating
        # system, and first touching its pages cost ~15% of W1's K-FAC statistics step.
        self._spare: dict[str, Tensor] = {}
        self._targets: dict[str, Target] = {}
        self._counts: dict[str, float] = {}
        self._scale = 1.0

    def start(self, num_rows: int, num_examples: int, scale: float, in_place: bool = False
              ) -> None:
        """Begin a batch of ``num_rows`` rows ā and ``num_examples`` examples whose loss has the
        reduction factor c = ``scale``, choosing where its matrix numerators are written.

        By default into the spare numerators of earlier batches (or new tensors), which
        :meth:`batch` returns for the caller to check and :meth:`fold` adds. ``in_place``: into
        the running numerators themselves, counted now — no pass to add them, no spare matrix
        kept, but nothing takes the batch back out, so the caller must know beforehand that its
        products are finite; :meth:`batch` then returns only the scalar statistics. Needs every
        statistic to hold a batch already (:attr:`empty` false).
        """
        w = self.weights.weight(num_examples)
        self._scale = w * scale
        running = self.running_sums()
        self._counts = {name: float(num_rows) if name in self.row_means else w
                        for name in running}
        self._targets = {}
        for name in self.matrices:
            factor = 1.0 if name in self.row_means else self._scale
            if in_place:
                out, alpha = running[name].accumulator(self._counts[name])
                self._targets[name] = Target(out, True, factor * alpha)
            else:
                self._targets[name] = Target(self._spare.pop(name, None), False, factor)

    def _to_fold(self, numerators: dict[str, Tensor]) -> dict[str, tuple[Tensor, float]]:
        """The (numerator, count) pairs of a batch that :meth:`fold` still has to add: all but
        those written in place."""
        return {name: (numerator, self._counts[name]) for name, numerator in numerators.items()
                if not (name in self._targets and self._targets[name].accumulate)}

    @abstractmethod
    def output_terms(
        self, inputs: InputRows, grads: Tensor, terms: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The parts of a batch's statistics that are sums over the K backpropagated vectors,
        from rows ā [M, d_in'] and the gradient rows g [K_j, *R, d_out] of a chunk of the vectors
        (row axes R holding the same M rows in the same order, e.g. (N, T)), added to ``terms``
        of the earlier chunks (updated in place and returned) or new ones for the first chunk."""

    @abstractmethod
    def batch(self, inputs: InputRows, terms: dict[str, Tensor]) -> dict[str, tuple[Tensor, float]]:
        """One batch's (numerator, count) per running statistic not written in place (see
        :meth:`start`), from its rows ā [M, d_in'] and the :meth:`output_terms` of all its K
        vectors; :meth:`fold` adds them (the terms' tensors may become numerators)."""

    @abstractmethod
    def factor_rows(
        self, inputs: InputRows | None, terms: dict[str, Tensor], grads: Tensor | None
    ) -> FactorRows:
        """The rows of one batch's factors (:class:`FactorRows`), from its rows ā [M, d_in'],
        the :meth:`output_terms` of all its K vectors and its gradient rows g [K, *R, d_out]
        (as in :meth:`output_terms`, all K vectors). ``inputs`` or ``grads`` None: that side's
        rows are not wanted. Call it before :meth:`batch`, which may overwrite the terms."""

    def fold(self, batch: dict[str, tuple[Tensor, float]]) -> None:
        """Add a :meth:`batch` to the running statistics; its matrices (unless kept as a first
        numerator) are then overwritten by the next :meth:`batch`."""
        running = self.running_sums()
        for name, (numerator, count) in batch.items():
            running[name].add(numerator, count)
            if numerator.dim() == 2 and running[name].numerator is not numerator:
                self._spare[name] = numerator

    @abstractmethod
    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(input factor, output factor, divisor) as read now."""

    @abstractmethod
    def named(self) -> dict[str, Tensor]:
        """The statistics under their names in the papers, for :meth:`factors` of an estimate."""

    @abstractmethod
    def running_sums(self) -> dict[str, RunningSum]:
        """Every running statistic by name (for state dicts)."""

    @property
    def empty(self) -> bool:
        return any(r.empty for r in self.running_sums().values())

    def state_dict(self) -> dict[str, Any]:
        return {name: r.state_dict() for name, r in self.running_sums().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, running in self.running_sums().items():
            running.load_state_dict(state[name])


class KFACStatistics(FactorStatistics):
    """A = mean of ā āᵀ over rows; G = c Σ_{rows,k} g gᵀ (curvature scale)."""

    row_means: ClassVar[frozenset[str]] = frozenset({"A"})
    matrices: ClassVar[frozenset[str]] = frozenset({"A", "G"})

    def __init__(self, weights: CurvatureWeights) -> None:
        super().__init__(weights)
        self.A = RunningSum(weights.ema_decay, symmetric=True)
        self.G = weights.running(symmetric=True)

    def output_terms(
        self, inputs: InputRows, grads: Tensor, terms: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        target = self._targets["G"]
        if terms is None:
            return {"G": output_gram(grads, mirror=False, out=target.out,
                                     accumulate=target.accumulate, alpha=target.alpha)}
        output_gram(grads, mirror=False, out=terms["G"], accumulate=True, alpha=target.alpha)
        return terms

    def batch(self, inputs: InputRows, terms: dict[str, Tensor]) -> dict[str, tuple[Tensor, float]]:
        a = self._targets["A"]
        return self._to_fold({
            "A": input_gram(inputs, mirror=False, out=a.out, accumulate=a.accumulate,
                            alpha=a.alpha),
            "G": terms["G"],
        })

    def factor_rows(
        self, inputs: InputRows | None, terms: dict[str, Tensor], grads: Tensor | None
    ) -> FactorRows:
        return FactorRows(
            None if inputs is None else inputs.matrix,
            None if grads is None else lambda: grads.reshape(-1, grads.shape[-1]),
        )

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        a = self.A.value()
        return a, self.G.value(), torch.ones((), dtype=a.dtype, device=a.device)

    def named(self) -> dict[str, Tensor]:
        return {"A": self.A.value(), "G": self.G.value()}

    def running_sums(self) -> dict[str, RunningSum]:
        return {"A": self.A, "G": self.G}


class TKFACStatistics(FactorStatistics):
    """δ, Φ_raw and Ψ_raw (curvature scale), averaged undivided and divided when read."""

    matrices: ClassVar[frozenset[str]] = frozenset({"Phi_raw", "Psi_raw"})
    crosses_sides: ClassVar[bool] = True

    def __init__(self, weights: CurvatureWeights) -> None:
        super().__init__(weights)
        self.delta = weights.running()
        self.Phi_raw = weights.running(symmetric=True)
        self.Psi_raw = weights.running(symmetric=True)

    def output_terms(
        self, inputs: InputRows, grads: Tensor, terms: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        # Σ_k ‖g_{m,k}‖² and Σ_{m,k} ‖ā_m‖² g gᵀ; Φ_raw and δ need the former complete.
        psi = self._targets["Psi_raw"]
        rows_shape = grads.shape[1:-1]
        if terms is None:
            sq_in = inputs.squared_norms()  # ‖ā_m‖², [M]
            sq_out = sq_in.new_zeros(sq_in.shape)
            return {"sq_in": sq_in, "sq_out": sq_out,
                    "Psi_raw": output_gram(grads, sq_in.view(rows_shape), mirror=False,
                                           out=psi.out, accumulate=psi.accumulate,
                                           alpha=psi.alpha, norms=sq_out.view(rows_shape))}
        output_gram(grads, terms["sq_in"].view(rows_shape), mirror=False, out=terms["Psi_raw"],
                    accumulate=True, alpha=psi.alpha, norms=terms["sq_out"].view(rows_shape))
        return terms

    def batch(self, inputs: InputRows, terms: dict[str, Tensor]) -> dict[str, tuple[Tensor, float]]:
        phi = self._targets["Phi_raw"]
        return self._to_fold({
            "delta": self._scale * torch.dot(terms["sq_in"], terms["sq_out"]),
            "Phi_raw": input_gram(inputs, terms["sq_out"], mirror=False, out=phi.out,
                                  accumulate=phi.accumulate, alpha=phi.alpha),
            "Psi_raw": terms["Psi_raw"],
        })

    def factor_rows(
        self, inputs: InputRows | None, terms: dict[str, Tensor], grads: Tensor | None
    ) -> FactorRows:
        # Φ_raw ∝ Σ_m (Σ_k ‖g_{m,k}‖²) ā_m ā_mᵀ and Ψ_raw ∝ Σ_{m,k} ‖ā_m‖² g_{m,k} g_{m,k}ᵀ:
        # rows scaled by the roots of the other side's squared norms, kept from the terms.
        sq_in, sq_out = terms["sq_in"], terms["sq_out"]

        def input_rows(inputs: InputRows) -> Tensor:
            return inputs.matrix().mul_(sq_out.sqrt().unsqueeze(1))

        def output_rows(grads: Tensor) -> Tensor:
            norms = sq_in.sqrt().view(*grads.shape[1:-1], 1)
            return (grads * norms).reshape(-1, grads.shape[-1])

        return FactorRows(None if inputs is None else partial(input_rows, inputs),
                          None if grads is None else partial(output_rows, grads))

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.Phi_raw.value(), self.Psi_raw.value(), self.delta.value()

    def named(self) -> dict[str, Tensor]:
        delta = self.delta.value()
        # δ = 0 only when every row has ā = 0 or g = 0: the block is zero, and so are Φ and Ψ.
        safe = torch.where(delta > 0, delta, torch.ones_like(delta))
        return {
            "delta": delta,
            "Phi": self.Phi_raw.value() / safe,
            "Psi": self.Psi_raw.value() / safe,
            "Phi_raw": self.Phi_raw.value(),
            "Psi_raw": self.Psi_raw.value(),
        }

    def running_sums(self) -> dict[str, RunningSum]:
        return {"delta": self.delta, "Phi_raw": self.Phi_raw, "Psi_raw": self.Psi_raw}
