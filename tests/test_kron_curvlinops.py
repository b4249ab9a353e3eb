"""Cross-check against an independent library: curvlinops' KFAC and EKFAC linear operators.

Conventions (kfac_family.md §1.4–1.5): curvlinops acts on vectors in the order of the parameter
list it is given, each tensor flattened row-major — with ``params = list(model.parameters())``
that is curvlib's dense order — and scales A as a mean over rows and G with the reduction factor
c, as curvlib does. With ``separate_weight_and_bias=False`` it folds the bias into [W | b] as
curvlib does, so both must return the same dense matrix. MC draws differ between the libraries,
so the deterministic Fisher types are compared.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from curvlib import EKFAC, KFAC
from curvlib.testing import assert_close
from tests.cases import make_case

curvlinops = pytest.importorskip("curvlinops")

FISHER = {"type2": "type-2", "empirical": "empirical"}


def curvlinops_dense(
    method: type, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, fisher: str,
    sharing: str,
) -> Tensor:
    operator_class = {KFAC: curvlinops.KFACLinearOperator,
                      EKFAC: curvlinops.EKFACLinearOperator}[method]
    params = list(model.parameters())
    operator = operator_class(
        model, loss_fn, params, [(x, y)], fisher_type=FISHER[fisher], kfac_approx=sharing,
        separate_weight_and_bias=False, check_deterministic=False,
    )
    size = sum(p.numel() for p in params)
    return operator @ torch.eye(size, dtype=torch.float64)


def cnn_case(loss: str, reduction: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """A CNN curvlinops supports (symmetric padding), with a batch large enough that every reduce
    factor is non-singular: a singular factor leaves EKFAC's basis, hence its diagonal, undefined
    inside the null space, and the two libraries may then pick different bases."""
    torch.manual_seed(6)
    model = nn.Sequential(  # the first input factor from correlations, the second from rows
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, dilation=2, padding=1),
        nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 5, 3),
    ).double()
    x = torch.randn(24, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    y = torch.randint(0, 3, (24,)) if loss == "cross_entropy" else torch.randn_like(out)
    loss_fn = nn.CrossEntropyLoss if loss == "cross_entropy" else nn.MSELoss
    return model, loss_fn(reduction=reduction), x, y


@pytest.mark.parametrize("method", [KFAC, EKFAC])
@pytest.mark.parametrize("sharing", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "case,loss", [("mlp", "cross_entropy"), ("mlp", "bce"), ("cnn", "cross_entropy"),
                  ("cnn", "mse")],
)
def test_same_dense_matrix_as_curvlinops(
    case: str, loss: str, reduction: str, fisher: str, sharing: str, method: type
) -> None:
    if case == "mlp":
        model, loss_fn, x, y = make_case("mlp", loss, reduction, batch=4)
    else:
        model, loss_fn, x, y = cnn_case(loss, reduction)
    expected = curvlinops_dense(method, model, loss_fn, x, y, fisher, sharing)
    estimate = method(model, loss_fn, fisher=fisher, weight_sharing=sharing)
    estimate.update(x, y)
    assert_close(estimate.to_dense(), expected, rtol=1e-10,
                 what=f"{method.__name__} vs curvlinops")
