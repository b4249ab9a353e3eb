"""top_eigenvalues: Lanczos against eigvalsh of dense matrices; structure-based spectra."""

from __future__ import annotations

import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import Tensor, nn

from curvlib import EKFAC, KFAC, TEKFAC, TKFAC, DiagGGN, ExactGGN, ExactHessian
from curvlib.diagnostics import top_eigenvalues
from curvlib.testing import assert_close
from tests.cases import make_case


def reference(dense: Tensor, k: int, which: str) -> Tensor:
    values = torch.linalg.eigvalsh(dense)
    if which == "LA":
        return values.flip(0)[:k]
    if which == "SA":
        return values[:k]
    return values[torch.argsort(values.abs(), descending=True)][:k]


@pytest.mark.parametrize("estimate_cls,name,which", [
    (ExactHessian, "mlp", "LA"), (ExactGGN, "cnn", "LM"), (ExactHessian, "residual", "SA")])
def test_lanczos_matches_eigvalsh(estimate_cls, name: str, which: str) -> None:
    model, loss_fn, x, y = make_case(name, "cross_entropy", "mean", batch=4)
    estimate = estimate_cls(model, loss_fn)
    estimate.update(x, y)
    values = top_eigenvalues(estimate, k=3, which=which, method="lanczos")
    assert_close(values, reference(estimate.to_dense(), 3, which), rtol=1e-8, atol=1e-10,
                 what=f"{which} eigenvalues")


def test_eigenvectors_are_parameter_aligned_eigenpairs() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "sum", batch=3)
    estimate = ExactHessian(model, loss_fn)
    estimate.update(x, y)
    part = estimate.partition
    values, vectors = top_eigenvalues(estimate, k=2, return_eigenvectors=True)
    assert len(vectors) == 2
    for value, vector in zip(values, vectors):
        part.check_vector(vector)
        flat = part.flatten(vector)
        assert_close(flat.norm(), torch.tensor(1.0, dtype=torch.float64))
        assert_close(part.flatten(estimate.matvec(vector)), value * flat, atol=1e-9)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_dense_tensor_and_linear_operator(which: str) -> None:
    torch.manual_seed(0)
    factor = torch.randn(30, 30, dtype=torch.float64)
    matrix = factor @ factor.T - 10 * torch.eye(30, dtype=torch.float64)
    expected = reference(matrix, 4, which)
    assert_close(top_eigenvalues(matrix, 4, which), expected)  # auto: dense route
    operator = aslinearoperator(matrix.numpy())
    values, vectors = top_eigenvalues(operator, 4, which, return_eigenvectors=True)
    assert_close(values, expected, rtol=1e-9)
    for value, vector in zip(values, vectors):
        assert vector.shape == (30,)
        assert_close(matrix @ vector, value * vector, atol=1e-8)
    whole = top_eigenvalues(matrix, 30, "SA", method="dense")
    assert_close(whole, torch.linalg.eigvalsh(matrix))


def test_the_estimates_linear_operator_gives_flat_vectors() -> None:
    model, loss_fn, x, y = make_case("mlp", "mse", "mean", batch=3)
    estimate = ExactGGN(model, loss_fn)
    estimate.update(x, y)
    values, vectors = top_eigenvalues(estimate.as_linear_operator(), 1,
                                      return_eigenvectors=True)
    assert vectors[0].shape == (estimate.partition.numel,)
    assert_close(values, reference(estimate.to_dense(), 1, "LA"), rtol=1e-9)


def test_diagonal_estimate_spectrum_is_its_diagonal() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=3)
    estimate = DiagGGN(model, loss_fn)
    estimate.update(x, y)
    flat = estimate.partition.flatten(estimate.diagonal())
    exact, vectors = top_eigenvalues(estimate, 3, return_eigenvectors=True)
    assert_close(exact, flat.sort(descending=True).values[:3])
    assert_close(exact, top_eigenvalues(estimate, 3, method="lanczos"), rtol=1e-9)
    for value, vector in zip(exact, vectors):
        assert_close(estimate.partition.flatten(estimate.matvec(vector)),
                     value * estimate.partition.flatten(vector))


def test_bad_arguments() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=2)
    estimate = ExactGGN(model, loss_fn)
    estimate.update(x, y)
    size = estimate.partition.numel
    with pytest.raises(ValueError, match="k must be an integer"):
        top_eigenvalues(estimate, 0)
    with pytest.raises(ValueError, match="exceeds the number of eigenvalues"):
        top_eigenvalues(estimate, size + 1)
    with pytest.raises(ValueError, match="must be < P"):
        top_eigenvalues(estimate, size, method="lanczos")
    with pytest.raises(ValueError, match="which must be one of"):
        top_eigenvalues(estimate, 1, which="BE")
    with pytest.raises(ValueError, match="method must be one of"):
        top_eigenvalues(estimate, 1, method="power")
    with pytest.raises(ValueError, match="method='exact' needs an estimate with known structure"):
        top_eigenvalues(estimate, 1, method="exact")
    with pytest.raises(ValueError, match="seed"):
        top_eigenvalues(estimate, 1, seed=-1)
    with pytest.raises(ValueError, match="tol"):
        top_eigenvalues(estimate, 1, tol=float("nan"))
    with pytest.raises(ValueError, match="estimate_or_operator must be a CurvatureEstimate"):
        top_eigenvalues([[1.0]], 1)
    with pytest.raises(ValueError, match="square"):
        top_eigenvalues(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="not symmetric"):
        top_eigenvalues(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="not finite"):
        top_eigenvalues(torch.tensor([[float("nan")]]), 1)


@pytest.mark.parametrize("estimate_cls", [KFAC, EKFAC, TKFAC, TEKFAC])
@pytest.mark.parametrize("name", ["square", "conv1d"])
def test_kronecker_spectrum_from_factors_matches_lanczos(estimate_cls, name: str) -> None:
    """"square" has a layer with d_out = d_in + 1 = 4, where the factor roles must be told
    apart by a product rather than by their sizes."""
    if name == "square":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        loss_fn = nn.CrossEntropyLoss()
        x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    else:
        model, loss_fn, x, y = make_case(name, "cross_entropy", "mean", batch=4)
    estimate = estimate_cls(model, loss_fn, fisher="type2")
    estimate.update(x, y)
    part = estimate.partition
    dense = estimate.to_dense()
    assert_close(top_eigenvalues(estimate, 4, method="lanczos"), reference(dense, 4, "LA"),
                 rtol=1e-8, what="Lanczos vs eigvalsh")
    assert_close(top_eigenvalues(estimate, 4), top_eigenvalues(estimate, 4, method="lanczos"),
                 rtol=1e-8, what="factors vs Lanczos")
    # the whole spectrum and every eigenvector, so that every block is read off its factors
    values, vectors = top_eigenvalues(estimate, part.numel, "SA", return_eigenvectors=True)
    assert_close(values, torch.linalg.eigvalsh(dense), atol=1e-10, what="factors vs eigvalsh")
    flat = torch.stack([part.flatten(v) for v in vectors])
    assert_close(flat @ flat.T, torch.eye(part.numel, dtype=torch.float64), atol=1e-10)
    products = part.flatten_batched(estimate.matmat(part.unflatten_batched(flat)))
    assert_close(products, values[:, None] * flat, atol=1e-10, what="eigenpairs")
