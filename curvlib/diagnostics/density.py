"""The spectral density of a curvature operator by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric P×P matrix C with eigenvalues λ_1..λ_P is
φ(t) = (1/P) Σ_i δ(t − λ_i); smoothed with a Gaussian kernel of width σ,

    φ_σ(t) = (1/P) Σ_i N(t; λ_i, σ²) = (1/P) tr f_t(C),   f_t(λ) = N(t; λ, σ²).

SLQ (Ubaru, Chen & Saad 2017, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature";
Ghorbani, Krishnan & Xiao 2019, "An investigation into neural net optimization via Hessian
eigenvalue density") estimates (1/P) tr f(C) for every f at once:

1. draw Rademacher probes z_l (l = 1..n_v); v_l = z_l/‖z_l‖ = z_l/√P, so E[v_lᵀ f(C) v_l] =
   tr f(C)/P exactly;
2. m steps of Lanczos from v_l give a tridiagonal T_l = S_l diag(θ_l) S_lᵀ, and Gauss quadrature
   v_lᵀ f(C) v_l ≈ Σ_i w_{l,i} f(θ_{l,i}), with nodes θ_{l,i} (Ritz values) and weights
   w_{l,i} = (S_l)_{1i}² summing to one; the rule is exact for polynomials of degree ≤ 2m − 1;
3. average over probes: φ_σ(t) ≈ (1/n_v) Σ_l Σ_i w_{l,i} N(t; θ_{l,i}, σ²).

Hence the density integrates to one (the weights of each probe sum to one and each Gaussian has
unit mass, up to the mass outside the grid), and its k-th moment before smoothing,
(1/n_v) Σ_l Σ_i w_{l,i} θ_{l,i}^k, is an unbiased estimate of tr(C^k)/P for k ≤ 2m − 1
(:meth:`SpectralDensity.moment`); smoothing adds the Gaussian's moments (σ² to the second).

Lanczos here runs with full reorthogonalisation (two Gram-Schmidt passes, "twice is enough"),
batched over probes. When a probe's Krylov space is exhausted (β_j ≈ 0, e.g. for a low-rank GGN)
the recursion restarts from a random vector orthogonal to all previous ones with β_j = 0: T_l
becomes block-diagonal and the extra block's Ritz values carry zero weight, so the quadrature is
unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from curvlib.diagnostics.operand import (
    Operand,
    SymmetricOperand,
    as_operand,
    check_positive_int,
    check_seed,
    make_generator,
    rademacher,
)
from curvlib.diagnostics.progress import progress_bar

MAX_BASIS_ELEMENTS = 2**26
"""Probes are processed in blocks whose Lanczos bases (steps × P × probes) stay below this."""


@dataclass(frozen=True)
class SpectralDensity:
    """A Gaussian-smoothed spectral density from stochastic Lanczos quadrature.

    Attributes:
        grid: the points t (increasing).
        density: φ_σ(t) on the grid.
        nodes: [num_probes, steps] Ritz values θ_{l,i}.
        weights: [num_probes, steps] quadrature weights w_{l,i} (each row sums to one).
        sigma: the width σ of the Gaussian kernel.
        size: P, the dimension of the operator.
        num_matvecs: the products C v it took.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    size: int
    num_matvecs: int

    def probe_moments(self, power: int) -> Tensor:
        """Σ_i w_{l,i} θ_{l,i}^power for every probe l: each is an unbiased estimate of
        tr(C^power)/P, exact-in-expectation for power ≤ 2·steps − 1."""
        power = check_positive_int(power, "power", minimum=0)
        return (self.weights * self.nodes**power).sum(dim=1)

    def moment(self, power: int) -> float:
        """The quadrature estimate of tr(C^power)/P (mean over probes, before smoothing)."""
        return float(self.probe_moments(power).mean())

    def integral(self) -> float:
        """∫ φ_σ over the grid (trapezoidal rule): one, up to the mass outside the grid."""
        return float(torch.trapezoid(self.density, self.grid))


