"""The order-3 partitioned step: global minimiser of Wolinski's anisotropic cubic model.

Given the partitioned gradient g ∈ ℝ^S, Hessian H ∈ ℝ^{S×S} and per-subset scales
d_s = |D̄_sss|^{1/3} ≥ 0 (Wolinski, "Gathering and Exploiting Higher-Order Information when Training
Large Structured Models", arXiv 2312.03885; ``research/wolinski.md`` §3.3), the step is

    η* = argmin_η  T(η),   T(η) = −gᵀη + ½ ηᵀHη + (λ_int/6) ‖Dη‖³,   D = Diag(d).

Only the symmetric part of H enters T, so H is symmetrised first. With c = λ_int/2 and r = ‖Dη‖ the
stationarity condition is the step equation of the paper, (H + c r D²) η = g.

**All d_s > 0.** In z = Dη the model is the Euclidean cubic model of Nesterov & Polyak,
T = −wᵀz + ½ zᵀKz + (c/3)‖z‖³ with K = D⁻¹HD⁻¹ and w = D⁻¹g. Its global minimisers are exactly the
z with (K + c‖z‖I) z = w and K + c‖z‖I ⪰ 0 (Nesterov & Polyak, "Cubic regularization of Newton
method and its global performance", Math. Program. 108, 2006, Thm. 10; Cartis, Gould & Toint,
Math. Program. 127, 2011, Thm. 3.1). With K = Q diag(κ) Qᵀ (κ₁ ≤ … ≤ κ_S) and b = Qᵀw, write the
shift t = κ₁ + c r, the smallest eigenvalue of K + c r I, and δ_i = κ_i − κ₁ ≥ 0. Then
y_i(t) = b_i / (δ_i + t), ψ(t) = ‖y(t)‖, and r* solves the secular equation

    φ(t) = ψ(t) − (t − κ₁)/c = 0   on   t > t₀ = max(κ₁, 0)   (i.e. r > r₀ = max(0, −κ₁/c)).

φ is strictly decreasing there, so the root is unique. Root-finding in t rather than r keeps the
relative accuracy of every eigenvalue δ_i + t of K + c r I, also when the root sits next to the
pole t = 0; Brent's method runs on log t, so that it reaches that relative accuracy in a bounded
number of steps whatever the magnitude of t*. The brackets are closed-form:

* upper: ψ(t) ≤ ‖b‖/t, so φ ≤ 0 at the positive root of t² − κ₁t − c‖b‖ = 0;
* lower, κ₁ > 0: φ(κ₁) = ψ(κ₁) ≥ 0;
* lower, κ₁ ≤ 0 and β = ‖b_C‖ > 0 on the κ₁-eigenspace C: ψ(t) ≥ β/t, so φ ≥ 0 at the positive
  root of t² − κ₁t − cβ = 0;
* lower, κ₁ ≤ 0 and β = 0 with P = ψ_R(0) > r₀ on the other eigenvectors R: δ_i ≥ δ_m = min_R δ
  gives ψ_R(t) ≥ P δ_m/(δ_m + t), so φ ≥ 0 at the positive root of
  t² + (δ_m − κ₁)t − δ_m(κ₁ + cP) = 0.

**Hard case** (κ₁ ≤ 0, β = 0 numerically, P ≤ r₀): the root is at the pole, r* = r₀, and
z* = Q_R y_R(0) + α v with α = √(r₀² − P²) and v a unit vector of the κ₁-eigenspace, as in the
trust-region hard case (Moré & Sorensen, SIAM J. Sci. Stat. Comput. 4, 1983). v is the
projection of the coordinate axis e_j that the eigenspace is closest to, so it depends on the
eigenspace only, not on the basis the eigensolver returns. Eigenvalues of K within S·ε·‖K‖ of κ₁
are treated as equal to κ₁ (a perturbation of K at the level of the eigensolver's own backward
error). β ≤ 8·S·ε·‖b‖, the rounding level of b, counts as zero: dropping it changes T by at most
about 2β·r*, a relative 16·S·ε. Above that threshold the log-Brent root, next to the pole, is the
hard-case solution to working accuracy anyway.

**Some d_s = 0** (the set Z; d_s ≤ zero_tol·max(d), zero_tol relative so that the default 0
keeps the invariance below exact). T is quadratic in η_Z, so a finite minimiser needs H_ZZ ≻ 0;
otherwise T is unbounded below (or, on the boundary, has no unique minimiser) and there is no
step. Minimising over η_Z first leaves the same model on R with the Schur complement
H̃ = H_RR − H_RZ H_ZZ⁻¹ H_ZR and g̃ = g_R − H_RZ H_ZZ⁻¹ g_Z; then η_Z = H_ZZ⁻¹(g_Z − H_ZR η_R).
All d_s = 0 and λ_int = 0 give the Newton step H⁻¹g, which exists only for H ≻ 0.

**Invariance** (``research/wolinski.md`` §3.4): scaling (g_s, H_st, d_s) by (a_s, a_s a_t, |a_s|)
leaves K and ‖b‖ unchanged up to signs and returns η_s/a_s with the same r*.

**Accuracy.** The eigen-solution is refined by a few Newton steps on the stationarity equation in
the original coordinates and then certified against the global-minimiser conditions above; a step
that fails the certificate is reported as "failed" rather than returned (see
``_polish_and_certify``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import torch
from scipy.optimize import brentq
from torch import Tensor

CubicCase = Literal["interior", "hard", "newton", "unbounded", "failed"]

_EPS = float(np.finfo(np.float64).eps)
# Newton refinement converges quadratically from the eigen-solution, so a few steps suffice.
_POLISH_STEPS = 3
# Relative tolerance of the optimality certificate: refined steps reach ~1e-15 on well-graded
# problems and ~1e-9 on the most graded ones that are still solved; a wrong root is off by ≫ 1e-8.
_CERTIFY_TOL = 1e-8
_GRADED_HINT = (
    "D⁻¹HD⁻¹ is probably too strongly graded (some d_s tiny next to √|H_ss|); a relative zero_tol "
    "treats such subsets as d_s = 0."
)

# (step in the caller's coordinates or None when there is none, case, message)
_Outcome = tuple[np.ndarray | None, CubicCase, str]


@dataclass(frozen=True)
class CubicStepResult:
    """The outcome of :func:`solve_cubic_step`.

    Attributes:
        eta: the step η*, shape (S,), float64 on the device of ``g``; all zeros when ``success`` is
            False.
        success: whether a global minimiser was found.
        case: ``"interior"`` (root of the secular equation with H + c r D² ≻ 0), ``"hard"`` (the
            hard case, r* = r₀), ``"newton"`` (λ_int = 0 or every d_s = 0: η = H⁻¹g),
            ``"unbounded"`` (the model has no minimiser) or ``"failed"`` (numerical failure).
        radius: r* = ‖Dη*‖, with the entries of d treated as zero set to zero; 0.0 on failure.
        message: what was solved, or why there is no step.
    """

    eta: Tensor
    success: bool
    case: CubicCase
    radius: float
    message: str


def solve_cubic_step(
    g: Tensor,
    H: Tensor,
    d: Tensor,
    lambda_int: float = 1.0,
    *,
    zero_tol: float = 0.0,
    max_iter: int = 200,
) -> CubicStepResult:
    """Global minimiser of T(η) = −gᵀη + ½ηᵀHη + (λ_int/6)‖Dη‖³ with D = Diag(d).

    The math, the brackets and the special cases are in the module docstring (Wolinski,
    arXiv 2312.03885; ``research/wolinski.md`` §3.3). Everything runs in float64.

    Args:
        g: the partitioned gradient ḡ, shape (S,).
        H: the partitioned Hessian H̄, shape (S, S); only its symmetric part is used.
        d: the scales d_s = |D̄_sss|^{1/3} ≥ 0, shape (S,).
        lambda_int: the internal damping λ_int ≥ 0; 0 gives the Newton step.
        zero_tol: entries with d_s ≤ zero_tol·max(d) are treated as 0 (Schur-complement path).
            Relative, so that the default 0 keeps the reparameterisation invariance exact.
        max_iter: the most iterations of the root-finder.

    Returns:
        A :class:`CubicStepResult`; numerical trouble gives ``success=False`` and a zero step, never
        NaN.

    Raises:
        ValueError: a tensor of the wrong type or shape, non-finite entries, negative entries in d,
            inputs on different devices, λ_int < 0 or non-finite, zero_tol < 0, max_iter < 1.
    """
    g_np, H_np, d_np = _check_tensors(g, H, d)
    lam = _check_number(lambda_int, "lambda_int")
    tol = _check_number(zero_tol, "zero_tol")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int ≥ 1, got {max_iter!r}.")

    H_np = 0.5 * (H_np + H_np.T)
    zero = d_np <= tol * d_np.max()
    d_eff = np.where(zero, 0.0, d_np)
    # Overflow on extreme data is detected explicitly (non-finite step → "failed"), so NumPy's
    # floating-point warnings would only be noise.
    with np.errstate(all="ignore"):
        if lam == 0.0:
            outcome = _newton(g_np, H_np, "lambda_int = 0")
        elif zero.all():
            outcome = _newton(g_np, H_np, "every d_s is zero")
        else:
            if zero.any():
                outcome = _solve_with_zero_scales(g_np, H_np, d_np, zero, 0.5 * lam, max_iter)
            else:
                outcome = _solve_positive_scales(g_np, H_np, d_np, 0.5 * lam, max_iter)
            outcome = _polish_and_certify(outcome, g_np, H_np, d_eff, 0.5 * lam)
        return _result(outcome, d_eff, g.device)


def _check_tensors(g: Tensor, H: Tensor, d: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate (g, H, d) and return them as float64 NumPy arrays (copies, never views)."""
    g_np = _as_array(g, "g", None, None)
    if g_np.ndim != 1 or g_np.size == 0:
        raise ValueError(f"g must have shape (S,) with S ≥ 1, got {g_np.shape}.")
    size = g_np.shape[0]
    H_np = _as_array(H, "H", (size, size), g.device)
    d_np = _as_array(d, "d", (size,), g.device)
    if (d_np < 0).any():
        raise ValueError(f"d must be ≥ 0 (d_s = |D̄_sss|^(1/3)), got {d_np.tolist()}.")
    return g_np, H_np, d_np


