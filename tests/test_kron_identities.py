"""Identities of the eigenbasis and trace-restricted methods (kfac_family.md §4 I5–I8), float64.

F is the exact GGN of the data the estimate saw, weighted as the estimate weighs its batches
(exact average or EMA), restricted to the layer blocks; per layer it is also read in the
row-major [W | b] layout to check diagonals in the Kronecker eigenbasis and partial traces.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from curvlib import EKFAC, KFAC, TEKFAC, TKFAC
from curvlib.kron import KroneckerEstimate
from curvlib.testing import assert_close, assert_estimate_close
from tests.cases import make_case
from tests.test_kron_exact import METHODS, fitted, from_wb, ggn_blocks, to_wb, wb_index

BATCH_SIZES = [2, 3, 4]


def batches(name: str, loss: str, reduction: str) -> tuple[nn.Module, nn.Module, list]:
    """A model, its loss and three batches of different sizes."""
    model, loss_fn, x, y = make_case(name, loss, reduction, batch=sum(BATCH_SIZES), seed=4)
    out, start = [], 0
    for n in BATCH_SIZES:
        out.append((x[start : start + n], y[start : start + n]))
        start += n
    return model, loss_fn, out


def weighted_reference(
    estimate: KroneckerEstimate, data: list, reduction: str, ema_decay: float | None
) -> Tensor:
    """Σ_b ω_b F_b with the weights the estimate's statistics give each batch."""
    if ema_decay is None and reduction == "sum":
        weights = [1.0] * len(data)
    else:
        beta = 0.0 if ema_decay is None else ema_decay
        raw = [
            (len(x) if reduction == "mean" else 1.0)
            * (1.0 if ema_decay is None else (1 - beta) * beta ** (len(data) - 1 - b))
            for b, (x, _) in enumerate(data)
        ]
        weights = [w / sum(raw) for w in raw]
    return sum(w * ggn_blocks(estimate, x, y) for w, (x, y) in zip(weights, data))


def layer_blocks(estimate: KroneckerEstimate, dense: Tensor) -> dict[str, Tensor]:
    """Each layer's block of a dense matrix, in the [W | b] layout."""
    return {
        name: to_wb(dense[sl, sl], estimate.modules[name])
        for name, sl in zip(estimate.modules, estimate.partition.subset_slices)
    }


def frobenius(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.norm(a - b))


SETTINGS = [("mean", None), ("sum", None), ("mean", 0.7), ("sum", 0.5)]


# ---------------------------------------------------------------------------- I5 / I7
@pytest.mark.parametrize("name", ["residual", "sequence", "cnn"])
@pytest.mark.parametrize("reduction,ema_decay", SETTINGS)
@pytest.mark.parametrize("pair", [(KFAC, EKFAC), (TKFAC, TEKFAC)], ids=["EKFAC", "TEKFAC"])
def test_eigenvalue_correction_is_frobenius_optimal_and_keeps_trace(
    pair: tuple[type[KroneckerEstimate], ...], reduction: str, ema_decay: float | None, name: str
) -> None:
    """I5/I7: D = diag(Qᵀ F Q), so ‖F − C_E‖_F ≤ ‖F − C‖_F and tr C_E = tr F, for F over several
    batches (exact average or EMA); with D := Kronecker eigenvalues the base method returns."""
    base, corrected = pair
    model, loss_fn, data = batches(name, "cross_entropy", reduction)
    # per_term: the identities need the exact per-example GGN factors for sequence outputs
    plain = fitted(base, model, loss_fn, data, fisher="type2", ema_decay=ema_decay,
                   type2_columns="per_term")
    estimate = fitted(corrected, model, loss_fn, data, fisher="type2", ema_decay=ema_decay,
                      type2_columns="per_term")
    reference = weighted_reference(estimate, data, reduction, ema_decay)
    dense = estimate.to_dense()
    assert frobenius(dense, reference) < frobenius(plain.to_dense(), reference)
    assert_close(estimate.trace(), torch.trace(reference), rtol=1e-10, what="trace")
    factors = estimate.factors()
    names = ("A", "G") if corrected is EKFAC else ("Phi", "Psi")
    blocks = layer_blocks(estimate, reference)
    plain_blocks = layer_blocks(plain, plain.to_dense())
    for layer, f in factors.items():
        q = torch.kron(f[f"eigvecs_{names[1]}"], f[f"eigvecs_{names[0]}"])
        fitted_diagonal = torch.diagonal(q.T @ blocks[layer] @ q)
        assert_close(f["diagonal"].reshape(-1), fitted_diagonal, rtol=1e-10, what="D = diag(QᵀFQ)")
        scale = f["delta"] if corrected is TEKFAC else 1.0
        kron_values = scale * torch.outer(f[f"eigvals_{names[1]}"], f[f"eigvals_{names[0]}"])
        assert_close((q * kron_values.reshape(-1)) @ q.T, plain_blocks[layer], rtol=1e-9,
                     what="Kronecker eigenvalues reproduce the base method")


