"""Kronecker estimates where they are exact (kfac_family.md §4 I2–I4, I9, I10, I12), float64.

References are the dense autograd GGN and empirical Fisher of curvlib.testing, restricted to the
estimate's block diagonal (one block per layer). Helpers shared by the other test_kron files live
here.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from curvlib import EKFAC, KFAC, TEKFAC, TKFAC, Partition
from curvlib.kron import KroneckerEstimate
from curvlib.testing import assert_close, assert_estimate_close, dense_empirical_fisher, dense_ggn
from tests.cases import make_case

METHODS: list[type[KroneckerEstimate]] = [KFAC, EKFAC, TKFAC, TEKFAC]


# ---------------------------------------------------------------------------- helpers
def block_diagonal(dense: Tensor, partition: Partition) -> Tensor:
    """The layer-block-diagonal part of a P×P matrix in dense order."""
    out = torch.zeros_like(dense)
    for sl in partition.subset_slices:
        out[sl, sl] = dense[sl, sl]
    return out


def fitted(
    method: type[KroneckerEstimate], model: nn.Module, loss_fn: nn.Module,
    batches: list[tuple[Tensor, Tensor]], **kwargs: object,
) -> KroneckerEstimate:
    """An estimate updated with every batch."""
    estimate = method(model, loss_fn, **kwargs)
    for x, y in batches:
        estimate.update(x, y)
    return estimate


def ggn_blocks(estimate: KroneckerEstimate, x: Tensor, y: Tensor) -> Tensor:
    """The exact GGN of one batch, restricted to the estimate's layer blocks."""
    ref = dense_ggn(estimate.model, estimate.loss.module, x, y, estimate.partition)
    return block_diagonal(ref, estimate.partition)


def wb_index(d_out: int, d_in: int, bias: bool) -> Tensor:
    """For each entry of a layer in dense order (weight row-major, then bias), its row-major index
    in the [W | b] matrix of d_out × (d_in + bias) — written independently of curvlib.kron."""
    cols = d_in + int(bias)
    weight = (torch.arange(d_out)[:, None] * cols + torch.arange(d_in)[None, :]).reshape(-1)
    if not bias:
        return weight
    return torch.cat([weight, torch.arange(d_out) * cols + d_in])


def to_wb(block: Tensor, module: nn.Module) -> Tensor:
    """A layer's block in dense order → the same block in the row-major [W | b] layout."""
    d_out = module.weight.shape[0]
    index = wb_index(d_out, module.weight[0].numel(), module.bias is not None)
    out = torch.zeros_like(block)
    out[index[:, None], index[None, :]] = block
    return out


def from_wb(block: Tensor, module: nn.Module) -> Tensor:
    """Inverse of :func:`to_wb`."""
    index = wb_index(module.weight.shape[0], module.weight[0].numel(), module.bias is not None)
    return block[index][:, index]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


# ---------------------------------------------------------------------------- models
def deep_linear(widths: tuple[int, ...] = (5, 4, 3, 2)) -> nn.Module:
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
    return nn.Sequential(*layers).double()


