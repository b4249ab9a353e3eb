"""TEKFAC: trace-restricted eigenvalue-corrected K-FAC (Gao et al., arXiv 2011.13609).

TKFAC's eigenbasis Q = Q_Φ ⊗ Q_Ψ (eigenvectors of Φ_raw and Ψ_raw, the same as those of Φ and Ψ)
with the Frobenius-optimal diagonal in it (kfac_family.md §2.6):

    C_layer ≈ Q diag(Θ) Qᵀ,   Θ = diag(Qᵀ F Q) = c Σ_{n,k} (Q_Ψᵀ U_{n,k} Q_Φ)^{∘2},

fit from per-example gradients exactly as EKFAC's S* (reset at every basis refresh; its reset
value δ λ_Ψ λ_Φᵀ reproduces TKFAC). ‖F − C_TEKFAC‖_F ≤ ‖F − C_TKFAC‖_F and tr C_TEKFAC = tr F.

Damping (:meth:`TEKFAC.solve`):

* ``"tikhonov"`` (default): Q diag(Θ + λ) Qᵀ, exact;
* ``"trace"``: the trace-relative damping of the paper (Eq. 3.5) with λ as a relative factor:
  every convolution layer l gets λ_l = λ · max(tr Θ_l, ϑ) / dim Θ_l (λ times its mean
  eigenvalue, floored by ``trace_floor`` ϑ), every other layer λ · β with
  β = max_l max(tr Θ_l, ϑ)/dim Θ_l over the convolutions (λ alone without convolutions).
  With λ = 1 the convolution damping is Eq. 3.5 verbatim; see docs/kron.md for the reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvlib.kron.base import KroneckerEstimate, WeightSharing
from curvlib.kron.collect import Type2Columns
from curvlib.kron.statistics import CurvatureWeights, FactorStatistics, TKFACStatistics
from curvlib.losses import FisherType


class TEKFAC(KroneckerEstimate):
    """TEKFAC: TKFAC's eigenbasis with the diagonal re-fit from per-example gradients.

    Arguments as :class:`~curvlib.kron.base.KroneckerEstimate`, plus ``trace_floor`` (ϑ ≥ 0),
    the floor on tr Θ_l of ``damping_mode="trace"``.
    """

    damping_modes: ClassVar[tuple[str, ...]] = ("tikhonov", "trace")
    refits_diagonal: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher: FisherType = "mc",
        mc_samples: int = 1,
        weight_sharing: WeightSharing = "expand",
        ema_decay: float | None = None,
        *,
        include: Sequence[nn.Module] | None = None,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
        trace_floor: float = 0.0,
        type2_columns: Type2Columns = "joint",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(model, loss_fn, fisher, mc_samples, weight_sharing, ema_decay,
                         include=include, dtype=dtype, seed=seed, type2_columns=type2_columns,
                         process_group=process_group)
        if not float(trace_floor) >= 0.0:
            raise ValueError(f"TEKFAC: trace_floor must be ≥ 0, got {trace_floor!r}.")
        self.trace_floor = float(trace_floor)

    @staticmethod
    def _new_statistics(weights: CurvatureWeights) -> FactorStatistics:
        return TKFACStatistics(weights)

    def _factor_names(self) -> tuple[str, str]:
        return ("Phi", "Psi")

    def _damped_diagonals(self, damping: float, mode: str) -> dict[str, Tensor]:
        if mode == "tikhonov":
            return super()._damped_diagonals(damping, mode)
        diagonals = {layer: self._diagonal(layer) for layer in self.layouts}
        relative = {
            layer: torch.clamp(diag.sum(), min=self.trace_floor) / diag.numel()
            for layer, diag in diagonals.items()
            if isinstance(self.modules[layer], nn.Conv1d | nn.Conv2d)
        }
        beta = max(relative.values(), key=float) if relative else 1.0
        return {
            layer: diag + damping * relative.get(layer, beta)
            for layer, diag in diagonals.items()
        }