def _as_array(
    value: object, name: str, shape: tuple[int, ...] | None, device: torch.device | None
) -> np.ndarray:
    """A real, finite tensor of the given shape on the given device, as a float64 NumPy copy."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if value.is_complex():
        raise ValueError(f"{name} must be real, got dtype {value.dtype}.")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} to match g, got {tuple(value.shape)}.")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but g is on {device}.")
    array = np.array(value.detach().to(torch.float64).numpy(force=True), copy=True)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has non-finite entries.")
    return array


def _check_number(value: object, name: str) -> float:
    """A finite float ≥ 0, or a ValueError naming the argument."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be finite and ≥ 0, got {value!r}.")
    return number


def _result(outcome: _Outcome, d_eff: np.ndarray, device: torch.device) -> CubicStepResult:
    """Package an outcome; a missing or non-finite step becomes a zero step with success=False."""
    eta, case, message = outcome
    size = d_eff.shape[0]
    if eta is not None and not np.isfinite(eta).all():
        eta, case, message = None, "failed", f"the step overflowed ({message})."
    radius = 0.0 if eta is None else _norm(d_eff * eta)
    if not math.isfinite(radius):
        eta, case, message, radius = None, "failed", f"‖Dη‖ overflowed ({message}).", 0.0
    step = np.zeros(size) if eta is None else eta
    return CubicStepResult(
        eta=torch.from_numpy(step).to(device),
        success=eta is not None,
        case=case,
        radius=radius,
        message=message,
    )


