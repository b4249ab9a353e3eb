"""TKFAC: trace-restricted K-FAC (Gao et al., AAAI 2021, arXiv 2011.10741).

Per layer, with Λ = ā āᵀ and Γ = Σ_k g_k g_kᵀ per row (kfac_family.md §2.5; derivation in
docs/kron.md):

    F = c Σ_rows Λ ⊗ Γ ≈ Φ_raw ⊗ Ψ_raw / δ = δ Φ ⊗ Ψ,
    δ = c Σ tr Λ · tr Γ,   Φ_raw = c Σ tr Γ · Λ,   Ψ_raw = c Σ tr Λ · Γ,

which equals (tr_G F) ⊗ (tr_A F) / tr F: it preserves the trace and both partial traces of F,
and is exact whenever F is one Kronecker product. Rows are examples (T = 1); with weight
sharing they are the (example, position) pairs under ``"expand"`` — F is then the
position-decoupled Fisher that KFC approximates, with positions *summed* (not averaged), so that
tr C_TKFAC equals its trace — or the examples with mean inputs and summed gradients under
``"reduce"``. δ, Φ_raw, Ψ_raw are averaged undivided and divided when read (pitfall P10).

Damping (:meth:`TKFAC.solve`):

* ``"tikhonov"`` (default): exact (δ Φ ⊗ Ψ + λI)⁻¹ through the eigendecompositions of Φ_raw and
  Ψ_raw (those of Φ and Ψ up to the factor δ);
* ``"symmetric"``: the paper's split (Eq. 5.14–5.15), ((√δ Φ + √λ I) ⊗ (√δ Ψ + √λ I))⁻¹, whose
  expansion is δ Φ⊗Ψ + λI + √(λδ)(Φ⊗I + I⊗Ψ).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from curvlib.kron.base import KroneckerEstimate
from curvlib.kron.statistics import CurvatureWeights, FactorStatistics, TKFACStatistics


class TKFAC(KroneckerEstimate):
    """TKFAC: δ Φ ⊗ Ψ per layer (see the module docstring).

    Constructor arguments: :class:`~curvlib.kron.base.KroneckerEstimate`. ``solve`` accepts
    ``damping_mode="tikhonov"`` (exact) or ``"symmetric"`` (the paper's √δ split).
    """

    damping_modes: ClassVar[tuple[str, ...]] = ("tikhonov", "symmetric")

    @staticmethod
    def _new_statistics(weights: CurvatureWeights) -> FactorStatistics:
        return TKFACStatistics(weights)

    def _factor_names(self) -> tuple[str, str]:
        return ("Phi", "Psi")

    def _damped_diagonals(self, damping: float, mode: str) -> dict[str, Tensor]:
        if mode == "tikhonov":
            return super()._damped_diagonals(damping, mode)
        root = math.sqrt(damping)
        out = {}
        for layer, basis in self._bases.items():
            scale = torch.sqrt(basis.safe_divisor())  # eig(√δ Φ) = eig(Φ_raw)/√δ
            out[layer] = torch.outer(basis.values_out / scale + root,
                                     basis.values_in / scale + root)
        return out
