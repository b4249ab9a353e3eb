"""Loss quantities against autograd: Hessian square roots, gradients, MC sampling, scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib.losses import LossFunction, all_finite, categorical_draws
from curvlib.testing import assert_close

# (loss, outputs shape, targets maker)
SHAPES = {
    "cross_entropy": [(4, 3), (2, 3, 5)],
    "mse": [(4,), (4, 3), (2, 5, 3)],
    "bce": [(4,), (4, 3), (2, 5, 3)],
}
CASES = [(loss, shape) for loss, shapes in SHAPES.items() for shape in shapes]
MODULES = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def _targets(loss: str, outputs: torch.Tensor) -> torch.Tensor:
    if loss == "cross_entropy":
        return torch.randint(0, outputs.shape[1], outputs.shape[:1] + outputs.shape[2:])
    if loss == "mse":
        return torch.randn_like(outputs)
    return torch.rand_like(outputs).round()


def _setup(loss: str, shape: tuple, reduction: str):
    torch.manual_seed(0)
    outputs = torch.randn(*shape, dtype=torch.float64)
    targets = _targets(loss, outputs)
    module = MODULES[loss](reduction=reduction)
    return LossFunction(module), module, outputs, targets


def _autograd_hessian(module, outputs, targets):
    return torch.autograd.functional.hessian(
        lambda f: module(f.view(outputs.shape), targets), outputs.reshape(-1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss,shape", CASES)
def test_hessian_sqrt_and_matvec(loss: str, shape: tuple, reduction: str) -> None:
    fn, module, outputs, targets = _setup(loss, shape, reduction)
    exact = _autograd_hessian(module, outputs, targets)
    c = fn.reduction_factor(outputs, targets)
    sqrt = fn.hessian_sqrt(outputs, targets).reshape(-1, outputs.numel())
    # per-term blocks: keep only entries of the same term (class axis varies within a term)
    rebuilt = c * sqrt.T @ sqrt
    block_mask = exact != 0
    assert_close(rebuilt * block_mask, exact, what="Σ s sᵀ on the loss blocks")
    v = torch.randn_like(outputs)
    assert_close(fn.hessian_matvec(outputs, targets, v).reshape(-1), exact @ v.reshape(-1),
                 what="hessian_matvec")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss,shape", CASES)
def test_gradients_and_reduction_factor(loss: str, shape: tuple, reduction: str) -> None:
    fn, module, outputs, targets = _setup(loss, shape, reduction)
    f = outputs.clone().requires_grad_()
    (grad,) = torch.autograd.grad(module(f, targets), f)
    c = fn.reduction_factor(outputs, targets)
    assert_close(c * fn.gradients(outputs, targets)[0], grad, what="empirical gradient")


@pytest.mark.parametrize("loss,shape", CASES)
def test_monte_carlo_is_unbiased(loss: str, shape: tuple) -> None:
    fn, module, outputs, targets = _setup(loss, shape, "sum")
    samples = fn.sample_gradients(outputs, mc_samples=40000, generator=torch.Generator()
                                  .manual_seed(1)).reshape(40000, -1)
    estimate = samples.T @ samples  # the 1/√M scaling makes this the sample mean of s sᵀ
    exact = _autograd_hessian(module, outputs, targets)
    assert_close(estimate * (exact != 0), exact, rtol=0.05, atol=0.02, what="E[s sᵀ]")


def test_ignore_index_changes_the_count_and_zeros_the_terms() -> None:
    module = nn.CrossEntropyLoss()
    fn = LossFunction(module)
    outputs = torch.randn(2, 3, 4, dtype=torch.float64)
    targets = torch.tensor([[0, 1, -100, 2], [-100, 1, 1, 0]])
    assert fn.reduction_factor(outputs, targets) == 1 / 6
    exact = _autograd_hessian(module, outputs, targets)
    sqrt = fn.hessian_sqrt(outputs, targets).reshape(3, -1)
    assert_close(fn.reduction_factor(outputs, targets) * sqrt.T @ sqrt * (exact != 0), exact)
    f = outputs.clone().requires_grad_()
    (grad,) = torch.autograd.grad(module(f, targets), f)
    assert_close(fn.gradients(outputs, targets)[0] / 6, grad)


@pytest.mark.parametrize(
    "values,finite",
    [([1.0, -2.0], True), ([], True), ([1.0, float("nan")], False), ([float("inf"), 0.0], False),
     ([float("inf"), -float("inf")], False), ([3e38, 3e38], True)],  # the last sum overflows
)
def test_all_finite(values: list[float], finite: bool) -> None:
    assert all_finite(torch.tensor(values, dtype=torch.float32)) is finite


def test_categorical_draws_follow_the_probabilities() -> None:
    """Each class is drawn with its probability (here within 4 standard errors over 200,000
    draws per row), a class of zero probability never, whatever the row's scale."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3],
                          [0.9, 0.0, 0.0, 0.0, 0.1],
                          [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    n = 200_000
    draws = categorical_draws(probs, n, torch.Generator().manual_seed(0))
    assert draws.shape == (n, 3)
    counts = torch.stack([torch.bincount(row, minlength=5) for row in draws.T]).double()
    frequencies = counts / n
    assert torch.equal(counts[probs == 0], torch.zeros_like(counts[probs == 0]))
    standard_error = (probs * (1 - probs) / n).sqrt()
    assert bool(((frequencies - probs).abs() <= 4 * standard_error + 1e-12).all())
