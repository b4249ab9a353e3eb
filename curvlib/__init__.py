"""curvlib: second-order curvature for PyTorch.

Exact partitioned derivative tensors (Wolinski, arXiv 2312.03885), the Kronecker-factored family
(K-FAC, EKFAC, TKFAC, TEKFAC), exact references (Hessian, GGN) and diagonal baselines, all behind
one interface, :class:`CurvatureEstimate`, consumed by :mod:`curvlib.optim` and
:mod:`curvlib.diagnostics`.
"""

from curvlib.diagnostics import DiagGGN, DiagHessian
from curvlib.estimate import CurvatureEstimate
from curvlib.exact import ExactGGN, ExactHessian
from curvlib.kron import EKFAC, KFAC, TEKFAC, TKFAC
from curvlib.partition import Partition
from curvlib.partitioned import PartitionedDerivatives, partitioned_derivatives

__all__ = [
    "EKFAC",
    "KFAC",
    "TEKFAC",
    "TKFAC",
    "CurvatureEstimate",
    "DiagGGN",
    "DiagHessian",
    "ExactGGN",
    "ExactHessian",
    "Partition",
    "PartitionedDerivatives",
    "partitioned_derivatives",
]
__version__ = "0.1.0"