def lanczos_quadrature(operand: SymmetricOperand, probes: Tensor, steps: int,
                       bar: tqdm) -> tuple[Tensor, Tensor]:
    """Nodes and weights ([probes, steps] each) of the Gauss quadrature for each column probe.

    Runs ``steps`` ≤ P Lanczos iterations per probe, all probes at once, with full
    reorthogonalisation and restarts on breakdown (see the module docstring).
    """
    size, count = probes.shape
    generator = torch.Generator().manual_seed(0)
    basis = torch.zeros(steps, size, count, dtype=probes.dtype, device=probes.device)
    alpha = torch.zeros(steps, count, dtype=probes.dtype, device=probes.device)
    beta = torch.zeros(max(steps - 1, 0), count, dtype=probes.dtype, device=probes.device)
    basis[0] = probes / torch.linalg.vector_norm(probes, dim=0)
    scale = torch.zeros(count, dtype=probes.dtype, device=probes.device)
    threshold = math.sqrt(torch.finfo(probes.dtype).eps)

    def orthogonalise(w: Tensor, known: Tensor) -> Tensor:
        for _ in range(2):  # one more pass removes what rounding left of the first
            w = w - torch.einsum("jpb,jb->pb", known, torch.einsum("jpb,pb->jb", known, w))
        return w

    for j in range(steps):
        w = operand.matmat(basis[j])
        bar.update(count)
        alpha[j] = (basis[j] * w).sum(dim=0)
        scale = torch.maximum(scale, alpha[j].abs())
        if j == steps - 1:
            break
        w = orthogonalise(w, basis[: j + 1])
        norms = torch.linalg.vector_norm(w, dim=0)
        scale = torch.maximum(scale, norms)
        broken = norms <= threshold * scale
        if bool(broken.any()):
            # invariant subspace found: continue the basis with a fresh orthogonal direction
            fresh = torch.randn(size, int(broken.sum()), generator=generator).to(w)
            w[:, broken] = orthogonalise(fresh, basis[: j + 1, :, broken])
            norms = torch.where(broken, torch.zeros_like(norms), norms)
        beta[j] = norms
        basis[j + 1] = w / torch.linalg.vector_norm(w, dim=0)

    tridiagonal = torch.diag_embed(alpha.T)
    if steps > 1:
        off = torch.diag_embed(beta.T, offset=1)
        tridiagonal = tridiagonal + off + off.transpose(1, 2)
    nodes, vectors = torch.linalg.eigh(tridiagonal.to(torch.float64))
    return nodes, vectors[:, 0, :] ** 2


def spectral_density(
    estimate_or_operator: Operand,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: int | Tensor = 1000,
    sigma: float | None = None,
    seed: int | None = 0,
    *,
    progress: bool | None = None,
) -> SpectralDensity:
    """The Gaussian-smoothed spectral density by stochastic Lanczos quadrature.

    Args:
        estimate_or_operator: a :class:`~curvlib.CurvatureEstimate`, a SciPy ``LinearOperator``
            or a dense symmetric tensor.
        num_probes: Rademacher probes n_v (the estimate's variance falls like 1/n_v).
        lanczos_steps: Lanczos steps m per probe; capped at P, where the quadrature is exact.
        grid: the points t, as a 1-D increasing tensor, or a number of points spread evenly over
            [min θ − 5σ, max θ + 5σ] so that the density integrates to one up to ~1e-6.
        sigma: the kernel width σ > 0; default 1% of the spread of the Ritz values (or of their
            magnitude when they coincide).
        seed: seeds the probes (``None``: fresh randomness).
        progress: a progress bar over the products (``None``: only on a terminal).

    Returns:
        A :class:`SpectralDensity` (grid, density, nodes, weights, σ), on the CPU in float64.

    Raises:
        ValueError: a non-positive count, a bad grid or σ, or a bad seed.
    """
    operand = as_operand(estimate_or_operator)
    num_probes = check_positive_int(num_probes, "num_probes")
    steps = min(check_positive_int(lanczos_steps, "lanczos_steps"), operand.size)
    if isinstance(grid, Tensor):
        if grid.dim() != 1 or grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()):
            raise ValueError("grid must be a 1-D increasing tensor of at least two points.")
        if not bool(torch.isfinite(grid).all()):
            raise ValueError("grid is not finite (contains NaN or inf).")
    else:
        check_positive_int(grid, "grid", minimum=2)
    if sigma is not None and (not math.isfinite(sigma) or sigma <= 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}.")
    generator = make_generator(check_seed(seed))

    block = max(1, min(num_probes, MAX_BASIS_ELEMENTS // (steps * operand.size)))
    nodes, weights = [], []
    with progress_bar(num_probes * steps, "SLQ", progress, unit="matvec") as bar:
        for start in range(0, num_probes, block):
            count = min(block, num_probes - start)
            probes = rademacher(operand.size, count, generator, operand.dtype, operand.device)
            n, w = lanczos_quadrature(operand, probes, steps, bar)
            nodes.append(n.cpu())
            weights.append(w.cpu())
    nodes_t, weights_t = torch.cat(nodes), torch.cat(weights)

    low, high = float(nodes_t.min()), float(nodes_t.max())
    if sigma is None:
        spread = high - low if high > low else max(abs(low), abs(high), 1.0)
        sigma = 0.01 * spread
    if isinstance(grid, Tensor):
        points = grid.detach().to(device="cpu", dtype=torch.float64)
    else:
        points = torch.linspace(low - 5 * sigma, high + 5 * sigma, int(grid), dtype=torch.float64)
    # φ_σ(t) = mean_l Σ_i w_{l,i} N(t; θ_{l,i}, σ²), as one weighted sum over all nodes
    gauss = torch.exp(-0.5 * ((points[:, None] - nodes_t.reshape(1, -1)) / sigma) ** 2)
    density = gauss @ weights_t.reshape(-1) / (num_probes * sigma * math.sqrt(2 * math.pi))
    return SpectralDensity(points, density, nodes_t, weights_t, float(sigma), operand.size,
                           operand.num_matvecs)
