"""DiagGGN and DiagHessian against the diagonals of dense autograd references, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from curvlib import DiagGGN, DiagHessian, Partition
from curvlib.diagnostics.diagonal import DiagonalEstimate
from curvlib.testing import assert_close, assert_estimate_close, dense_ggn, dense_hessian
from tests.cases import make_case

ESTIMATES = [(DiagGGN, dense_ggn), (DiagHessian, dense_hessian)]


def accepted_layers_models() -> list[nn.Module]:
    """Every layer type the BackPACK path accepts, over two small nn.Sequential models."""
    torch.manual_seed(0)
    convolutional = nn.Sequential(
        nn.ZeroPad2d(1), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 1, 2),
        nn.Flatten(), nn.Linear(4, 3),
    )
    elementwise = nn.Sequential(
        nn.Flatten(), nn.Linear(36, 3), nn.Sigmoid(), nn.Linear(3, 3), nn.ELU(), nn.LeakyReLU(),
        nn.SELU(), nn.LogSigmoid(), nn.Tanh(), nn.Linear(3, 3),
    )
    return [convolutional.double(), elementwise.double()]


def flat(vector: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in vector])


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backpack_path_equals_dense_diagonal(loss: str, reduction: str) -> None:
    model, loss_fn, x, y = make_case("mlp", loss, reduction, batch=4)
    for estimate_cls, reference in ESTIMATES:
        estimate = estimate_cls(model, loss_fn, method="backpack")
        assert estimate.method_used == "backpack" and estimate.fallback_reason is None
        estimate.update(x[:1], y[:1])
        estimate.update(x[1:], y[1:])  # two batches weigh as one, as the reduction says
        expected = torch.diagonal(reference(model, loss_fn, x, y))
        assert_close(flat(estimate.diagonal()), expected, what=estimate_cls.__name__)
        assert_estimate_close(estimate, torch.diag(expected))


def test_backpack_path_on_a_convolution() -> None:
    model, loss_fn, x, y = make_case("conv1d", "cross_entropy", "mean", batch=3)
    estimate = DiagGGN(model, loss_fn)
    assert estimate.method_used == "backpack"
    estimate.update(x, y)
    expected = torch.diagonal(dense_ggn(model, loss_fn, x, y))
    assert_close(flat(estimate.diagonal()), expected, what="DiagGGN on Conv1d")


@pytest.mark.parametrize("estimate_cls,reference", ESTIMATES)
@pytest.mark.parametrize("which", [0, 1])
def test_backpack_path_on_every_accepted_layer(estimate_cls, reference, which: int) -> None:
    model = accepted_layers_models()[which]
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    loss_fn = nn.CrossEntropyLoss()
    estimate = estimate_cls(model, loss_fn)
    assert estimate.method_used == "backpack"
    estimate.update(x, y)
    expected = torch.diagonal(reference(model, loss_fn, x, y))
    assert_close(flat(estimate.diagonal()), expected, what=estimate_cls.__name__)


def test_backpack_path_with_binary_cross_entropy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.rand(5, 1, dtype=torch.float64).round()
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    for estimate_cls, reference in ESTIMATES:
        estimate = estimate_cls(model, loss_fn)
        estimate.update(x, y)
        assert estimate.method_used == "backpack"
        expected = torch.diagonal(reference(model, loss_fn, x, y))
        assert_close(flat(estimate.diagonal()), expected, what=estimate_cls.__name__)


def test_backpack_leaves_the_model_untouched() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=3)
    before = {name: dict(vars(module)) for name, module in model.named_modules()}
    estimate = DiagGGN(model, loss_fn, method="backpack")
    estimate.update(x, y)
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._backward_hooks, name
        assert set(vars(module)) == set(before[name]), name
        assert not hasattr(module, "_backpack_extend"), name
    for p in model.parameters():
        assert p.grad is None and not hasattr(p, "diag_ggn_exact")


@pytest.mark.parametrize("estimate_cls,reference", ESTIMATES)
@pytest.mark.parametrize("name", ["residual", "sequence"])
def test_hutchinson_converges_within_its_standard_error(estimate_cls, reference,
                                                        name: str) -> None:
    """Entry i of the Hutchinson diagonal has variance Σ_{j≠i} C_ij² / m (Rademacher probes)."""
    model, loss_fn, x, y = make_case(name, "cross_entropy", "mean", batch=3)
    samples = 1000
    estimate = estimate_cls(model, loss_fn, num_samples=samples, chunk_size=samples, seed=1)
    assert estimate.method_used == "hutchinson"  # auto: BackPACK cannot run these models
    assert estimate.fallback_reason is not None
    estimate.update(x, y)
    dense = reference(model, loss_fn, x, y)
    off = dense - torch.diag(torch.diagonal(dense))
    standard_error = (off.square().sum(dim=1) / samples).sqrt()
    error = (flat(estimate.diagonal()) - torch.diagonal(dense)).abs()
    assert bool((error <= 5 * standard_error + 1e-12).all()), float((error / standard_error).max())


def test_hutchinson_error_shrinks_with_more_samples() -> None:
    model, loss_fn, x, y = make_case("residual", "mse", "sum", batch=3)
    expected = torch.diagonal(dense_ggn(model, loss_fn, x, y))
    errors = []
    for samples in (16, 1024):
        estimate = DiagGGN(model, loss_fn, method="hutchinson", num_samples=samples,
                           chunk_size=1024)
        estimate.update(x, y)
        errors.append(float((flat(estimate.diagonal()) - expected).norm()))
    assert errors[1] < 0.3 * errors[0]


def test_hutchinson_is_exact_for_a_diagonal_curvature() -> None:
    """The bias block of a linear layer under summed MSE is Σ_n 2·I = 8·I (N = 4): for a diagonal
    C every probe gives z ⊙ C z = diag(C) exactly."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    loss_fn = nn.MSELoss(reduction="sum")
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    part = Partition([[model.bias]], names=["bias"])
    estimate = DiagGGN(model, loss_fn, part, method="hutchinson", num_samples=3)
    estimate.update(x, y)
    assert_close(estimate.diagonal()[0], torch.full((2,), 8.0, dtype=torch.float64))


