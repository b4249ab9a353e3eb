"""Kronecker-factored curvature: K-FAC (with KFC and expand/reduce), EKFAC, TKFAC and TEKFAC.

All four are :class:`~curvlib.CurvatureEstimate` s over :meth:`~curvlib.Partition.by_module` of
the covered ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers, sharing one protocol
(:mod:`curvlib.kron.base`); the math, conventions and derivations are in docs/kron.md.
"""

from curvlib.kron.base import KroneckerEstimate
from curvlib.kron.ekfac import EKFAC
from curvlib.kron.kfac import KFAC
from curvlib.kron.tekfac import TEKFAC
from curvlib.kron.tkfac import TKFAC

__all__ = ["EKFAC", "KFAC", "TEKFAC", "TKFAC", "KroneckerEstimate"]
