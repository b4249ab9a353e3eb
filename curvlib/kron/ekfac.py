"""EKFAC: eigenvalue-corrected K-FAC (George et al., NeurIPS 2018, arXiv 1806.03884).

K-FAC's eigenbasis Q = U_A ⊗ U_G is kept and its Kronecker eigenvalues s_G s_Aᵀ are replaced by
the Frobenius-optimal diagonal in that basis (kfac_family.md §2.4):

    C_layer ≈ Q diag(S*) Qᵀ,   S* = diag(Qᵀ F Q) = c Σ_{n,k} (U_Gᵀ U_{n,k} U_A)^{∘2},

with U_{n,k} = Σ_t g_{n,t,k} ā_{n,t}ᵀ the per-example gradients (positions summed before
squaring, squares summed over the K backpropagated vectors). With A, G and S* from the same data
as F: ‖F − C_EKFAC‖_F ≤ ‖F − C_KFAC‖_F and tr C_EKFAC = tr F (§4 I5). With ``weight_sharing=
"reduce"`` only the basis comes from the reduce factors; S* is always fit to the true per-example
gradients. S* is reset at every basis refresh and refit as described in
:mod:`curvlib.kron.base` (Algorithm 1 of the paper). Damping: exact Tikhonov,
V ↦ U_G [(U_Gᵀ V U_A) ⊘ (S* + λ)] U_Aᵀ.
"""

from __future__ import annotations

from typing import ClassVar

from curvlib.kron.base import KroneckerEstimate
from curvlib.kron.statistics import CurvatureWeights, FactorStatistics, KFACStatistics


class EKFAC(KroneckerEstimate):
    """EKFAC: K-FAC's eigenbasis with the diagonal re-fit from per-example gradients.

    Constructor arguments: :class:`~curvlib.kron.base.KroneckerEstimate`; ``solve`` uses exact
    Tikhonov damping.
    """

    refits_diagonal: ClassVar[bool] = True

    @staticmethod
    def _new_statistics(weights: CurvatureWeights) -> FactorStatistics:
        return KFACStatistics(weights)

    def _factor_names(self) -> tuple[str, str]:
        return ("A", "G")
