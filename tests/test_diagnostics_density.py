"""spectral_density: SLQ densities integrate to one and their moments match tr(C^k)/P."""

from __future__ import annotations

import math

import pytest
import torch

from curvlib import ExactGGN, ExactHessian
from curvlib.diagnostics import SpectralDensity, spectral_density
from tests.cases import make_case


@pytest.mark.parametrize("estimate_cls", [ExactHessian, ExactGGN])
def test_density_integrates_to_one_and_moments_match_traces(estimate_cls) -> None:
    """The GGN here has rank ≤ N·(C − 1) = 8 < 20 steps: Lanczos breaks down and restarts."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=4)
    estimate = estimate_cls(model, loss_fn)
    estimate.update(x, y)
    dense = estimate.to_dense()
    size = dense.shape[0]
    probes = 30
    result = spectral_density(estimate, num_probes=probes, lanczos_steps=20)
    assert result.nodes.shape == result.weights.shape == (probes, 20)
    assert result.num_matvecs == probes * 20 and result.size == size
    assert torch.allclose(result.weights.sum(dim=1), torch.ones(probes, dtype=torch.float64))
    assert math.isclose(result.integral(), 1.0, abs_tol=1e-5)
    power = torch.eye(size, dtype=torch.float64)
    for k in range(1, 5):
        power = power @ dense
        exact = float(torch.trace(power)) / size
        standard_error = float(result.probe_moments(k).std()) / math.sqrt(probes)
        assert abs(result.moment(k) - exact) <= 4 * standard_error, k


def test_gauss_quadrature_is_exact_for_a_diagonal_operator() -> None:
    """For C = Diag(d) and Rademacher v = z/√P, vᵀ C^k v = Σ d^k / P for every probe, and the
    m-step rule is exact for k ≤ 2m − 1."""
    diagonal = torch.linspace(-1.0, 3.0, 25, dtype=torch.float64) ** 3
    steps = 4
    result = spectral_density(torch.diag(diagonal), num_probes=3, lanczos_steps=steps, seed=5)
    for k in range(2 * steps):
        expected = torch.full((3,), float((diagonal**k).mean()), dtype=torch.float64)
        assert torch.allclose(result.probe_moments(k), expected, rtol=1e-10, atol=1e-12), k


def test_smoothing_adds_the_kernels_moments() -> None:
    """∫ t φ_σ = Σ w θ and ∫ t² φ_σ = Σ w θ² + σ² (a unit-mass Gaussian of variance σ²)."""
    torch.manual_seed(0)
    factor = torch.randn(12, 12, dtype=torch.float64)
    matrix = factor @ factor.T / 12
    result = spectral_density(matrix, num_probes=4, lanczos_steps=12, grid=4000, sigma=0.05)
    first = float(torch.trapezoid(result.grid * result.density, result.grid))
    second = float(torch.trapezoid(result.grid**2 * result.density, result.grid))
    assert math.isclose(first, result.moment(1), rel_tol=1e-6)
    assert math.isclose(second, result.moment(2) + 0.05**2, rel_tol=1e-6)
    assert result.sigma == 0.05 and isinstance(result, SpectralDensity)


def test_steps_are_capped_at_the_dimension_and_a_grid_can_be_given() -> None:
    matrix = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    grid = torch.linspace(0.0, 5.0, 2001, dtype=torch.float64)
    result = spectral_density(matrix, num_probes=2, lanczos_steps=50, grid=grid, sigma=0.1)
    assert result.nodes.shape == (2, 3)
    assert torch.equal(result.grid, grid)
    assert torch.allclose(result.nodes.sort(dim=1).values,
                          torch.tensor([[1.0, 2.0, 4.0]] * 2, dtype=torch.float64))
    # three equal-weight spikes: the density at each is 1/(3 σ √(2π))
    peak = 1.0 / (3 * 0.1 * math.sqrt(2 * math.pi))
    at_two = float(result.density[torch.argmin((grid - 2.0).abs())])
    assert math.isclose(at_two, peak, rel_tol=1e-3)


def test_bad_arguments() -> None:
    matrix = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_probes"):
        spectral_density(matrix, num_probes=0)
    with pytest.raises(ValueError, match="lanczos_steps"):
        spectral_density(matrix, lanczos_steps=-2)
    with pytest.raises(ValueError, match="grid must be a 1-D increasing"):
        spectral_density(matrix, grid=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="grid must be an integer"):
        spectral_density(matrix, grid=1)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(matrix, sigma=0.0)
    with pytest.raises(ValueError, match="power"):
        spectral_density(matrix, num_probes=1).probe_moments(-1)
