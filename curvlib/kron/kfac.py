"""K-FAC (Martens & Grosse 2015, arXiv 1503.05671), with KFC for convolutions (Grosse & Martens
2016, arXiv 1602.01407) and the expand/reduce flavours for weight sharing (Eschenhagen et al.
2023, arXiv 2311.00636).

Each layer's block of the curvature is approximated by one Kronecker product (kfac_family.md
§2.1–2.3), in the §1.5 scale (A a mean over rows, G carrying the reduction factor c):

    C_layer ≈ A ⊗ G (cvec),   i.e.  V ↦ G V A on the [W | b] matrix,
    expand:  A = (1/(N T)) Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ,   G = c Σ_{n,t,k} g_{n,t,k} g_{n,t,k}ᵀ,
    reduce:  A = (1/N) Σ_n ā̄_n ā̄_nᵀ (ā̄_n = mean_t ā_{n,t}),   G = c Σ_{n,k} ĝ_{n,k} ĝ_{n,k}ᵀ
             (ĝ_{n,k} = Σ_t g_{n,t,k}).

Damping (:meth:`KFAC.solve`):

* ``"tikhonov"`` (default): the exact (A ⊗ G + λI)⁻¹ through A = U_A diag(s_A) U_Aᵀ and
  G = U_G diag(s_G) U_Gᵀ: V ↦ U_G [(U_Gᵀ V U_A) ⊘ (s_G s_Aᵀ + λ)] U_Aᵀ;
* ``"pi"``: factored Tikhonov (Martens & Grosse §6.3), ((A + π√λ I) ⊗ (G + √λ/π I))⁻¹ with
  π = sqrt((tr A / dim A) / (tr G / dim G)); expanded it is A⊗G + λI + √λ(π I⊗G + π⁻¹ A⊗I), so
  λ keeps the meaning of the Tikhonov term. π = 1 when a factor has zero trace.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from curvlib.kron.base import KroneckerEstimate
from curvlib.kron.statistics import CurvatureWeights, FactorStatistics, KFACStatistics


class KFAC(KroneckerEstimate):
    """K-FAC / KFC: one Kronecker product A ⊗ G per layer (see the module docstring).

    Constructor arguments: :class:`~curvlib.kron.base.KroneckerEstimate`. ``solve`` accepts
    ``damping_mode="tikhonov"`` (exact) or ``"pi"`` (factored, π-balanced).
    """

    damping_modes: ClassVar[tuple[str, ...]] = ("tikhonov", "pi")

    @staticmethod
    def _new_statistics(weights: CurvatureWeights) -> FactorStatistics:
        return KFACStatistics(weights)

    def _factor_names(self) -> tuple[str, str]:
        return ("A", "G")

    def _damped_diagonals(self, damping: float, mode: str) -> dict[str, Tensor]:
        if mode == "tikhonov":
            return super()._damped_diagonals(damping, mode)
        root = math.sqrt(damping)
        out = {}
        for layer, basis in self._bases.items():
            mean_a = basis.values_in.mean()
            mean_g = basis.values_out.mean()
            pi = torch.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
            out[layer] = torch.outer(basis.values_out + root / pi, basis.values_in + root * pi)
        return out