# ---------------------------------------------------------------------------- I6
@pytest.mark.parametrize("name", ["mlp", "residual", "sequence"])
@pytest.mark.parametrize("reduction,ema_decay", SETTINGS)
def test_tkfac_keeps_trace_and_both_partial_traces(
    reduction: str, ema_decay: float | None, name: str
) -> None:
    """I6: tr_G C_TKFAC = tr_G F = Φ_raw, tr_A C_TKFAC = tr_A F = Ψ_raw, tr Φ = tr Ψ = 1 and
    tr C = tr F (per layer), also under the EMA of the undivided statistics; K-FAC misses the
    partial traces. (The sequence model feeds every position to its own loss term, so the
    position-decoupled F of TKFAC-expand is the exact F.)"""
    model, loss_fn, data = batches(name, "cross_entropy", reduction)
    estimate = fitted(TKFAC, model, loss_fn, data, fisher="type2", ema_decay=ema_decay)
    kfac = fitted(KFAC, model, loss_fn, data, fisher="type2", ema_decay=ema_decay)
    reference = layer_blocks(estimate, weighted_reference(estimate, data, reduction, ema_decay))
    mine = layer_blocks(estimate, estimate.to_dense())
    theirs = layer_blocks(kfac, kfac.to_dense())
    factors = estimate.factors()
    for layer, module in estimate.modules.items():
        d_out = module.weight.shape[0]
        shape = (d_out, -1, d_out, reference[layer].shape[0] // d_out)
        exact, approx, plain = (b[layer].reshape(shape) for b in (reference, mine, theirs))
        tr_out = [torch.einsum("iaib->ab", m) for m in (exact, approx, plain)]
        tr_in = [torch.einsum("aibi->ab", m) for m in (exact, approx, plain)]
        f = factors[layer]
        assert_close(tr_out[1], tr_out[0], rtol=1e-10, what="tr_G")
        assert_close(tr_in[1], tr_in[0], rtol=1e-10, what="tr_A")
        assert_close(f["Phi_raw"], tr_out[0], rtol=1e-10, what="Φ_raw = tr_G F")
        assert_close(f["Psi_raw"], tr_in[0], rtol=1e-10, what="Ψ_raw = tr_A F")
        assert_close(f["delta"], torch.trace(reference[layer]), rtol=1e-10, what="δ = tr F")
        one = torch.tensor(1.0, dtype=torch.float64)
        assert_close(torch.trace(f["Phi"]), one, what="tr Φ")
        assert_close(torch.trace(f["Psi"]), one, what="tr Ψ")
        assert float((tr_out[2] - tr_out[0]).abs().max()) > 1e-6  # K-FAC does not keep them


def test_tkfac_on_convolutions_keeps_trace_of_position_decoupled_fisher() -> None:
    """With shared positions (expand), δ is the trace of F_dec = c Σ_{n,t,k} (ā⊗g)(ā⊗g)ᵀ, the
    Fisher without cross-position terms that KFC approximates — computed here from per-position
    gradients by brute force."""
    model, loss_fn, x, y = make_case("cnn", "cross_entropy", "sum", batch=3)
    estimate = fitted(TKFAC, model, loss_fn, [(x, y)], fisher="type2")
    conv = model[0]
    outputs: list[Tensor] = []
    handle = conv.register_forward_hook(lambda m, a, out: outputs.append(out))
    logits = model(x)
    handle.remove()
    probs = logits.softmax(1).detach()
    total = torch.zeros((), dtype=torch.float64)
    patches = nn.functional.unfold(x, 3, padding=1, stride=2)  # [N, 18, T]
    norms_in = patches.square().sum(1) + 1.0  # ‖ā_{n,t}‖² with the bias coordinate
    for k in range(3):  # type-2 columns s_k = √p_k (e_k − p)
        s = probs[:, k : k + 1].sqrt() * (torch.eye(3, dtype=torch.float64)[k] - probs)
        (g,) = torch.autograd.grad(logits, outputs[0], s, retain_graph=True)
        total = total + (norms_in * g.square().sum(1).flatten(1)).sum()
    assert_close(estimate.factors()["0"]["delta"], total, rtol=1e-10, what="δ = tr F_dec")


# ---------------------------------------------------------------------------- I8
def damped_reference(estimate: KroneckerEstimate, damping: float, mode: str) -> Tensor:
    """The dense damped operator of each mode, built from factors() by Kronecker products."""
    part = estimate.partition
    dense = torch.zeros(part.numel, part.numel, dtype=torch.float64)
    factors = estimate.factors()
    root = math.sqrt(damping)
    conv_means = {
        layer: max(float(factors[layer]["diagonal"].sum()), 0.0)
        / factors[layer]["diagonal"].numel()
        for layer, module in estimate.modules.items() if isinstance(module, nn.Conv2d)
    }
    for (layer, module), sl in zip(estimate.modules.items(), part.subset_slices):
        f = factors[layer]
        size = sl.stop - sl.start
        eye = torch.eye(size, dtype=torch.float64)
        if mode == "pi":
            a, g = f["A"], f["G"]
            pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
            block = torch.kron(g + root / pi * torch.eye(g.shape[0], dtype=g.dtype),
                               a + root * pi * torch.eye(a.shape[0], dtype=a.dtype))
            dense[sl, sl] = from_wb(block, module)
        elif mode == "symmetric":
            s = torch.sqrt(f["delta"])
            eye_psi = torch.eye(f["Psi"].shape[0], dtype=torch.float64)
            eye_phi = torch.eye(f["Phi"].shape[0], dtype=torch.float64)
            block = torch.kron(s * f["Psi"] + root * eye_psi, s * f["Phi"] + root * eye_phi)
            dense[sl, sl] = from_wb(block, module)
        else:
            lam = damping
            if mode == "trace":
                lam = damping * conv_means.get(layer, max(conv_means.values()))
            dense[sl, sl] = estimate.to_dense()[sl, sl] + lam * eye
    return dense


@pytest.mark.parametrize(
    "method,mode",
    [(KFAC, "tikhonov"), (KFAC, "pi"), (EKFAC, "tikhonov"), (TKFAC, "tikhonov"),
     (TKFAC, "symmetric"), (TEKFAC, "tikhonov"), (TEKFAC, "trace")],
)
def test_damped_solve_equals_dense_solve(method: type[KroneckerEstimate], mode: str) -> None:
    """I8: every damping mode's solve inverts its own damped operator, built densely."""
    model, loss_fn, x, y = make_case("cnn", "cross_entropy", "mean", batch=3)
    estimate = fitted(method, model, loss_fn, [(x, y)], fisher="type2")
    part = estimate.partition
    damping = 0.3
    rhs = torch.randn(part.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = torch.linalg.solve(damped_reference(estimate, damping, mode), rhs)
    got = part.flatten(estimate.solve(part.unflatten(rhs), damping, damping_mode=mode))
    assert_close(got, expected, rtol=1e-9, what=f"{method.__name__} {mode} solve")


def test_pi_damping_expands_to_tikhonov_plus_cross_terms() -> None:
    """I8: (A + π√λI) ⊗ (G + √λ/π I) = A⊗G + λI + √λ(π I⊗G + π⁻¹ A⊗I)."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=4)
    estimate = fitted(KFAC, model, loss_fn, [(x, y)], fisher="type2")
    damping = 0.2
    reference = damped_reference(estimate, damping, "pi")
    f = estimate.factors()["2"]
    a, g = f["A"], f["G"]
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    eye_a = torch.eye(a.shape[0], dtype=torch.float64)
    eye_g = torch.eye(g.shape[0], dtype=torch.float64)
    expanded = (torch.kron(g, a) + damping * torch.kron(eye_g, eye_a)
                + math.sqrt(damping) * (pi * torch.kron(g, eye_a) + torch.kron(eye_g, a) / pi))
    sl = estimate.partition.subset_slices[1]
    assert_close(reference[sl, sl], from_wb(expanded, model[2]), rtol=1e-12)


def test_products_agree_with_dense() -> None:
    """matvec, matmat, diagonal, trace and reduced are consistent with to_dense."""
    model, loss_fn, x, y = make_case("cnn", "cross_entropy", "mean", batch=3)
    for method in METHODS:
        estimate = fitted(method, model, loss_fn, [(x, y)], fisher="type2")
        dense = estimate.to_dense()
        assert_estimate_close(estimate, dense, rtol=1e-10)
        part = estimate.partition
        diagonal = part.flatten(estimate.diagonal())
        assert_close(diagonal, torch.diagonal(dense), rtol=1e-10, what="diagonal")
        basis = torch.eye(part.numel, dtype=torch.float64)[:5]
        columns = part.flatten_batched(estimate.matmat(part.unflatten_batched(basis)))
        assert_close(columns, dense[:5], rtol=1e-10, what="matmat")
        assert bool((torch.linalg.eigvalsh(dense) > -1e-12).all())


def test_wb_index_matches_weight_and_bias_order() -> None:
    """The test helper's layout: entry (i, j) of [W | b] ↔ weight[i, j] or bias[i]."""
    index = wb_index(2, 3, bias=True)
    assert index.tolist() == [0, 1, 2, 4, 5, 6, 3, 7]
