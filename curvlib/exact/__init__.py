"""Exact curvature references: the Hessian and the generalized Gauss-Newton matrix."""

from curvlib.exact.ggn import ExactGGN
from curvlib.exact.hessian import ExactHessian

__all__ = ["ExactGGN", "ExactHessian"]