def _norm(x: np.ndarray) -> float:
    """Euclidean norm without overflow or underflow in the squares."""
    return math.hypot(*x.tolist())


def _positive_root(p: float, q: float) -> float:
    """The larger root of t² = p t + q for q ≥ 0, in the form without cancellation."""
    disc = math.hypot(p, 2.0 * math.sqrt(q))
    if p >= 0:
        return 0.5 * (p + disc)
    return 2.0 * q / (disc - p)


def _stationarity(
    eta: np.ndarray, g: np.ndarray, H: np.ndarray, d: np.ndarray, c: float
) -> tuple[float, float]:
    """‖(H + c r D²)η − g‖ with r = ‖Dη‖, and the size of its terms (the scale to compare it to)."""
    r = _norm(d * eta)
    Heta, cubic = H @ eta, c * r * d**2 * eta
    return _norm(Heta + cubic - g), _norm(Heta) + _norm(cubic) + _norm(g)


def _polish_and_certify(
    outcome: _Outcome, g: np.ndarray, H: np.ndarray, d: np.ndarray, c: float
) -> _Outcome:
    """Refine a secular-equation step in the caller's coordinates, then certify it globally optimal.

    The eigen-solution is computed in z = Dη, where K = D⁻¹HD⁻¹ is strongly graded when some d_s is
    tiny next to √|H_ss| (a subset whose cubic term hardly matters): the eigensolver resolves the
    small eigenvalues of K only to ε‖K‖, and the small components of its eigenvectors, which
    η = D⁻¹z amplifies, only to ε. A few Newton steps on the stationarity equation
    F(η) = (H + c‖Dη‖D²)η − g in the original coordinates, with the Jacobian (the Hessian of T)
    J = H + c r D² + (c/r)(D²η)(D²η)ᵀ, recover the lost digits; a step is kept only if it lowers
    ‖F‖. The result must then meet the global-minimiser conditions of Nesterov & Polyak (2006,
    Thm. 10) to the relative accuracy _CERTIFY_TOL, F(η) ≈ 0 and H + c r D² ⪰ 0, or the outcome is
    "failed": never a silently wrong step. In the tests, scales d_s down to 1e-6·max(d) next to an
    H of order one are solved; much smaller ones can fail, and a relative zero_tol then helps.
    """
    eta, case, message = outcome
    if eta is None or not np.isfinite(eta).all():
        return outcome
    residual, scale = _stationarity(eta, g, H, d, c)
    for _ in range(_POLISH_STEPS):
        if not residual > _EPS * scale:
            break
        r = _norm(d * eta)
        u = d**2 * eta
        J = H + c * r * np.diag(d**2) + (c / r * np.outer(u, u) if r > 0 else 0.0)
        try:
            candidate = eta - np.linalg.solve(J, (H + c * r * np.diag(d**2)) @ eta - g)
        except np.linalg.LinAlgError:
            break
        candidate_residual, candidate_scale = _stationarity(candidate, g, H, d, c)
        if not candidate_residual < residual:
            break
        eta, residual, scale = candidate, candidate_residual, candidate_scale
    shifted = H + c * _norm(d * eta) * np.diag(d**2)
    if not (math.isfinite(scale) and np.isfinite(shifted).all()):
        return None, "failed", f"{message} Rejected: the optimality check overflows."
    lowest, largest = np.linalg.eigvalsh(shifted)[[0, -1]]
    if not residual <= _CERTIFY_TOL * scale:
        return (
            None,
            "failed",
            f"{message} Rejected: the stationarity residual {residual:.3g} exceeds "
            f"{_CERTIFY_TOL:g} × {scale:.3g}. {_GRADED_HINT}",
        )
    if not lowest >= -_CERTIFY_TOL * max(abs(lowest), abs(largest)):
        return (
            None,
            "failed",
            f"{message} Rejected: H + c r D² has the eigenvalue {lowest:.3g} < 0 at the "
            f"computed r, so the step is not the global minimiser. {_GRADED_HINT}",
        )
    return eta, case, message


