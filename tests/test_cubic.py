"""Tests of the anisotropic cubic step (``curvlib.partitioned.cubic``; Wolinski, arXiv 2312.03885,
``research/wolinski.md`` §3.3-3.4).

The oracle is independent of the solver: the model T(η) = −gᵀη + ½ηᵀHη + (λ/6)‖Dη‖³ is minimised by
multi-start BFGS (and, for S ≤ 2, a dense grid polished by BFGS), and the returned step must reach
the best value found. Optimality is also checked through the global-minimiser conditions of the
cubic model (Nesterov & Polyak 2006, Thm. 10): (H + c r D²) η = g and H + c r D² ⪰ 0, c = λ/2,
r = ‖Dη‖.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from curvlib.partitioned.cubic import CubicStepResult, solve_cubic_step

Instance = tuple[np.ndarray, np.ndarray, np.ndarray, float]


# ----------------------------------------------------------------------------- the model, oracles
def model(eta: np.ndarray, g: np.ndarray, H: np.ndarray, d: np.ndarray, lam: float) -> float:
    """T(η) = −gᵀη + ½ηᵀHη + (λ/6)‖Dη‖³."""
    return float(-g @ eta + 0.5 * eta @ H @ eta + lam / 6 * np.linalg.norm(d * eta) ** 3)


def model_grad(
    eta: np.ndarray, g: np.ndarray, H: np.ndarray, d: np.ndarray, lam: float
) -> np.ndarray:
    """∇T(η) = −g + Hη + (λ/2)‖Dη‖ D²η."""
    return -g + H @ eta + lam / 2 * np.linalg.norm(d * eta) * d**2 * eta


def solve(
    g: np.ndarray, H: np.ndarray, d: np.ndarray, lam: float, **kwargs: float
) -> CubicStepResult:
    """solve_cubic_step on NumPy data."""
    return solve_cubic_step(torch.tensor(g), torch.tensor(H), torch.tensor(d), lam, **kwargs)


def a_priori_radius(g: np.ndarray, H: np.ndarray, d: np.ndarray, lam: float) -> float:
    """A bound on ‖Dη‖ over {T ≤ T(0) = 0} for d > 0, from the data only: in z = Dη,
    T ≥ −‖D⁻¹g‖ρ + ½κ_min ρ² + (λ/6)ρ³ with ρ = ‖z‖ and κ_min = λ_min(D⁻¹HD⁻¹)."""
    kappa_min = np.linalg.eigvalsh(H / np.outer(d, d))[0]
    w = np.linalg.norm(g / d)
    a, b = lam / 6, kappa_min / 2  # positive root of aρ² + bρ − w = 0
    return (-b + math.sqrt(b * b + 4 * a * w)) / (2 * a)


def brute_force_minimum(
    g: np.ndarray,
    H: np.ndarray,
    d: np.ndarray,
    lam: float,
    scale: float,
    seed: int,
    starts: int = 6,
) -> float:
    """The lowest T found by BFGS from η = 0 and from random points of norm up to ~2·scale (in Dη
    where d > 0)."""
    rng = np.random.default_rng(seed)
    size = g.shape[0]
    safe_d = np.where(d > 0, d, 1.0)
    best = model(np.zeros(size), g, H, d, lam)
    for k in range(starts):
        direction = rng.normal(size=size)
        direction *= scale * rng.uniform(0.05, 2.0) / np.linalg.norm(direction)
        start = np.zeros(size) if k == 0 else direction / safe_d
        found = scipy.optimize.minimize(
            model,
            start,
            args=(g, H, d, lam),
            jac=model_grad,
            method="BFGS",
            options={"gtol": 1e-10},
        )
        best = min(best, float(found.fun))
    return best


def norm(x: np.ndarray) -> float:
    """Euclidean norm that does not overflow in the squares (for the extreme-magnitude tests)."""
    return math.hypot(*np.ravel(x).tolist())


def model_scale(g: np.ndarray, H: np.ndarray, d: np.ndarray, lam: float, eta: np.ndarray) -> float:
    """The size of the terms of T at η: a scale for absolute tolerances on T."""
    size = np.linalg.norm(eta)
    return float(
        np.linalg.norm(g) * size
        + np.linalg.norm(H, 2) * size**2
        + lam * np.linalg.norm(d * eta) ** 3
        + 1e-300
    )


def assert_global_conditions(
    result: CubicStepResult, g: np.ndarray, H: np.ndarray, d: np.ndarray, lam: float
) -> None:
    """(H + c r D²)η = g and H + c r D² ⪰ 0, with r = ‖Dη‖ = result.radius."""
    assert result.success, result.message
    eta = result.eta.numpy()
    assert result.eta.dtype == torch.float64 and eta.shape == g.shape
    assert np.isfinite(eta).all()
    c, r = lam / 2, norm(d * eta)
    assert result.radius == pytest.approx(r, rel=1e-12, abs=1e-300)
    shifted = H + c * r * np.diag(d**2)
    residual = norm(shifted @ eta - g)
    size = np.linalg.norm(H, 2) * norm(eta) + c * r * norm(d**2 * eta)
    assert residual <= 1e-9 * (size + norm(g)), (residual, result.case)
    if (d > 0).all():
        # The invariant form D⁻¹(H + c r D²)D⁻¹ = K + c r I is the well-conditioned one to test.
        scaled = shifted / np.outer(d, d)
        lowest = np.linalg.eigvalsh(scaled)[0]
        assert lowest >= -1e-9 * np.abs(np.linalg.eigvalsh(scaled)).max(), lowest
    else:
        lowest = np.linalg.eigvalsh(shifted)[0]
        assert lowest >= -1e-9 * np.linalg.norm(shifted, 2), lowest


# ----------------------------------------------------------------------------- instances
def random_instance(seed: int) -> Instance:
    """S = 1..8 cycling with seed; H PSD, indefinite, negative semi-definite, low-rank PSD, or
    indefinite with d spread over six decades."""
    rng = np.random.default_rng(seed)
    size = 1 + seed % 8
    kind = (seed // 8) % 5
    A = rng.normal(size=(size, size))
    d = np.exp(rng.uniform(-1.5, 1.5, size))
    if kind == 0:
        H = A @ A.T / size
    elif kind == 1:
        H = (A + A.T) / 2
    elif kind == 2:
        H = -A @ A.T / size
    elif kind == 3:
        B = rng.normal(size=(size, max(1, size // 2)))
        H = B @ B.T
    else:
        H = (A + A.T) / 2
        d = 10.0 ** rng.uniform(-3, 3, size)
        H = H * np.outer(d, d)  # keeps D⁻¹HD⁻¹ of order one, as real scales would
    g = rng.normal(size=size) * d * 10.0 ** rng.uniform(-2, 1)
    lam = float(rng.choice([0.1, 1.0, 10.0]))
    return g, H, d, lam


def hard_instance(seed: int, multiplicity: int) -> tuple[Instance, float]:
    """An explicit hard case: K = D⁻¹HD⁻¹ indefinite with a κ₁-eigenspace of the given multiplicity,
    b = QᵀD⁻¹g with no component on it, and ‖b_R/(κ_R − κ₁)‖ < r₀ = −κ₁/c. Returns r₀ too."""
    rng = np.random.default_rng(1000 + seed)
    size = int(rng.integers(multiplicity + 1, 7))
    k1 = -rng.uniform(0.5, 2.0)
    kappa = np.concatenate(
        [np.full(multiplicity, k1), k1 + rng.uniform(0.5, 3.0, size - multiplicity)]
    )
    Q, _ = np.linalg.qr(rng.normal(size=(size, size)))
    lam = float(rng.choice([0.5, 1.0, 4.0]))
    r0 = -k1 / (lam / 2)
    b = np.zeros(size)
    b[multiplicity:] = rng.normal(size=size - multiplicity)
    pseudo = np.linalg.norm(b[multiplicity:] / (kappa[multiplicity:] - k1))
    b *= rng.uniform(0.0, 0.9) * r0 / pseudo
    d = np.exp(rng.uniform(-1.0, 1.0, size))
    H = np.outer(d, d) * (Q @ np.diag(kappa) @ Q.T)
    return (d * (Q @ b), H, d, lam), r0


# ----------------------------------------------------------------------------- global minimiser
@pytest.mark.parametrize("seed", range(240))
def test_random_instances_are_global_minimisers(seed: int) -> None:
    g, H, d, lam = random_instance(seed)
    result = solve(g, H, d, lam)
    assert result.case in ("interior", "hard"), result.message
    assert_global_conditions(result, g, H, d, lam)
    eta = result.eta.numpy()
    best = brute_force_minimum(g, H, d, lam, a_priori_radius(g, H, d, lam), seed)
    assert model(eta, g, H, d, lam) <= best + 1e-10 * model_scale(g, H, d, lam, eta)


@pytest.mark.parametrize("seed", range(40))
def test_dense_grid_for_one_and_two_subsets(seed: int) -> None:
    """For S ≤ 2 the box ‖Dη‖_∞ ≤ (a-priori radius) is gridded densely and the best grid point
    polished by BFGS. The step must be at least as good."""
    rng = np.random.default_rng(500 + seed)
    size = 1 + seed % 2
    A = rng.normal(size=(size, size))
    H = (A + A.T) / 2 if seed % 4 < 2 else A @ A.T
    d = np.exp(rng.uniform(-1, 1, size))
    g = rng.normal(size=size)
    lam = float(rng.choice([0.2, 1.0, 5.0]))
    radius = a_priori_radius(g, H, d, lam)
    axis = np.linspace(-radius, radius, 2001 if size == 1 else 401)
    z = np.stack(np.meshgrid(*([axis] * size), indexing="ij"), axis=-1).reshape(-1, size)
    etas = z / d
    values = -etas @ g + 0.5 * np.einsum("ni,ij,nj->n", etas, H, etas)
    values += lam / 6 * np.linalg.norm(z, axis=1) ** 3
    start = etas[np.argmin(values)]
    polished = scipy.optimize.minimize(
        model, start, args=(g, H, d, lam), jac=model_grad, method="BFGS", options={"gtol": 1e-10}
    )
    result = solve(g, H, d, lam)
    assert_global_conditions(result, g, H, d, lam)
    eta = result.eta.numpy()
    tol = 1e-10 * model_scale(g, H, d, lam, eta)
    assert model(eta, g, H, d, lam) <= min(values.min(), polished.fun) + tol


# ----------------------------------------------------------------------------- hard case
@pytest.mark.parametrize("multiplicity", [1, 2])
@pytest.mark.parametrize("seed", range(12))
def test_hard_case(seed: int, multiplicity: int) -> None:
    (g, H, d, lam), r0 = hard_instance(seed, multiplicity)
    result = solve(g, H, d, lam)
    assert result.case == "hard", result.message
    assert result.radius == pytest.approx(r0, rel=1e-10)
    assert_global_conditions(result, g, H, d, lam)
    eta = result.eta.numpy()
    best = brute_force_minimum(g, H, d, lam, a_priori_radius(g, H, d, lam), seed)
    assert model(eta, g, H, d, lam) <= best + 1e-10 * model_scale(g, H, d, lam, eta)


@pytest.mark.parametrize("leak", [1e-4, 1e-8, 1e-12, 1e-15])
def test_near_hard_case(leak: float) -> None:
    """A tiny component of b on the κ₁-eigenvector: the secular root sits next to the pole, and the
    step must still be the global minimiser (continuity with the hard case)."""
    (g, H, d, lam), r0 = hard_instance(3, 1)
    _, eigvecs = np.linalg.eigh(H / np.outer(d, d))
    g = g + leak * np.linalg.norm(g) * d * eigvecs[:, 0]
    result = solve(g, H, d, lam)
    assert result.case in ("interior", "hard"), result.message
    assert result.radius == pytest.approx(r0, rel=1e-3)
    assert_global_conditions(result, g, H, d, lam)
    eta = result.eta.numpy()
    best = brute_force_minimum(g, H, d, lam, a_priori_radius(g, H, d, lam), 0)
    assert model(eta, g, H, d, lam) <= best + 1e-10 * model_scale(g, H, d, lam, eta)


def test_zero_gradient() -> None:
    """g = 0: η = 0 when H ⪰ 0; otherwise a global minimiser of norm r₀ = −κ₁/c along the lowest
    eigenvector, with T = κ₁³/(6c²)."""
    rng = np.random.default_rng(7)
    A = rng.normal(size=(4, 4))
    d = np.exp(rng.uniform(-1, 1, 4))
    g = np.zeros(4)
    psd = solve(g, H=A @ A.T, d=d, lam=1.0)
    assert psd.success and psd.radius == 0.0 and torch.all(psd.eta == 0)

    H = (A + A.T) / 2
    k1 = np.linalg.eigvalsh(H / np.outer(d, d))[0]
    assert k1 < 0
    lam = 2.0
    result = solve(g, H, d, lam)
    assert result.case == "hard"
    assert result.radius == pytest.approx(-k1 / (lam / 2), rel=1e-12)
    assert model(result.eta.numpy(), g, H, d, lam) == pytest.approx(k1**3 / (6 * (lam / 2) ** 2))
    assert_global_conditions(result, g, H, d, lam)


# ----------------------------------------------------------------------------- zero scales
def schur_instance(seed: int) -> Instance:
    """d with 1..S−1 exact zeros (set Z), H_ZZ ≻ 0, the rest of H arbitrary (often indefinite)."""
    rng = np.random.default_rng(2000 + seed)
    size = int(rng.integers(2, 7))
    zero = rng.permutation(size)[: int(rng.integers(1, size))]
    A = rng.normal(size=(size, size))
    H = (A + A.T) / 2
    B = rng.normal(size=(len(zero), len(zero)))
    H[np.ix_(zero, zero)] = B @ B.T + 0.1 * np.eye(len(zero))
    d = np.exp(rng.uniform(-1, 1, size))
    d[zero] = 0.0
    return rng.normal(size=size), H, d, float(rng.choice([0.3, 1.0, 3.0]))


@pytest.mark.parametrize("seed", range(40))
def test_zero_scales_schur_path(seed: int) -> None:
    g, H, d, lam = schur_instance(seed)
    result = solve(g, H, d, lam)
    assert result.case in ("interior", "hard"), result.message
    assert_global_conditions(result, g, H, d, lam)
    eta = result.eta.numpy()
    scale = 2 * np.linalg.norm(eta) + np.linalg.norm(g) / np.linalg.norm(H, 2)
    best = brute_force_minimum(g, H, d, lam, scale, seed, starts=10)
    assert model(eta, g, H, d, lam) <= best + 1e-10 * model_scale(g, H, d, lam, eta)


def test_unbounded_when_zero_block_is_not_positive_definite() -> None:
    """H_ZZ with a negative eigenvalue v: T(τ v) → −∞ on Z, so there is no step."""
    g = np.array([1.0, -2.0, 0.5])
    H = np.array([[2.0, 0.3, 0.1], [0.3, -1.0, 0.2], [0.1, 0.2, 1.0]])
    d = np.array([1.0, 0.0, 0.0])
    result = solve(g, H, d, 1.0)
    assert (
        not result.success
        and result.case == "unbounded"
        and "not positive definite" in result.message
    )
    assert torch.all(result.eta == 0) and result.radius == 0.0
    direction = np.array([0.0, 1.0, 0.0])
    assert model(1e6 * direction, g, H, d, 1.0) < -1e11  # really unbounded below

    singular = H.copy()
    singular[1, 1] = 0.0  # H_ZZ ⪰ 0 but singular: no unique minimiser either
    assert solve(g, singular, d, 1.0).case == "unbounded"


def test_all_zero_scales() -> None:
    rng = np.random.default_rng(3)
    A = rng.normal(size=(3, 3))
    g = rng.normal(size=3)
    H = A @ A.T + np.eye(3)
    newton = solve(g, H, np.zeros(3), 1.0)
    assert newton.success and newton.case == "newton" and newton.radius == 0.0
    np.testing.assert_allclose(newton.eta.numpy(), np.linalg.solve(H, g), rtol=1e-12)

    unbounded = solve(g, (A + A.T) / 2 - 5 * np.eye(3), np.zeros(3), 1.0)
    assert not unbounded.success and unbounded.case == "unbounded"
    assert torch.all(unbounded.eta == 0) and not torch.isnan(unbounded.eta).any()


def test_zero_tol_is_relative() -> None:
    """Entries ≤ zero_tol·max(d) join Z and give the same step as exact zeros; the default 0 keeps
    small but positive scales in the cubic term."""
    g, H, d, lam = schur_instance(5)
    small = d.copy()
    small[d == 0] = 1e-4 * d.max()
    exact = solve(g, H, d, lam)
    thresholded = solve(g, H, small, lam, zero_tol=1e-3)
    np.testing.assert_allclose(thresholded.eta.numpy(), exact.eta.numpy(), rtol=1e-12, atol=0)
    assert thresholded.radius == pytest.approx(exact.radius, rel=1e-12)
    assert "Schur" in solve(g, H, 1e5 * small, lam, zero_tol=1e-3).message  # relative: same Z

    kept = solve(g, H, small, lam)
    assert "Schur" not in kept.message
    assert_global_conditions(kept, g, H, small, lam)


@pytest.mark.parametrize("ratio", [1e-6, 1e-9, 1e-12])
@pytest.mark.parametrize("seed", range(6))
def test_graded_scales_are_solved_or_rejected(seed: int, ratio: float) -> None:
    """Scales d_s = ratio·max(d) next to an H of order one make D⁻¹HD⁻¹ strongly graded. Down to
    1e-6 the step is found; below, it is either certified optimal or reported as failed with a hint
    at zero_tol, never returned wrong."""
    g, H, d, lam = schur_instance(seed)
    d = np.where(d == 0, ratio * d.max(), d)
    result = solve(g, H, d, lam)
    if ratio >= 1e-6:
        assert result.success, result.message
    if result.success:
        assert_global_conditions(result, g, H, d, lam)
        eta = result.eta.numpy()
        best = brute_force_minimum(g, H, d, lam, 2 * np.linalg.norm(eta) + 1.0, seed, starts=6)
        assert model(eta, g, H, d, lam) <= best + 1e-9 * model_scale(g, H, d, lam, eta)
    else:
        assert result.case == "failed" and "zero_tol" in result.message
        assert torch.all(result.eta == 0)


# ----------------------------------------------------------------------------- λ = 0, invariance
def test_lambda_zero_is_newton() -> None:
    rng = np.random.default_rng(11)
    A = rng.normal(size=(5, 5))
    g, d = rng.normal(size=5), np.exp(rng.normal(size=5))
    H = A @ A.T + 0.5 * np.eye(5)
    result = solve(g, H, d, 0.0)
    assert result.success and result.case == "newton"
    expected = torch.linalg.solve(torch.tensor(H), torch.tensor(g))
    torch.testing.assert_close(result.eta, expected, rtol=1e-12, atol=1e-14)
    assert result.radius == pytest.approx(float(np.linalg.norm(d * expected.numpy())))

    indefinite = solve(g, (A + A.T) / 2, d, 0.0)
    assert not indefinite.success and indefinite.case == "unbounded"
    assert torch.all(indefinite.eta == 0)


@pytest.mark.parametrize("seed", range(30))
def test_reparameterisation_invariance(seed: int) -> None:
    """(g_s, H_st, d_s) → (a_s g_s, a_s a_t H_st, |a_s| d_s) gives η_s → η_s/a_s and the same r*
    (research/wolinski.md §3.4), for a_s of both signs over four decades."""
    g, H, d, lam = schur_instance(seed) if seed % 3 == 0 else random_instance(seed)
    rng = np.random.default_rng(3000 + seed)
    a = rng.choice([-1.0, 1.0], size=g.shape[0]) * 10.0 ** rng.uniform(-2, 2, g.shape[0])
    base = solve(g, H, d, lam)
    moved = solve(a * g, np.outer(a, a) * H, np.abs(a) * d, lam)
    assert moved.case == base.case and moved.success
    np.testing.assert_allclose(a * moved.eta.numpy(), base.eta.numpy(), rtol=1e-8, atol=1e-12)
    assert moved.radius == pytest.approx(base.radius, rel=1e-8)


def test_invariance_in_the_hard_case_for_positive_scalings() -> None:
    """The hard-case eigenvector is chosen from the eigenspace alone, so a_s > 0 keeps it."""
    (g, H, d, lam), _ = hard_instance(4, 2)
    a = 10.0 ** np.random.default_rng(9).uniform(-2, 2, g.shape[0])
    base = solve(g, H, d, lam)
    moved = solve(a * g, np.outer(a, a) * H, a * d, lam)
    assert base.case == moved.case == "hard"
    np.testing.assert_allclose(a * moved.eta.numpy(), base.eta.numpy(), rtol=1e-7, atol=1e-12)


# ----------------------------------------------------------------------------- robustness
def test_symmetric_part_of_H_is_used() -> None:
    g, H, d, lam = random_instance(13)
    skew = np.triu(np.ones_like(H), 1)
    skew = skew - skew.T
    np.testing.assert_allclose(
        solve(g, H + skew, d, lam).eta.numpy(), solve(g, H, d, lam).eta.numpy(), rtol=1e-12
    )


def test_root_finder_failure_is_reported() -> None:
    g, H, d, lam = random_instance(21)
    result = solve(g, H, d, lam, max_iter=1)
    assert not result.success and result.case == "failed" and "max_iter" in result.message
    assert torch.all(result.eta == 0) and result.radius == 0.0


@pytest.mark.parametrize("exponent", [-150, -60, 60, 150])
def test_extreme_magnitudes_never_give_nan(exponent: int) -> None:
    """Huge or tiny data: either a step that satisfies the optimality conditions, or a clean
    failure; never NaN."""
    g, H, d, lam = random_instance(17)
    for scaled in (
        (g * 10.0**exponent, H, d),
        (g, H * 10.0**exponent, d),
        (g, H, d * 10.0**exponent),
    ):
        result = solve(*scaled, lam)
        assert not torch.isnan(result.eta).any() and math.isfinite(result.radius)
        if result.success:
            assert_global_conditions(result, *scaled, lam)
        else:
            assert torch.all(result.eta == 0) and result.message


def test_dtype_device_and_frozen_result() -> None:
    g, H, d, lam = random_instance(2)
    result = solve_cubic_step(
        torch.tensor(g, dtype=torch.float32),
        torch.tensor(H, dtype=torch.float32),
        torch.tensor(d, dtype=torch.float32),
        lam,
    )
    assert result.eta.dtype == torch.float64 and result.eta.device == torch.device("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.success = False  # type: ignore[misc]
    if torch.cuda.is_available():
        cuda = solve_cubic_step(*(torch.tensor(x, device="cuda") for x in (g, H, d)), lam)
        assert cuda.eta.device.type == "cuda"
        torch.testing.assert_close(cuda.eta.cpu(), solve(g, H, d, lam).eta)


def test_inputs_are_not_modified() -> None:
    g, H, d, lam = schur_instance(1)
    tensors = [torch.tensor(x, requires_grad=True) for x in (g, H + np.triu(H, 1), d)]
    copies = [t.detach().clone() for t in tensors]
    solve_cubic_step(*tensors, lam)
    for tensor, copy in zip(tensors, copies):
        assert torch.equal(tensor.detach(), copy)


# ----------------------------------------------------------------------------- bad input
_G, _H, _D = torch.ones(3), torch.eye(3), torch.ones(3)


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        (([1.0, 2.0, 3.0], _H, _D), "g"),
        ((torch.ones(3, 1), _H, _D), "g"),
        ((torch.ones(0), torch.ones(0, 0), torch.ones(0)), "g"),
        ((torch.ones(3, dtype=torch.complex128), _H, _D), "g"),
        ((torch.tensor([1.0, math.nan, 0.0]), _H, _D), "g"),
        ((_G, torch.ones(3, 4), _D), "H"),
        ((_G, _H.numpy(), _D), "H"),
        ((_G, torch.full((3, 3), math.inf), _D), "H"),
        ((_G, _H, torch.ones(4)), "d"),
        ((_G, _H, torch.tensor([1.0, -1.0, 1.0])), "d"),
        ((_G, _H, torch.tensor([1.0, math.nan, 1.0])), "d"),
    ],
)
def test_bad_tensors_are_named(arguments: tuple[object, object, object], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} "):
        solve_cubic_step(*arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("lambda_int", -1.0),
        ("lambda_int", math.nan),
        ("lambda_int", math.inf),
        ("lambda_int", "one"),
        ("zero_tol", -0.1),
        ("zero_tol", math.nan),
        ("max_iter", 0),
        ("max_iter", 2.5),
    ],
)
def test_bad_scalars_are_named(keyword: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{keyword} "):
        solve_cubic_step(_G, _H, _D, **{keyword: value})  # type: ignore[arg-type]