class TokenNet(nn.Module):
    """Two linear layers on [N, T, D] tokens; ``pool`` averages the tokens before the loss."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        out = self.second(self.first(x))
        return out.mean(dim=1) if self.pool else out


def conv_net(pool: bool) -> nn.Module:
    """Linear conv network: a 3×3 convolution, then a per-location 1×1 convolution (expand
    setting: a loss term per location), or global average pooling and a linear head (reduce)."""
    if pool:
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)
        ).double()
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Conv2d(3, 2, 1)).double()


# ---------------------------------------------------------------------------- I2
@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
@pytest.mark.parametrize("name", ["mlp", "residual"])
def test_one_datum_all_methods_exact(
    name: str, loss: str, reduction: str, fisher: str, copies: int
) -> None:
    """I2: with one datum (also repeated) every block is one Kronecker product: all four exact."""
    model, loss_fn, x, y = make_case(name, loss, reduction, batch=1)
    x, y = x.expand(copies, *x.shape[1:]), y.expand(copies, *y.shape[1:])
    reference = None
    for method in METHODS:
        estimate = fitted(method, model, loss_fn, [(x, y)], fisher=fisher)
        if reference is None:
            dense = (dense_ggn if fisher == "type2" else dense_empirical_fisher)(
                model, loss_fn, x, y, estimate.partition)
            reference = block_diagonal(dense, estimate.partition)
        assert_estimate_close(estimate, reference, rtol=1e-10)


# ---------------------------------------------------------------------------- I3
@pytest.mark.parametrize("batch", [3, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_mse_type2_exact_for_any_batch(reduction: str, batch: int) -> None:
    """I3: G = 2c W_{>l}ᵀW_{>l} is data-independent, so every block is one Kronecker product."""
    torch.manual_seed(1)
    model = deep_linear()
    loss_fn = nn.MSELoss(reduction=reduction)
    x, y = torch.randn(batch, 5, dtype=torch.float64), torch.randn(batch, 2, dtype=torch.float64)
    reference = None
    for method in METHODS:
        estimate = fitted(method, model, loss_fn, [(x, y)], fisher="type2")
        reference = ggn_blocks(estimate, x, y) if reference is None else reference
        assert_estimate_close(estimate, reference, rtol=1e-10)
    # ... but the empirical Fisher is not: K-FAC-EF ≠ EF.
    ef = fitted(KFAC, model, loss_fn, [(x, y)], fisher="empirical")
    dense_ef = dense_empirical_fisher(model, loss_fn, x, y, ef.partition)
    assert relative_error(ef.to_dense(), block_diagonal(dense_ef, ef.partition)) > 1e-2


# ---------------------------------------------------------------------------- I4
SHARING_CASES = ["tokens", "conv"]


def sharing_case(kind: str, pool: bool, batch: int) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(2)
    if kind == "tokens":
        return TokenNet(pool).double(), torch.randn(batch, 5, 3, dtype=torch.float64)
    return conv_net(pool), torch.randn(batch, 2, 5, 5, dtype=torch.float64)


@pytest.mark.parametrize("batch", [2, 5])
@pytest.mark.parametrize("kind", SHARING_CASES)
@pytest.mark.parametrize("setting", ["expand", "reduce"])
def test_weight_sharing_flavour_exact_in_its_setting(setting: str, kind: str, batch: int) -> None:
    """I4: deep linear + MSE: K-FAC-expand is exact in the expand setting (a loss term per shared
    position), K-FAC-reduce in the reduce setting (mean pooling), the crossed pairings are not."""
    model, x = sharing_case(kind, pool=setting == "reduce", batch=batch)
    loss_fn = nn.MSELoss(reduction="mean")
    with torch.no_grad():
        y = torch.randn_like(model(x))
    reference = None
    for method in METHODS:
        # per_term: EKFAC/TEKFAC fit per-example gradients, exact only with the split vectors
        estimate = fitted(method, model, loss_fn, [(x, y)], fisher="type2",
                          weight_sharing=setting, type2_columns="per_term")
        reference = ggn_blocks(estimate, x, y) if reference is None else reference
        assert_estimate_close(estimate, reference, rtol=1e-9)
    other = "reduce" if setting == "expand" else "expand"
    crossed = fitted(KFAC, model, loss_fn, [(x, y)], fisher="type2", weight_sharing=other)
    assert relative_error(crossed.to_dense(), reference) > 1e-2


# ---------------------------------------------------------------------------- I9
@pytest.mark.parametrize("method", [KFAC, EKFAC])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_mc_converges_to_type2(loss: str, method: type[KroneckerEstimate]) -> None:
    """I9: E[G_MC] = G_type2; with many samples the MC estimate is close (Monte-Carlo tolerance)."""
    model, loss_fn, x, y = make_case("mlp", loss, "mean", batch=4)
    exact = fitted(method, model, loss_fn, [(x, y)], fisher="type2").to_dense()
    mc = fitted(method, model, loss_fn, [(x, y)], fisher="mc", mc_samples=20000, seed=3)
    error = relative_error(mc.to_dense(), exact)
    assert error < 0.04, error
    few = fitted(method, model, loss_fn, [(x, y)], fisher="mc", mc_samples=1, seed=3)
    assert relative_error(few.to_dense(), exact) > error  # the tolerance is not vacuous


# ---------------------------------------------------------------------------- I10
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "name,loss,divisor",
    [("mlp", "cross_entropy", lambda n: n), ("mlp", "mse", lambda n: 3 * n),
     ("sequence", "cross_entropy", lambda n: 4 * n), ("cnn", "bce", lambda n: 3 * n)],
)
def test_mean_is_sum_over_number_of_terms(
    name: str, loss: str, divisor: object, method: type[KroneckerEstimate]
) -> None:
    """I10: estimate(mean) = estimate(sum) / (N · terms per example [· C for MSE/BCE])."""
    batch = 3
    model, mean_loss, x, y = make_case(name, loss, "mean", batch=batch)
    sum_loss = type(mean_loss)(reduction="sum")
    mean = fitted(method, model, mean_loss, [(x, y)], fisher="type2").to_dense()
    total = fitted(method, model, sum_loss, [(x, y)], fisher="type2").to_dense()
    assert_close(mean, total / divisor(batch), rtol=1e-10, what="mean vs sum")


# ---------------------------------------------------------------------------- I12
@pytest.mark.parametrize("method", METHODS)
def test_bias_folding_and_frozen_parts(method: type[KroneckerEstimate]) -> None:
    """I12: [W | b] with a homogeneous coordinate is the joint block (cross terms included, I2
    above); a bias alone has A = 1; a frozen bias is not folded in; a bias-free layer works."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "sum", batch=1)
    model[0].weight.requires_grad_(False)  # layer "0": bias only
    model[2].bias.requires_grad_(False)  # layer "2": weight only
    estimate = fitted(method, model, loss_fn, [(x, y)], fisher="type2")
    assert [len(g) for g in estimate.partition.groups] == [1, 1]
    assert_estimate_close(estimate, ggn_blocks(estimate, x, y), rtol=1e-10)
    first = estimate.factors()["0"]
    if method in (KFAC, EKFAC):
        assert_close(first["A"], torch.ones(1, 1, dtype=torch.float64), what="bias-only A")
    assert estimate.factors()["2"]["diagonal"].shape == (3, 4)  # no homogeneous column

    no_bias = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)).double()
    estimate = fitted(method, no_bias, loss_fn, [(x, y)], fisher="type2")
    assert_estimate_close(estimate, ggn_blocks(estimate, x, y), rtol=1e-10)


def test_homogeneous_coordinate_in_a() -> None:
    """The last row of A is the mean input with a 1 in the corner (the folded bias)."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=6)
    a = fitted(KFAC, model, loss_fn, [(x, y)], fisher="type2").factors()["0"]["A"]
    assert_close(a[-1, :-1], x.mean(0), what="A's bias row")
    assert_close(a[-1, -1], torch.tensor(1.0, dtype=torch.float64), what="A's corner")
    assert_close(a[:-1, :-1], x.T @ x / 6, what="A's weight block")