def _newton(g: np.ndarray, H: np.ndarray, why: str) -> _Outcome:
    """η = H⁻¹g when H ≻ 0 (Cholesky succeeds); otherwise the quadratic model has no minimiser."""
    try:
        factor = scipy.linalg.cho_factor(H, lower=True)
    except np.linalg.LinAlgError:
        return (
            None,
            "unbounded",
            f"{why}, so the model is the quadratic −gᵀη + ½ηᵀHη, and H is not positive definite: "
            "it is unbounded below (or has no unique minimiser).",
        )
    return scipy.linalg.cho_solve(factor, g), "newton", f"{why}: Newton step η = H⁻¹g."


def _solve_with_zero_scales(
    g: np.ndarray, H: np.ndarray, d: np.ndarray, zero: np.ndarray, c: float, max_iter: int
) -> _Outcome:
    """Eliminate the subsets Z with d_s = 0 by a Schur complement, solve on R, back-substitute."""
    Z, R = np.flatnonzero(zero), np.flatnonzero(~zero)
    try:
        factor = scipy.linalg.cho_factor(H[np.ix_(Z, Z)], lower=True)
    except np.linalg.LinAlgError:
        return (
            None,
            "unbounded",
            f"H restricted to the subsets with d_s = 0 ({Z.tolist()}) is not positive definite: "
            "the model has no cubic term there and is unbounded below "
            "(or has no unique minimiser).",
        )
    H_RZ = H[np.ix_(R, Z)]
    solved = scipy.linalg.cho_solve(factor, np.column_stack([H_RZ.T, g[Z]]))
    H_red = H[np.ix_(R, R)] - H_RZ @ solved[:, :-1]
    g_red = g[R] - H_RZ @ solved[:, -1]
    eta_R, case, message = _solve_positive_scales(g_red, 0.5 * (H_red + H_red.T), d[R], c, max_iter)
    if eta_R is None:
        return None, case, message
    eta = np.empty_like(g)
    eta[R] = eta_R
    eta[Z] = scipy.linalg.cho_solve(factor, g[Z] - H_RZ.T @ eta_R)
    return eta, case, f"{message} Subsets {Z.tolist()} (d_s = 0) eliminated by a Schur complement."