def test_auto_falls_back_for_a_batch_backpack_cannot_handle() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "sum", batch=3)
    loss_fn = nn.CrossEntropyLoss(reduction="sum", ignore_index=1)
    estimate = DiagGGN(model, loss_fn)
    assert estimate.method_used == "backpack"
    y = torch.tensor([0, 1, 2])
    estimate.update(x, y)  # BackPACK would count the ignored target
    assert estimate.method_used == "hutchinson"
    assert "ignore_index" in estimate.fallback_reason
    with pytest.raises(ValueError, match="ignore_index"):
        DiagGGN(model, loss_fn, method="backpack").update(x, y)


def test_state_dict_round_trip_and_reduced() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=4)
    estimate = DiagHessian(model, loss_fn)
    estimate.update(x, y)
    restored = DiagHessian(model, loss_fn)
    restored.load_state_dict(estimate.state_dict())
    assert_close(restored.to_dense(), estimate.to_dense())
    assert restored.num_data == 4
    u = [torch.randn_like(p) for p in estimate.partition.parameters]
    expected = torch.diag(torch.stack([(d * v * v).sum() for d, v in
                                       zip(estimate.diagonal(), u)]))
    assert_close(estimate.reduced(u), expected)
    with pytest.raises(ValueError, match="this estimate uses 'sum'"):
        DiagHessian(model, nn.CrossEntropyLoss(reduction="sum")).load_state_dict(
            estimate.state_dict())


def test_solve_is_exact_and_refuses_a_zero_entry() -> None:
    model, loss_fn, x, y = make_case("mlp", "mse", "mean", batch=3)
    estimate = DiagGGN(model, loss_fn)
    estimate.update(x, y)
    v = [torch.randn_like(p) for p in estimate.partition.parameters]
    solved = estimate.solve(v, damping=0.1)
    assert_close(flat(estimate.matvec(solved)) + 0.1 * flat(solved), flat(v))
    # zero inputs: the first layer's weight does not act, its GGN diagonal is zero
    zero = DiagGGN(model, loss_fn)
    zero.update(torch.zeros_like(x), y)
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        zero.solve(v)


def test_bad_arguments() -> None:
    model, loss_fn, _, _ = make_case("residual", "cross_entropy", "mean", batch=2)
    with pytest.raises(ValueError, match="method must be one of"):
        DiagGGN(model, loss_fn, method="exact")
    with pytest.raises(ValueError, match="num_samples"):
        DiagGGN(model, loss_fn, num_samples=0)
    with pytest.raises(ValueError, match=r"method='backpack' is not possible.*Residual"):
        DiagGGN(model, loss_fn, method="backpack")
    with pytest.raises(ValueError, match="Unsupported loss L1Loss"):
        DiagGGN(model, nn.L1Loss())
    with pytest.raises(ValueError, match="no data"):
        DiagHessian(model, loss_fn).diagonal()
    shared = nn.Linear(3, 3).double()
    with pytest.raises(ValueError, match="appears twice"):
        DiagGGN(nn.Sequential(shared, nn.Tanh(), shared), nn.MSELoss(), method="backpack")
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    with pytest.raises(ValueError, match="shares a parameter"):
        DiagGGN(tied, nn.MSELoss(), method="backpack")
    with pytest.raises(ValueError, match="in-place"):
        DiagGGN(nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True)), nn.MSELoss(),
                method="backpack")
    assert isinstance(DiagHessian(model, loss_fn), DiagonalEstimate)
