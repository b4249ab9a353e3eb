"""compare: per-block and overall agreement between two estimates, against hand computations."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from curvlib import EKFAC, KFAC, TEKFAC, TKFAC, DiagGGN, ExactGGN, ExactHessian, Partition
from curvlib.diagnostics import ComparisonTable, compare
from curvlib.estimate import CurvatureEstimate
from curvlib.testing import dense_ggn
from tests.cases import make_case


def gradient(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor,
             params: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss_fn(model(x), y), params))


def fitted(estimate: CurvatureEstimate, x: Tensor, y: Tensor) -> CurvatureEstimate:
    estimate.update(x, y)
    return estimate


@pytest.mark.parametrize("kind", ["exact", "kfac", "diagonal"])
def test_an_estimate_against_itself_has_zero_error(kind: str) -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=5)
    estimate = fitted({"exact": ExactGGN, "kfac": KFAC, "diagonal": DiagGGN}[kind](
        model, loss_fn), x, y)
    g = gradient(model, loss_fn, x, y, estimate.partition.parameters)
    table = compare(estimate, estimate, g)
    assert [row.block for row in table.rows] == [*estimate.partition.names, "overall"]
    for row in table.rows:
        assert row.relative_error == 0.0
        assert row.trace_ratio == pytest.approx(1.0, abs=1e-12)
        assert row.top_eigenvalue_ratio == pytest.approx(1.0, abs=1e-12)
        assert row.cosine == pytest.approx(1.0, abs=1e-12)
        assert row.lr_approx == row.lr_exact
    assert table.overall.lr_approx is None


def test_columns_equal_hand_computations_across_partitions() -> None:
    """K-FAC partitions by module, ExactGGN by tensor: compare reads the GGN in K-FAC's order."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=6)
    approx = fitted(KFAC(model, loss_fn, fisher="type2"), x, y)
    exact = fitted(ExactGGN(model, loss_fn), x, y)
    part = approx.partition
    g = gradient(model, loss_fn, x, y, part.parameters)
    u = [torch.randn_like(p) for p in part.parameters]
    damping = 1e-2
    table = compare(approx, exact, g, u, damping=damping)

    a, e = approx.to_dense(), dense_ggn(model, loss_fn, x, y, part)
    eye = torch.eye(part.numel, dtype=torch.float64)
    flat_g = part.flatten(g)
    step_a = torch.linalg.solve(a + damping * eye, flat_g)
    step_e = torch.linalg.solve(e + damping * eye, flat_g)
    blocks = part.block_directions(u)
    g_s = part.subset_dots(g, u)
    eye_s = torch.eye(len(part), dtype=torch.float64)
    eta_a = torch.linalg.solve(blocks @ a @ blocks.T + damping * eye_s, g_s)
    eta_e = torch.linalg.solve(blocks @ e @ blocks.T + damping * eye_s, g_s)
    views = [*part.subset_slices, slice(0, part.numel)]
    for s, (row, sl) in enumerate(zip(table.rows, views)):
        ab, eb = a[sl, sl], e[sl, sl]
        assert row.size == ab.shape[0]
        assert row.relative_error == pytest.approx(float((ab - eb).norm() / eb.norm()))
        assert row.trace_ratio == pytest.approx(float(ab.trace() / eb.trace()))
        assert row.top_eigenvalue_ratio == pytest.approx(
            float(torch.linalg.eigvalsh(ab)[-1] / torch.linalg.eigvalsh(eb)[-1]))
        assert row.cosine == pytest.approx(float(
            step_a[sl] @ step_e[sl] / (step_a[sl].norm() * step_e[sl].norm())))
        if s < len(part):
            assert row.lr_approx == pytest.approx(float(eta_a[s]))
            assert row.lr_exact == pytest.approx(float(eta_e[s]))
    assert table["2"] == table.rows[1] and table.blocks == table.rows[:-1]


