"""Stochastic and exact traces of a curvature operator: :func:`trace_estimate`.

**Hutchinson** (Hutchinson 1989, "A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines"). With Rademacher probes z (independent ±1 entries, E[z zᵀ] = I),
E[zᵀ C z] = tr C, so m products give the unbiased estimate

    t̂ = (1/m) Σ_i z_iᵀ C z_i,   standard error  s / √m,

s the sample standard deviation of the m terms; the variance of one term is 2 Σ_{i≠j} C_ij².

**Hutch++** (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal stochastic trace
estimation"). The top of the spectrum, which dominates Hutchinson's variance, is captured exactly:
with m products, k = ⌊m/3⌋ of them sketch the range, Q = orth(C S) for a P×k Rademacher S; k more
give tr(Qᵀ C Q) exactly; the remaining m − 2k estimate what is left with Hutchinson on the
deflated operator:

    t̂ = tr(Qᵀ C Q) + (1/(m−2k)) Σ_i g_iᵀ (I − QQᵀ) C (I − QQᵀ) g_i.

Given Q the first term is exact and the second unbiased for tr((I − QQᵀ) C (I − QQᵀ)), and the two
add to tr C (the cross terms vanish under the trace), so the standard error reported is the
residual terms' s / √(m − 2k) — conditional on the sketch — and never less than the rounding
level eps·P·|t̂| (reached when the sketch spans the range of C). Its error decays like 1/m instead of
1/√m for operators with a decaying spectrum.

**Confidence interval.** t̂ ± q·SE with q the Student-t quantile with (terms − 1) degrees of
freedom: the central limit theorem applied to the probe terms, approximate for few probes.

**Exact** (``exact=True``): ``estimate.trace()``, which uses the estimate's structure (the sum of
the Kronecker eigenbasis diagonals, of a diagonal, ...), or the trace of a dense tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import t as student_t
from torch import Tensor
from tqdm.auto import tqdm

from curvlib.diagnostics.operand import (
    Operand,
    SymmetricOperand,
    as_operand,
    check_positive_int,
    check_seed,
    make_generator,
    rademacher,
)
from curvlib.diagnostics.progress import progress_bar

METHODS: tuple[str, ...] = ("hutchinson", "hutch++")


@dataclass(frozen=True)
class TraceEstimate:
    """An estimate of tr C with its uncertainty.

    Attributes:
        value: the estimate t̂.
        standard_error: the standard error of t̂ (0 for an exact trace).
        confidence_interval: (low, high) at level ``confidence``.
        confidence: the level of the interval, e.g. 0.95.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"exact"``.
        num_matvecs: the products C v it took (Hutch++ needs fewer than its budget when the
            sketch already spans all P dimensions).
    """

    value: float
    standard_error: float
    confidence_interval: tuple[float, float]
    confidence: float
    method: str
    num_matvecs: int

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        low, high = self.confidence_interval
        return (f"tr ≈ {self.value:.6g} ± {self.standard_error:.2g} (SE; "
                f"{100 * self.confidence:g}% CI [{low:.6g}, {high:.6g}], {self.method}, "
                f"{self.num_matvecs} matvecs)")

    def to_dict(self) -> dict[str, float | str | int | list[float]]:
        """Plain Python values (JSON-ready)."""
        return {
            "value": self.value,
            "standard_error": self.standard_error,
            "confidence_interval": list(self.confidence_interval),
            "confidence": self.confidence,
            "method": self.method,
            "num_matvecs": self.num_matvecs,
        }


def _quadratic_forms(operand: SymmetricOperand, probes: Tensor, block_size: int,
                     bar: tqdm) -> Tensor:
    """zᵀ C z for every column z of ``probes``, ``block_size`` products at a time."""
    terms = []
    for start in range(0, probes.shape[1], block_size):
        block = probes[:, start : start + block_size]
        terms.append((block * operand.matmat(block)).sum(dim=0))
        bar.update(block.shape[1])
    return torch.cat(terms)


def _summary(value: float, terms: Tensor, confidence: float, method: str,
             operand: SymmetricOperand) -> TraceEstimate:
    count = terms.numel()
    # when Hutch++'s sketch spans the range the residual terms are rounding noise: the error is
    # then rounding in the products and sums, of the order eps·P·|t̂|, not their tiny spread
    rounding = torch.finfo(operand.dtype).eps * operand.size * abs(value)
    error = max(float(terms.std(unbiased=True)) / math.sqrt(count), rounding)
    half = float(student_t.ppf(0.5 + confidence / 2, df=count - 1)) * error
    return TraceEstimate(value, error, (value - half, value + half), confidence, method,
                         operand.num_matvecs)


def trace_estimate(
    estimate_or_operator: Operand,
    method: str = "hutchinson",
    num_matvecs: int = 100,
    seed: int | None = 0,
    *,
    exact: bool = False,
    confidence: float = 0.95,
    block_size: int = 64,
    progress: bool | None = None,
) -> TraceEstimate:
    """Estimate tr C by Hutchinson or Hutch++, or read it exactly (see the module docstring).

    Args:
        estimate_or_operator: a :class:`~curvlib.CurvatureEstimate`, a SciPy ``LinearOperator``
            or a dense symmetric tensor.
        method: ``"hutchinson"`` or ``"hutch++"``.
        num_matvecs: the budget of products C v (≥ 2 for Hutchinson, ≥ 4 for Hutch++).
        seed: seeds the probes (``None``: fresh randomness).
        exact: return the exact trace (``estimate.trace()``; a dense tensor's trace) instead.
        confidence: level of the confidence interval, in (0, 1).
        block_size: products applied at once (memory: P × block_size probe entries).
        progress: a progress bar over the products (``None``: only on a terminal).

    Raises:
        ValueError: unknown method, too small a budget, bad confidence, block size or seed, or
            ``exact=True`` for a bare ``LinearOperator``.
    """
    operand = as_operand(estimate_or_operator)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    num_matvecs = check_positive_int(num_matvecs, "num_matvecs",
                                     minimum=2 if method == "hutchinson" else 4)
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    block_size = check_positive_int(block_size, "block_size")
    generator = make_generator(check_seed(seed))
    if exact:
        if operand.estimate is not None:
            value = float(operand.estimate.trace())
        elif operand.dense is not None:
            value = float(torch.trace(operand.dense))
        else:
            raise ValueError("exact=True needs a CurvatureEstimate or a dense tensor; a "
                             "LinearOperator has no exact trace here.")
        return TraceEstimate(value, 0.0, (value, value), float(confidence), "exact", 0)

    size, dtype, device = operand.size, operand.dtype, operand.device
    with progress_bar(num_matvecs, f"trace ({method})", progress, unit="matvec") as bar:
        if method == "hutchinson":
            probes = rademacher(size, num_matvecs, generator, dtype, device)
            terms = _quadratic_forms(operand, probes, block_size, bar)
            return _summary(float(terms.mean()), terms, float(confidence), method, operand)
        rank = num_matvecs // 3
        sketch = rademacher(size, rank, generator, dtype, device)
        products = torch.cat([operand.matmat(sketch[:, i : i + block_size])
                              for i in range(0, rank, block_size)], dim=1)
        bar.update(rank)
        basis, _ = torch.linalg.qr(products)  # orthonormal, even if C S is rank-deficient
        low_rank = float(_quadratic_forms(operand, basis, block_size, bar).sum())
        probes = rademacher(size, num_matvecs - 2 * rank, generator, dtype, device)
        probes = probes - basis @ (basis.T @ probes)  # (I − QQᵀ) g
        terms = _quadratic_forms(operand, probes, block_size, bar)
    return _summary(low_rank + float(terms.mean()), terms, float(confidence), method, operand)