def _solve_positive_scales(
    g: np.ndarray, H: np.ndarray, d: np.ndarray, c: float, max_iter: int
) -> _Outcome:
    """The secular-equation solver for d > 0 (module docstring), returning η = D⁻¹Q y."""
    size = g.shape[0]
    w = g / d
    K = (H / d[:, None]) / d[None, :]
    K = 0.5 * (K + K.T)
    if not (np.isfinite(K).all() and np.isfinite(w).all()):
        return (
            None,
            "failed",
            "D⁻¹HD⁻¹ or D⁻¹g overflows: some d_s is tiny relative to H and g; "
            "a relative zero_tol treats such subsets as d_s = 0.",
        )
    try:
        kappa, Q = scipy.linalg.eigh(K)
    except np.linalg.LinAlgError as error:
        return None, "failed", f"the eigendecomposition of D⁻¹HD⁻¹ failed: {error}."
    b = Q.T @ w
    k1 = float(kappa[0])
    delta = kappa - k1
    # Eigenvalues within the eigensolver's backward error of κ₁ form one eigenspace C.
    cluster = delta <= size * _EPS * max(abs(k1), abs(float(kappa[-1])))
    delta[cluster] = 0.0
    b_norm, beta = _norm(b), _norm(b[cluster])
    t_hi = _positive_root(k1, c * b_norm)

    def secular(t: float, idx: np.ndarray) -> float:
        return _norm(b[idx] / (delta[idx] + t)) - (t - k1) / c

    everything = np.ones(size, dtype=bool)
    y = np.zeros(size)
    if k1 > 0.0:
        if b_norm == 0.0:
            return y, "interior", "g = 0 and H + c r D² ≻ 0 at r = 0: the minimiser is η = 0."
        t = _log_brent(lambda t: secular(t, everything), k1, t_hi, max_iter)
        idx = everything
    else:
        r0 = -k1 / c
        t_pole = _positive_root(k1, c * beta)
        if beta > 8 * size * _EPS * b_norm and t_pole > 0.0:
            t = _log_brent(lambda t: secular(t, everything), t_pole, t_hi, max_iter)
            idx = everything
        else:
            idx = ~cluster
            y[idx] = b[idx] / delta[idx]
            pseudo = _norm(y)
            t_lo = 0.0
            if pseudo > r0:
                d_min = float(delta[idx].min())
                t_lo = _positive_root(k1 - d_min, max(d_min * (k1 + c * pseudo), 0.0))
            if t_lo <= 0.0:
                return _hard_case(Q, y, cluster, r0, pseudo, d)
            t = _log_brent(lambda t: secular(t, idx), t_lo, t_hi, max_iter)
    if t is None:
        return (
            None,
            "failed",
            f"the secular equation was not solved: Brent's method did not converge in "
            f"max_iter={max_iter} iterations, or the secular function overflowed.",
        )
    y[idx] = b[idx] / (delta[idx] + t)
    r = (t - k1) / c
    return Q @ y / d, "interior", f"Secular root r* = {r:.6g} with H + c r D² ≻ 0 (t = {t:.3g})."


