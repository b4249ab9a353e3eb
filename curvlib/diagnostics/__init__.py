"""Diagnostics of curvature estimates: spectra, traces, densities, comparisons, plots.

Every function takes any :class:`~curvlib.CurvatureEstimate` (or, where it makes sense, a SciPy
``LinearOperator`` or a dense symmetric tensor):

* :func:`top_eigenvalues` — Lanczos (ARPACK), or exact from the structure of Kronecker and
  diagonal estimates;
* :func:`trace_estimate` — Hutchinson / Hutch++ with standard errors, or the exact trace;
* :func:`spectral_density` — stochastic Lanczos quadrature;
* :func:`compare` — an approximation against a reference, per block and overall;
* plots (matplotlib): :func:`plot_reduced_matrix`, :func:`plot_spectrum`,
  :func:`plot_comparison`, :func:`plot_learning_rates`.

The diagonal estimates :class:`DiagGGN` and :class:`DiagHessian` live here and are exported from
:mod:`curvlib` as well. Long loops show a tqdm progress bar (``progress=True``/``False``; by
default only on a terminal).
"""

from curvlib.diagnostics.compare import ComparisonRow, ComparisonTable, compare
from curvlib.diagnostics.density import SpectralDensity, spectral_density
from curvlib.diagnostics.diagonal import DiagGGN, DiagHessian, DiagonalEstimate
from curvlib.diagnostics.plots import (
    plot_comparison,
    plot_learning_rates,
    plot_reduced_matrix,
    plot_spectrum,
)
from curvlib.diagnostics.spectrum import top_eigenvalues
from curvlib.diagnostics.trace import TraceEstimate, trace_estimate

__all__ = [
    "ComparisonRow",
    "ComparisonTable",
    "DiagGGN",
    "DiagHessian",
    "DiagonalEstimate",
    "SpectralDensity",
    "TraceEstimate",
    "compare",
    "plot_comparison",
    "plot_learning_rates",
    "plot_reduced_matrix",
    "plot_spectrum",
    "spectral_density",
    "top_eigenvalues",
    "trace_estimate",
]
