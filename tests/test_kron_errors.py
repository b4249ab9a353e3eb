"""Bad input to the Kronecker estimates raises a ValueError that names the culprit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib import EKFAC, KFAC, TEKFAC, TKFAC
from curvlib.kron import KroneckerEstimate
from tests.cases import make_case
from tests.test_kron_exact import METHODS, fitted


@pytest.fixture
def mlp() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    return make_case("mlp", "cross_entropy", "mean", batch=3)


def test_unsupported_module_is_named_unless_excluded() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()
    for method in METHODS:
        with pytest.raises(ValueError, match=r"'1'.*LayerNorm"):
            method(model, nn.CrossEntropyLoss())
    estimate = KFAC(model, nn.CrossEntropyLoss(), fisher="type2", include=[model[0], model[2]])
    assert list(estimate.modules) == ["0", "2"]
    assert estimate.partition.names == ["0", "2"]
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    estimate.update(x, y)
    assert estimate.to_dense().shape == (15 + 8, 15 + 8)


def test_grouped_convolution_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0'.*groups=2"):
        KFAC(model, nn.CrossEntropyLoss())


def test_shared_parameter_between_modules_is_rejected() -> None:
    first, second = nn.Linear(3, 3), nn.Linear(3, 2)
    tied = nn.Linear(3, 3)
    tied.weight = first.weight
    model = nn.Sequential(first, tied, second)
    with pytest.raises(ValueError, match="'1' shares a parameter"):
        KFAC(model, nn.CrossEntropyLoss())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fisher": "exact"}, "fisher"),
        ({"weight_sharing": "both"}, "weight_sharing"),
        ({"mc_samples": 0}, "mc_samples"),
        ({"fisher": "type2", "mc_samples": 4}, "mc_samples=4 only applies"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"dtype": torch.float16}, "float32 or better"),
    ],
)
def test_bad_constructor_arguments(mlp: tuple, kwargs: dict, match: str) -> None:
    model, loss_fn, _, _ = mlp
    with pytest.raises(ValueError, match=match):
        KFAC(model, loss_fn, **kwargs)


def test_bad_loss_and_trace_floor(mlp: tuple) -> None:
    model, _, _, _ = mlp
    with pytest.raises(ValueError, match="L1Loss"):
        EKFAC(model, nn.L1Loss())
    with pytest.raises(ValueError, match="trace_floor"):
        TEKFAC(model, nn.CrossEntropyLoss(), trace_floor=-1.0)


def test_reads_before_data_and_bad_vectors(mlp: tuple) -> None:
    model, loss_fn, x, y = mlp
    estimate = TKFAC(model, loss_fn, fisher="type2")
    with pytest.raises(ValueError, match="no statistics for module '0'"):
        estimate.to_dense()
    estimate.update(x, y)
    with pytest.raises(ValueError, match="v has 3 tensors"):
        estimate.matvec([p.detach() for p in model.parameters()][:3])
    wrong = [torch.zeros(2, 2, dtype=torch.float64) for _ in model.parameters()]
    with pytest.raises(ValueError, match="shape"):
        estimate.solve(wrong, 1.0)
    v = [torch.ones_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match="damping_mode"):
        estimate.solve(v, 1.0, damping_mode="pi")
    with pytest.raises(ValueError, match="damping"):
        estimate.solve(v, -1.0)


def test_non_finite_inputs_are_named(mlp: tuple) -> None:
    model, loss_fn, x, y = mlp
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        KFAC(model, loss_fn, fisher="type2").update(x, y)


def test_record_needs_exactly_one_forward(mlp: tuple) -> None:
    model, loss_fn, x, y = mlp
    estimate = KFAC(model, loss_fn, fisher="type2")
    with pytest.raises(ValueError, match="0 forward passes"), estimate.record(y):
        pass
    with pytest.raises(ValueError, match="2 forward passes"), estimate.record(y):
        model(x)
        model(x)
    with (pytest.raises(ValueError, match="does not require grad"), estimate.record(y),
          torch.no_grad()):
        model(x)


def test_empirical_flush_before_backward_is_an_error(mlp: tuple) -> None:
    model, loss_fn, x, y = mlp
    estimate = KFAC(model, loss_fn, fisher="empirical")
    with estimate.record(y):
        model(x)
    with pytest.raises(ValueError, match="no gradient reached module '0'"):
        estimate.to_dense()


def test_training_batchnorm_is_rejected_for_per_example_methods() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    layers = [model[0], model[2]]
    with pytest.raises(ValueError, match=r"'1'.*BatchNorm1d.*training mode"):
        EKFAC(model, nn.CrossEntropyLoss(), include=layers).update(x, y)
    KFAC(model, nn.CrossEntropyLoss(), include=layers).update(x, y)  # factors do not need it
    model.eval()
    TEKFAC(model, nn.CrossEntropyLoss(), include=layers).update(x, y)


def test_unused_layer_is_named() -> None:
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(ValueError, match="'unused' was not called"):
        KFAC(Partial(), nn.CrossEntropyLoss()).update(torch.randn(4, 3), torch.randint(0, 2, (4,)))


@pytest.mark.parametrize("method", [KFAC, TEKFAC])
def test_load_state_dict_from_another_configuration(mlp: tuple, method: type) -> None:
    model, loss_fn, x, y = mlp
    state = fitted(EKFAC, model, loss_fn, [(x, y)], fisher="type2").state_dict()
    with pytest.raises(ValueError, match="method"):
        method(model, loss_fn, fisher="type2").load_state_dict(state)
    with pytest.raises(ValueError, match="fisher"):
        EKFAC(model, loss_fn, fisher="mc").load_state_dict(state)
    with pytest.raises(ValueError, match="not a Kronecker state"):
        EKFAC(model, loss_fn).load_state_dict({"batches": []})


def test_estimates_are_curvature_estimates(mlp: tuple) -> None:
    model, loss_fn, _, _ = mlp
    for method in METHODS:
        estimate: KroneckerEstimate = method(model, loss_fn)
        assert repr(estimate).startswith(method.__name__)


def test_small_positive_damping_next_to_large_eigenvalues_solves() -> None:
    """A damping far below the largest eigenvalue is not 'singular' (float32, wide layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 20), nn.Tanh(), nn.Linear(20, 10))
    x, y = 30.0 * torch.randn(64, 300), torch.randint(0, 10, (64,))
    estimate = KFAC(model, nn.CrossEntropyLoss(reduction="sum"), fisher="type2")
    estimate.update(x, y)
    largest = float(estimate.to_dense().diagonal().max())
    v = [torch.randn_like(p) for p in estimate.partition.parameters]
    assert all(bool(torch.isfinite(t).all()) for t in estimate.solve(v, damping=1e-6 * largest))
    damping = 1e-2 * largest  # a conditioning float32 resolves: the solve inverts C + λI
    solved = estimate.solve(v, damping=damping)
    back = estimate.partition.add(estimate.matvec(solved), solved, alpha=damping)
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(back, v))
    assert rel < 1e-3