@pytest.mark.parametrize("better,worse", [(EKFAC, KFAC), (TEKFAC, TKFAC)])
def test_eigenvalue_corrections_are_closer_to_the_ggn(better, worse) -> None:
    """The re-fitted diagonal is the Frobenius-optimal one in the shared eigenbasis
    (kfac_family.md §4, I5/I7): no larger an error per block, and the block traces are exact."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=8)
    exact = fitted(ExactGGN(model, loss_fn), x, y)
    good = compare(fitted(better(model, loss_fn, fisher="type2"), x, y), exact)
    bad = compare(fitted(worse(model, loss_fn, fisher="type2"), x, y), exact)
    for row_good, row_bad in zip(good.rows, bad.rows):
        assert row_good.relative_error <= row_bad.relative_error + 1e-12
        assert row_good.trace_ratio == pytest.approx(1.0, abs=1e-10)
    assert good.overall.relative_error < bad.overall.relative_error


def test_one_example_makes_kfac_exact_per_block() -> None:
    """With N = 1 every block of the GGN is one Kronecker product (kfac_family.md §4, I2)."""
    model, loss_fn, x, y = make_case("residual", "mse", "sum", batch=1)
    table = compare(fitted(KFAC(model, loss_fn, fisher="type2"), x, y),
                    fitted(ExactGGN(model, loss_fn), x, y))
    for row in table.blocks:
        assert row.relative_error < 1e-12
    assert table.overall.relative_error > 1e-3  # the cross-layer block is not modelled


def test_reference_may_cover_more_tensors() -> None:
    model, loss_fn, x, y = make_case("mlp", "mse", "mean", batch=3)
    head = Partition([[model[2].weight, model[2].bias]], names=["head"])
    approx = fitted(ExactHessian(model, loss_fn, head), x, y)
    table = compare(approx, fitted(ExactHessian(model, loss_fn), x, y))
    assert [row.block for row in table.rows] == ["head", "overall"]
    assert table.overall.relative_error < 1e-12


def test_table_prints_and_converts_to_plain_data() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "sum", batch=3)
    approx = fitted(DiagGGN(model, loss_fn), x, y)
    table = compare(approx, fitted(ExactGGN(model, loss_fn), x, y),
                    gradient(model, loss_fn, x, y, approx.partition.parameters))
    assert isinstance(table, ComparisonTable)
    data = table.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["approx"] == "DiagGGN" and data["exact"] == "ExactGGN"
    assert [row["block"] for row in data["rows"]] == [*approx.partition.names, "overall"]
    text = str(table)
    assert "DiagGGN vs ExactGGN" in text and "rel. Frobenius error" in text
    assert all(name in text for name in approx.partition.names)
    with pytest.raises(KeyError, match="no block 'missing'"):
        table["missing"]


def test_bad_arguments() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=3)
    exact = fitted(ExactGGN(model, loss_fn), x, y)
    head = fitted(ExactGGN(model, loss_fn, Partition([[model[2].weight]])), x, y)
    good = [torch.zeros_like(p) for p in exact.partition.parameters]
    with pytest.raises(ValueError, match="approx must be a CurvatureEstimate"):
        compare(exact.to_dense(), exact)
    with pytest.raises(ValueError, match="exact must be a CurvatureEstimate"):
        compare(exact, None)
    with pytest.raises(ValueError, match=r"Parameter '0\.weight' of the approximation"):
        compare(exact, head)
    with pytest.raises(ValueError, match="gradient has 3 tensors"):
        compare(exact, exact, good[:3])
    with pytest.raises(ValueError, match="direction needs a gradient"):
        compare(exact, exact, direction=good)
    with pytest.raises(ValueError, match="damping"):
        compare(exact, exact, damping=-1.0)
    with pytest.raises(ValueError, match="max_parameters"):
        compare(exact, exact, max_parameters=10)
    with pytest.raises(ValueError, match="singular"):
        compare(exact, exact, good, damping=0.0)  # a GGN of rank 6 < P