def _hard_case(
    Q: np.ndarray, y: np.ndarray, cluster: np.ndarray, r0: float, pseudo: float, d: np.ndarray
) -> _Outcome:
    """r* = r₀: the pseudo-solution plus a κ₁-eigenspace component of norm √(r₀² − ψ²)."""
    Q_C = Q[:, cluster]
    closeness = (Q_C**2).sum(axis=1)  # ‖P_C e_j‖², P_C the projector on the eigenspace
    j = int(np.argmax(closeness))
    v = Q_C @ Q_C[j] / math.sqrt(closeness[j])
    alpha = math.sqrt(max((r0 - pseudo) * (r0 + pseudo), 0.0))
    z = Q @ y + alpha * v
    return (
        z / d,
        "hard",
        f"Hard case: r* = r₀ = {r0:.6g}, eigenspace component of norm {alpha:.6g}.",
    )


def _log_brent(
    phi: Callable[[float], float], t_lo: float, t_hi: float, max_iter: int
) -> float | None:
    """Root of the decreasing φ on [t_lo, t_hi] (0 < t_lo ≤ t_hi, φ(t_lo) ≥ 0 ≥ φ(t_hi) in exact
    arithmetic), by Brent's method on s = log t − log √(t_lo t_hi); None if it does not converge.

    Centring s keeps |s| small, since brentq's tolerance is absolute in s plus 4ε|s|: an absolute
    tolerance in log t is a relative tolerance in t, whatever its magnitude.
    """
    log_ref = 0.5 * (math.log(t_lo) + math.log(t_hi))
    s_lo, s_hi = math.log(t_lo) - log_ref, math.log(t_hi) - log_ref

    def f(s: float) -> float:
        return phi(math.exp(log_ref + s))

    # Rounding can put the computed φ on the wrong side at an end of the closed-form bracket; the
    # root is then that end to working precision.
    f_lo, f_hi = f(s_lo), f(s_hi)
    if not (math.isfinite(f_lo) and math.isfinite(f_hi)):
        return None
    if f_lo <= 0.0:
        return math.exp(log_ref + s_lo)
    if f_hi >= 0.0:
        return math.exp(log_ref + s_hi)
    try:
        s, info = brentq(
            f,
            s_lo,
            s_hi,
            xtol=4 * _EPS,
            rtol=4 * _EPS,
            maxiter=max_iter,
            full_output=True,
            disp=False,
        )
    except (RuntimeError, ValueError):
        return None
    return math.exp(log_ref + s) if info.converged else None
