"""Bad input raises a clear ValueError naming what is wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib import ExactGGN, ExactHessian, Partition
from curvlib.capture import supported_layers
from curvlib.losses import LossFunction
from tests.cases import make_case


@pytest.mark.parametrize(
    "loss_fn,message",
    [
        (nn.L1Loss(), "Unsupported loss L1Loss"),
        (nn.NLLLoss(), "Unsupported loss NLLLoss"),
        (nn.CrossEntropyLoss(reduction="none"), "reduction='none'"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing"),
        (nn.CrossEntropyLoss(weight=torch.ones(3)), "class weights"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "pos_weight"),
    ],
)
def test_unsupported_loss(loss_fn: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossFunction(loss_fn)
    model = nn.Linear(2, 3)
    with pytest.raises(ValueError, match=message):
        ExactGGN(model, loss_fn)


def test_vector_shape_and_count_mismatch() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=2)
    estimate = ExactHessian(model, loss_fn)
    estimate.update(x, y)
    good = [torch.zeros_like(p) for p in estimate.partition.parameters]
    with pytest.raises(ValueError, match="has 3 tensors but the partition has 4"):
        estimate.matvec(good[:3])
    with pytest.raises(ValueError, match=r"parameter '0.bias' has shape \(4,\)"):
        estimate.matvec([good[0], torch.zeros(5, dtype=torch.float64), *good[2:]])
    reordered = [good[1], good[0], *good[2:]]
    with pytest.raises(ValueError, match="does not match the partition"):
        estimate.reduced(reordered)
    with pytest.raises(ValueError, match="list of tensors"):
        estimate.matvec(torch.zeros(3))


def test_non_finite_loss() -> None:
    model, loss_fn, x, y = make_case("mlp", "mse", "mean", batch=2)
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        ExactHessian(model, loss_fn).update(x, y)


def test_no_data_yet() -> None:
    model, loss_fn, _, _ = make_case("mlp")
    with pytest.raises(ValueError, match="call update"):
        ExactGGN(model, loss_fn).to_dense()


def test_mismatched_targets() -> None:
    model, loss_fn, x, y = make_case("mlp", "mse", "mean", batch=2)
    with pytest.raises(ValueError, match=r"do not broadcast|differ from outputs"):
        ExactGGN(model, loss_fn).update(x, y[:, :1])


def test_training_batchnorm_is_rejected() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode"):
        ExactHessian(model, nn.CrossEntropyLoss()).update(
            torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1]))


def test_unsupported_layer_is_named() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Module '1' \(LayerNorm\)"):
        supported_layers(model)
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        supported_layers(grouped)


def test_partition_errors() -> None:
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="appears twice"):
        Partition([[layer.weight], [layer.weight]])
    with pytest.raises(ValueError, match="empty"):
        Partition([[layer.weight], []])
    with pytest.raises(ValueError, match="not parameters of the model"):
        ExactHessian(nn.Linear(2, 2), nn.MSELoss(), Partition([[layer.weight]]))
