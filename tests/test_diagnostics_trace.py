"""trace_estimate: Hutchinson and Hutch++ reach the exact trace within their reported error."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import Tensor

from curvlib import DiagHessian, ExactGGN, ExactHessian
from curvlib.diagnostics import TraceEstimate, trace_estimate
from tests.cases import make_case


def decaying_matrix(size: int = 60, seed: int = 0) -> Tensor:
    """A symmetric matrix with eigenvalues 1/i² and random eigenvectors (Hutch++'s good case)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    values = 1.0 / torch.arange(1, size + 1, dtype=torch.float64) ** 2
    return (basis * values) @ basis.T


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_estimate_is_within_its_error_of_the_exact_trace(method: str) -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=4)
    estimate = ExactHessian(model, loss_fn)
    estimate.update(x, y)
    exact = float(torch.trace(estimate.to_dense()))
    # the Hessian has rank 33 < P = 39: Hutch++'s sketch of 10 columns leaves a residual
    result = trace_estimate(estimate, method, num_matvecs=30, seed=0, block_size=30)
    assert result.method == method and result.num_matvecs == 30
    assert result.standard_error > 0
    assert abs(result.value - exact) <= 4 * result.standard_error
    low, high = result.confidence_interval
    assert low < result.value < high
    assert math.isclose(high - result.value, result.value - low)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_confidence_intervals_cover_and_errors_shrink(method: str) -> None:
    matrix = decaying_matrix()
    exact = float(torch.trace(matrix))
    small = [trace_estimate(matrix, method, 12, seed=s) for s in range(40)]
    large = [trace_estimate(matrix, method, 120, seed=s) for s in range(10)]
    covered = sum(r.confidence_interval[0] <= exact <= r.confidence_interval[1] for r in small)
    assert covered >= 30  # nominal 95%; the t-interval is approximate for 4-12 terms
    for results in (small, large):
        assert all(abs(r.value - exact) <= 5 * r.standard_error for r in results)
    mean_error = [sum(abs(r.value - exact) for r in rs) / len(rs) for rs in (small, large)]
    assert mean_error[1] < 0.5 * mean_error[0]


def test_hutch_plus_plus_beats_hutchinson_on_a_decaying_spectrum() -> None:
    matrix = decaying_matrix()
    exact = float(torch.trace(matrix))
    errors = {method: sum(abs(trace_estimate(matrix, method, 60, seed=s).value - exact)
                          for s in range(10)) for method in ("hutchinson", "hutch++")}
    assert errors["hutch++"] < 0.3 * errors["hutchinson"]


def test_hutch_plus_plus_is_exact_when_the_sketch_spans_the_range() -> None:
    """A GGN of N·C = 6 rows has rank ≤ 6: a sketch of 10 columns captures all of it."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "sum", batch=2)
    estimate = ExactGGN(model, loss_fn)
    estimate.update(x, y)
    result = trace_estimate(estimate, "hutch++", num_matvecs=30)
    assert math.isclose(result.value, float(estimate.trace()), rel_tol=1e-12)
    assert result.standard_error < 1e-12
    assert abs(result.value - float(estimate.trace())) <= result.standard_error


def test_exact_path_uses_the_structure() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=3)
    estimate = DiagHessian(model, loss_fn)
    estimate.update(x, y)
    result = trace_estimate(estimate, exact=True)
    assert result == TraceEstimate(float(estimate.trace()), 0.0, (result.value, result.value),
                                   0.95, "exact", 0)
    assert float(result) == result.value
    matrix = decaying_matrix(10)
    assert math.isclose(trace_estimate(matrix, exact=True).value, float(torch.trace(matrix)))
    summary = result.to_dict()
    assert summary["method"] == "exact" and isinstance(summary["confidence_interval"], list)
    assert "exact" in str(result)


def test_progress_bar_can_be_turned_on_and_off(capsys: pytest.CaptureFixture[str]) -> None:
    matrix = decaying_matrix(5)
    trace_estimate(matrix, num_matvecs=4, progress=True)
    assert "trace (hutchinson)" in capsys.readouterr().err
    trace_estimate(matrix, num_matvecs=4, progress=False)
    trace_estimate(matrix, num_matvecs=4)  # default: only on a terminal, and pytest's is not
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="progress must be True, False or None"):
        trace_estimate(matrix, progress="yes")


def test_bad_arguments() -> None:
    matrix = decaying_matrix(5)
    with pytest.raises(ValueError, match="method must be one of"):
        trace_estimate(matrix, "xtrace")
    with pytest.raises(ValueError, match="num_matvecs must be an integer ≥ 2"):
        trace_estimate(matrix, "hutchinson", 1)
    with pytest.raises(ValueError, match="num_matvecs must be an integer ≥ 4"):
        trace_estimate(matrix, "hutch++", 3)
    with pytest.raises(ValueError, match="confidence"):
        trace_estimate(matrix, confidence=1.0)
    with pytest.raises(ValueError, match="block_size"):
        trace_estimate(matrix, block_size=0)
    with pytest.raises(ValueError, match="seed"):
        trace_estimate(matrix, seed=1.5)
    with pytest.raises(ValueError, match="exact=True needs a CurvatureEstimate"):
        trace_estimate(aslinearoperator(matrix.numpy()), exact=True)
