"""The curvature report of a model on one batch: per-layer learning rates, H̄, spectra, and how
well the Kronecker estimates approximate the exact GGN.

With one subset per layer (:meth:`~curvlib.Partition.by_module`) and the gradient u = ∇L as the
direction, Wolinski's partitioned derivatives (arXiv 2312.03885) give, in the sign convention
θ ← θ − Σ_s η_s u_s,

    g_s = ⟨∇_s L, u_s⟩ = ‖∇_s L‖²,   H̄_st = u_sᵀ ∇²L u_t,   D̄_sss = ∇³L[u^{(s)}, u^{(s)}, u^{(s)}],

the per-layer Newton rates η solving (H̄ + λI) η = g (the learning rate of each layer that
minimises the second-order model of the loss along the gradient) and the rates of the anisotropic
cubic step, which stay finite where H̄ is indefinite. The report adds the largest eigenvalues of
the exact GGN (Lanczos) and, when every layer is supported and the model is small enough, the
per-layer comparison of K-FAC, EKFAC, TKFAC and TEKFAC (type-2 Fisher, on the same batch) with the
exact GGN (:func:`curvlib.diagnostics.compare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlib import EKFAC, KFAC, TEKFAC, TKFAC, ExactGGN, Partition
from curvlib.diagnostics import ComparisonTable, compare, top_eigenvalues
from curvlib.partitioned.derivatives import partitioned_derivatives

KRONECKER = (KFAC, EKFAC, TKFAC, TEKFAC)
COMPARE_MAX_PARAMETERS = 2000
"""Above this many parameters the comparison is skipped, and said so: it materialises the exact
GGN column by column (P products over the batch), which takes minutes on a CPU beyond that."""
EIGENVALUE_TOL = 1e-2
"""Relative accuracy asked of Lanczos (ARPACK) for the GGN's top eigenvalues."""


@dataclass
class CurvatureReport:
    """What :func:`curvature_report` measured (all tensors float64 on the CPU).

    Attributes:
        names: the layers (subsets).
        sizes: parameters per layer.
        g, H, D: ḡ (S,), H̄ (S, S), diag D̄ (S,) along the gradient.
        newton_rates: η solving (H̄ + damping·I) η = ḡ, or None when that system is singular.
        cubic_rates: the anisotropic cubic step's η (λ_int = 1).
        damping: the damping of the Newton rates.
        ggn_eigenvalues: the largest eigenvalues of the exact GGN.
        comparisons: Kronecker estimates against the exact GGN (empty when skipped).
        notes: what was skipped and why.
    """

    names: list[str]
    sizes: list[int]
    g: Tensor
    H: Tensor
    D: Tensor
    newton_rates: Tensor | None
    cubic_rates: Tensor
    damping: float
    ggn_eigenvalues: Tensor
    comparisons: list[ComparisonTable]
    notes: list[str]


def curvature_report(
    model: nn.Module, loss_fn: nn.Module, inputs: Any, targets: Any, *, damping: float = 1e-3,
    eigenvalues: int = 5,
) -> CurvatureReport:
    """Measure the curvature of ``loss_fn(model(inputs), targets)`` (module docstring).

    Args:
        model: the model; one subset per module that owns parameters.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        inputs, targets: the batch.
        damping: λ of the Newton rates and of the comparison's preconditioned gradients.
        eigenvalues: how many of the GGN's largest eigenvalues to compute.
    """
    partition = Partition.by_module(model)
    loss = loss_fn(model(inputs), targets)
    gradient = list(torch.autograd.grad(loss, partition.parameters))
    pd = partitioned_derivatives(model, loss_fn, inputs, targets, gradient, partition, order=3)
    notes: list[str] = []
    try:
        newton: Tensor | None = pd.learning_rates(damping).detach().cpu().double()
    except ValueError as error:
        newton = None
        notes.append(f"Newton rates: {error}")
    ggn = ExactGGN(model, loss_fn, partition)
    ggn.update(inputs, targets)
    count = min(eigenvalues, partition.numel - 1)
    top = top_eigenvalues(ggn, k=count, tol=EIGENVALUE_TOL, progress=False).detach().cpu().double()
    comparisons = []
    if partition.numel > COMPARE_MAX_PARAMETERS:
        notes.append(f"Kronecker comparison skipped: P = {partition.numel} parameters > "
                     f"{COMPARE_MAX_PARAMETERS} (it materialises the P×P exact GGN).")
    else:
        try:
            estimates = [cls(model, loss_fn, fisher="type2") for cls in KRONECKER]
        except ValueError as error:  # a layer the Kronecker estimates do not cover
            notes.append(f"Kronecker comparison skipped: {error}")
        else:
            for estimate in estimates:
                estimate.update(inputs, targets)
                comparisons.append(compare(estimate, ggn, gradient=gradient, damping=damping))
    return CurvatureReport(
        names=list(partition.names), sizes=partition.sizes,
        g=pd.g.detach().cpu().double(), H=pd.H.detach().cpu().double(),
        D=pd.D.detach().cpu().double(), newton_rates=newton,
        cubic_rates=pd.cubic_step().detach().cpu().double(), damping=damping,
        ggn_eigenvalues=top, comparisons=comparisons, notes=notes,
    )
