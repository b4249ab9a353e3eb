"""ExactHessian and ExactGGN against dense autograd references (curvlib.testing), in float64."""

from __future__ import annotations

import itertools

import pytest
import torch

from curvlib import ExactGGN, ExactHessian, Partition
from curvlib.testing import (
    assert_close,
    assert_estimate_close,
    dense_ggn,
    dense_hessian,
)
from tests.cases import make_case

MODELS = ["mlp", "cnn", "residual", "sequence", "conv1d", "shared"]
SETTINGS = list(itertools.product(["mean", "sum"], [1, 4]))


@pytest.mark.parametrize("reduction,batch", SETTINGS)
@pytest.mark.parametrize("name", MODELS)
def test_exact_hessian_equals_autograd(name: str, reduction: str, batch: int) -> None:
    model, loss_fn, x, y = make_case(name, "cross_entropy", reduction, batch)
    estimate = ExactHessian(model, loss_fn)
    estimate.update(x, y)
    assert_estimate_close(estimate, dense_hessian(model, loss_fn, x, y))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
@pytest.mark.parametrize("reduction,batch", SETTINGS)
@pytest.mark.parametrize("name", MODELS)
def test_exact_ggn_equals_jthj(name: str, reduction: str, batch: int, loss: str) -> None:
    model, loss_fn, x, y = make_case(name, loss, reduction, batch)
    estimate = ExactGGN(model, loss_fn)
    estimate.update(x, y)
    assert_estimate_close(estimate, dense_ggn(model, loss_fn, x, y))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batches_are_weighted_as_the_reduction_says(reduction: str) -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", reduction, batch=5)
    estimate = ExactHessian(model, loss_fn)
    estimate.update(x[:2], y[:2])
    estimate.update(x[2:], y[2:])
    # the curvature of the loss over all examples at once
    assert_close(estimate.to_dense(), dense_hessian(model, loss_fn, x, y), what="two batches")


def test_partition_by_module_and_subset_of_parameters() -> None:
    model, loss_fn, x, y = make_case("cnn", "mse", "mean", batch=2)
    part = Partition.by_module(model)
    assert part.names == ["0", "2", "4"]
    estimate = ExactGGN(model, loss_fn, part)
    estimate.update(x, y)
    assert_estimate_close(estimate, dense_ggn(model, loss_fn, x, y, part))
    head_only = Partition([[model[4].weight]], names=["head.weight"])
    estimate = ExactHessian(model, loss_fn, head_only)
    estimate.update(x, y)
    assert_estimate_close(estimate, dense_hessian(model, loss_fn, x, y, head_only))


@pytest.mark.parametrize("estimator", [ExactHessian, ExactGGN])
def test_solve_dense_and_cg_agree_with_dense_solve(estimator: type) -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=4)
    estimate = estimator(model, loss_fn)
    estimate.update(x, y)
    part = estimate.partition
    dense = estimate.to_dense()
    rhs = part.unflatten(torch.randn(part.numel, dtype=torch.float64))
    damping = 10.0  # makes the (indefinite) Hessian positive definite for CG
    expected = torch.linalg.solve(dense + damping * torch.eye(part.numel, dtype=dense.dtype),
                                  part.flatten(rhs))
    assert_close(part.flatten(estimate.solve(rhs, damping)), expected, what="dense solve")
    estimate.dense_solve_max = 0  # force conjugate gradients
    assert_close(part.flatten(estimate.solve(rhs, damping)), expected, rtol=1e-6,
                 what="CG solve")


def test_solve_singular_without_damping_raises() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=1)
    estimate = ExactGGN(model, loss_fn)  # rank ≤ C − 1 = 2 with one example
    estimate.update(x, y)
    v = estimate.partition.unflatten(torch.ones(estimate.partition.numel, dtype=torch.float64))
    with pytest.raises(ValueError, match="singular"):
        estimate.solve(v, damping=0.0)
    with pytest.raises(ValueError, match="damping"):
        estimate.solve(v, damping=-1.0)


def test_as_linear_operator_matches_dense() -> None:
    model, loss_fn, x, y = make_case("residual", "mse", "sum", batch=3)
    estimate = ExactGGN(model, loss_fn)
    estimate.update(x, y)
    op = estimate.as_linear_operator()
    dense = estimate.to_dense().numpy()
    probe = torch.randn(estimate.partition.numel, 3, dtype=torch.float64).numpy()
    assert abs(op @ probe - dense @ probe).max() < 1e-10
    assert abs(op.matvec(probe[:, 0]) - dense @ probe[:, 0]).max() < 1e-10


def test_state_dict_round_trip() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=3)
    first = ExactGGN(model, loss_fn)
    first.update(x, y)
    second = ExactGGN(model, loss_fn)
    second.load_state_dict(first.state_dict())
    assert_close(second.to_dense(), first.to_dense(), what="restored")
