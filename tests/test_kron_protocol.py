"""The training protocol (record / flush / refresh / auto_refresh), persistence and numerics of the
Kronecker estimates, in float64 unless a test says otherwise."""

from __future__ import annotations

import io
import math
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from curvlib import EKFAC, KFAC, TEKFAC, TKFAC
from curvlib.capture import LayerCall, LayerCapture
from curvlib.kron import KroneckerEstimate, eigen
from curvlib.kron.collect import LayerInputs
from curvlib.kron.eigen import (
    SquaresRoute,
    eigenbasis_squares,
    eigh_psd,
    pad_columns,
    padded_width,
)
from curvlib.kron.layout import LayerLayout
from curvlib.testing import assert_close, dense_ggn
from tests.cases import make_case
from tests.test_kron_exact import METHODS, fitted, ggn_blocks, to_wb


def recorded(estimate: KroneckerEstimate, x: Tensor, y: Tensor) -> list[Tensor]:
    """One training step through the protocol; returns the parameters' .grad after it."""
    model = estimate.model
    model.zero_grad()
    with estimate.record(y):
        outputs = model(x)
    estimate.loss.module(outputs, y).backward()
    estimate.flush()
    return [p.grad.clone() for p in model.parameters()]


def linear_rows(x: Tensor, bias: bool = False) -> LayerInputs:
    """x [N, T, d] as the input rows of a linear layer: x itself, or [x, 1] with a bias."""
    layer = nn.Linear(x.shape[-1], 2, bias=bias)
    params = [layer.weight] + ([layer.bias] if bias else [])
    return LayerInputs(LayerLayout("layer", layer, params), [x], [x.shape[1]], x.dtype)


def plain_gradient(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(loss_fn(model(x), y), list(model.parameters())))


@pytest.mark.parametrize("fisher", ["type2", "mc", "empirical"])
@pytest.mark.parametrize("method", METHODS)
def test_record_flush_equals_update(method: type[KroneckerEstimate], fisher: str) -> None:
    """Two recorded training steps give the statistics of two update() calls (same MC seed),
    and the extra backward leaves the training gradient untouched."""
    model, loss_fn, x, y = make_case("sequence", "cross_entropy", "mean", batch=5)
    steps = [(x[:2], y[:2]), (x[2:], y[2:])]
    reference = fitted(method, model, loss_fn, steps, fisher=fisher, seed=11)
    estimate = method(model, loss_fn, fisher=fisher, seed=11)
    for bx, by in steps:
        grads = recorded(estimate, bx, by)
        for got, expected in zip(grads, plain_gradient(model, loss_fn, bx, by)):
            assert_close(got, expected, rtol=1e-12, what=".grad after record")
    for layer, expected in reference.factors().items():
        got = estimate.factors()[layer]
        for key in ("A", "G", "delta", "Phi_raw", "Psi_raw"):
            if key in expected:
                assert_close(got[key], expected[key], rtol=1e-12, what=f"{layer} {key}")


def test_training_schedule_of_the_diagonal() -> None:
    """EKFAC Algorithm 1 with auto_refresh=False: a refresh fits the diagonal to the latest step
    in the new basis; later steps add to it in that basis until the next refresh resets it.
    (Three steps: the third writes its squares into the buffer the second's left spare.)"""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=9)
    first, second, third = (x[:3], y[:3]), (x[3:7], y[3:7]), (x[7:], y[7:])
    estimate = EKFAC(model, loss_fn, fisher="type2")
    estimate.auto_refresh = False

    def fitted_diagonal(q: Tensor, bx: Tensor, by: Tensor, layer: str) -> Tensor:
        sl = estimate.partition.subset_slices[list(estimate.modules).index(layer)]
        block = to_wb(ggn_blocks(estimate, bx, by)[sl, sl], estimate.modules[layer])
        return torch.diagonal(q.T @ block @ q).reshape(estimate.factors()[layer]["diagonal"].shape)

    recorded(estimate, *first)
    estimate.refresh()
    f = estimate.factors()["2"]
    q = torch.kron(f["eigvecs_G"], f["eigvecs_A"])
    assert_close(f["diagonal"], fitted_diagonal(q, *first, "2"), rtol=1e-10, what="refit")
    recorded(estimate, *second)  # no refresh: same basis, the diagonal averages the steps
    recorded(estimate, *third)
    f = estimate.factors()["2"]
    assert_close(torch.kron(f["eigvecs_G"], f["eigvecs_A"]), q, what="basis kept")
    expected = (3 * fitted_diagonal(q, *first, "2") + 4 * fitted_diagonal(q, *second, "2")
                + 2 * fitted_diagonal(q, *third, "2")) / 9
    assert_close(f["diagonal"], expected, rtol=1e-10, what="online diagonal")
    estimate.refresh()  # new basis from all steps' factors, diagonal from the latest step
    f = estimate.factors()["2"]
    q = torch.kron(f["eigvecs_G"], f["eigvecs_A"])
    assert_close(f["diagonal"], fitted_diagonal(q, *third, "2"), rtol=1e-10, what="reset")


def test_auto_refresh_follows_the_statistics() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=6)
    estimate = fitted(KFAC, model, loss_fn, [(x[:3], y[:3])], fisher="type2")
    before = estimate.to_dense()
    estimate.auto_refresh = False
    estimate.update(x[3:], y[3:])
    assert_close(estimate.to_dense(), before, what="stale operator until refresh()")
    estimate.refresh()
    both = fitted(KFAC, model, loss_fn, [(x[:3], y[:3]), (x[3:], y[3:])], fisher="type2")
    assert_close(estimate.to_dense(), both.to_dense(), rtol=1e-12, what="after refresh()")
    estimate.auto_refresh = True
    estimate.update(x[:2], y[:2])  # a read now refreshes by itself
    assert float((estimate.to_dense() - both.to_dense()).abs().max()) > 1e-6


def test_update_keeps_batches_only_while_parameters_stay() -> None:
    """After the parameters change, EKFAC refits from the batches seen since (here the last)."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "sum", batch=6)
    estimate = fitted(EKFAC, model, loss_fn, [(x[:3], y[:3])], fisher="type2")
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    estimate.update(x[3:], y[3:])
    f = estimate.factors()["0"]
    q = torch.kron(f["eigvecs_G"], f["eigvecs_A"])
    block = to_wb(ggn_blocks(estimate, x[3:], y[3:])[:24, :24], model[0])
    assert_close(f["diagonal"].reshape(-1), torch.diagonal(q.T @ block @ q), rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(method: type[KroneckerEstimate]) -> None:
    """A saved and loaded state reads the same and continues identically (MC seed included)."""
    model, loss_fn, x, y = make_case("cnn", "cross_entropy", "mean", batch=6)
    estimate = fitted(method, model, loss_fn, [(x[:2], y[:2]), (x[2:4], y[2:4])], fisher="mc",
                      ema_decay=0.8, seed=3)
    estimate.to_dense()  # refreshed state, then one more step on top
    estimate.update(x[4:], y[4:])
    buffer = io.BytesIO()
    torch.save(estimate.state_dict(), buffer)
    buffer.seek(0)
    clone = method(model, loss_fn, fisher="mc", ema_decay=0.8, seed=99)
    clone.load_state_dict(torch.load(buffer, weights_only=False))
    assert_close(clone.to_dense(), estimate.to_dense(), rtol=1e-12, what="loaded")
    clone.update(x[:3], y[:3])
    estimate.update(x[:3], y[:3])
    assert_close(clone.to_dense(), estimate.to_dense(), rtol=1e-12, what="continued")


@pytest.mark.parametrize("ema_decay", [None, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_statistics_handed_out_are_copies(reduction: str, ema_decay: float | None) -> None:
    """Statistics accumulate in place: factors() and state_dict() must not alias them, and a
    loaded state must not be written through."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", reduction, batch=4)
    estimate = fitted(EKFAC, model, loss_fn, [(x[:2], y[:2])], fisher="type2",
                      ema_decay=ema_decay)
    named = {k: v.clone() for k, v in estimate.factors()["0"].items()}
    read = estimate.factors()["0"]
    state = estimate.state_dict()
    saved = state["statistics"]["0"]["G"]["numerator"].clone()
    other = EKFAC(model, loss_fn, fisher="type2", ema_decay=ema_decay)
    other.load_state_dict(state)
    estimate.update(x[2:], y[2:])
    other.update(x[2:], y[2:])
    for key in ("A", "G", "diagonal"):
        assert torch.equal(read[key], named[key]), key
    assert torch.equal(state["statistics"]["0"]["G"]["numerator"], saved)


@pytest.mark.parametrize("name", ["shared", "conv1d"])
def test_tied_calls_and_conv1d_keep_the_trace(name: str) -> None:
    """A module called twice contributes both calls as shared positions; per-example gradients
    sum over them, so EKFAC/TEKFAC keep tr F also for tied weights and 1-d convolutions."""
    model, loss_fn, x, y = make_case(name, "cross_entropy", "mean", batch=4)
    reference = None
    for method in (EKFAC, TEKFAC):
        estimate = fitted(method, model, loss_fn, [(x, y)], fisher="type2")
        reference = ggn_blocks(estimate, x, y) if reference is None else reference
        assert_close(estimate.trace(), torch.trace(reference), rtol=1e-10, what="trace")


@pytest.mark.parametrize("method", [EKFAC, TEKFAC])
def test_kept_step_holds_layer_inputs_and_its_saved_state_copies_them(
    method: type[KroneckerEstimate],
) -> None:
    """EKFAC/TEKFAC keep their latest step for the diagonal refit as the layers' recorded inputs,
    not as unfolded rows; a state dict copies them, so a later in-place change of the batch
    leaves the saved state intact, and a kept input changed in place is refused by name."""
    model, loss_fn, x, y = make_case("conv1d", "cross_entropy", "mean", batch=6)
    estimate = method(model, loss_fn, fisher="mc", seed=5)
    estimate.auto_refresh = False
    x = x.clone()
    recorded(estimate, x, y)
    kept = estimate._last.inputs
    first = next(iter(estimate.layouts))
    assert kept[first].inputs[0].data_ptr() == x.data_ptr()  # the batch itself, not rows
    estimate.refresh()
    saved = estimate.state_dict()
    before = estimate.to_dense()
    x.mul_(2.0)  # e.g. a reused input buffer refilled with the next batch
    with pytest.raises(ValueError, match=f"input of module '{first}' was modified in place"):
        estimate.refresh()
    restored = method(model, loss_fn, fisher="mc", seed=5)
    restored.load_state_dict(saved)
    restored.auto_refresh = False
    restored.refresh()  # refits the diagonal from the saved copy of the kept step
    assert_close(restored.to_dense(), before, rtol=1e-12, what="curvature from the saved step")


@pytest.mark.parametrize("method", [EKFAC, TEKFAC])
def test_kept_step_is_released_before_the_next_forward_and_recomputed_if_that_step_fails(
    method: type[KroneckerEstimate],
) -> None:
    """The step kept for the refit (its inputs and gradients) is freed before the next step's
    forward, so two steps are never held at once; when that step then fails, refresh() refits
    from the recomputed step and equals an estimate that never saw the failed one."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "sum", batch=6)
    estimate = method(model, loss_fn, fisher="type2", seed=3)
    estimate.update(x[:3], y[:3])
    kept = [weakref.ref(g) for chunk in estimate._last.grads for g in chunk.values()]
    alive_in_forward: list[int] = []

    def count(*_: object) -> None:
        alive_in_forward.append(sum(ref() is not None for ref in kept))

    handle = model.register_forward_pre_hook(count)
    bad = x[3:].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        estimate.update(bad, y[3:])
    handle.remove()
    assert kept and alive_in_forward == [0]
    assert estimate._last is None
    estimate.refresh()
    reference = fitted(method, model, loss_fn, [(x[:3], y[:3])], fisher="type2", seed=3)
    reference.refresh()
    assert_close(estimate.to_dense(), reference.to_dense(), rtol=1e-12,
                 what="refit from the recomputed step")


@pytest.mark.parametrize("method", [EKFAC, TEKFAC])
def test_refit_pads_the_bases_without_a_second_copy(method: type[KroneckerEstimate]) -> None:
    """The diagonal's products use the bases padded with zero columns; the bases then live in
    those padded tensors (views of their leading columns), not beside them."""
    model, loss_fn, x, y = make_case("cnn", "cross_entropy", "mean", batch=3)
    estimate = fitted(method, model, loss_fn, [(x, y)], fisher="mc")
    before = estimate.factors()
    estimate.update(x, y)  # folds the step into the diagonal in the current bases
    name_in, name_out = estimate._factor_names()
    padded_any = False
    for layer, basis in estimate._bases.items():
        padded_in, padded_out = estimate._padded_bases(layer)
        for vectors, padded, name in ((basis.basis_in, padded_in, name_in),
                                      (basis.basis_out, padded_out, name_out)):
            padded_any |= padded.shape[1] > vectors.shape[1]
            assert vectors.untyped_storage().data_ptr() == padded.untyped_storage().data_ptr()
            assert torch.equal(padded[:, : vectors.shape[1]], vectors)
            assert not padded[:, vectors.shape[1]:].any()
            assert torch.equal(vectors, before[layer][f"eigvecs_{name}"])
    assert padded_any


@pytest.mark.parametrize("method", [KFAC, TKFAC])
def test_type2_columns_are_released_before_the_next_backward_pass(
    method: type[KroneckerEstimate], monkeypatch: pytest.MonkeyPatch
) -> None:
    """K-FAC/TKFAC fold each backward pass's gradients before the next pass runs and keep no
    reference to them: while a pass runs, the gradients of every earlier one are freed."""
    model, loss_fn, x, y = make_case("cnn", "cross_entropy", "mean", batch=3)
    earlier: list[weakref.ref[Tensor]] = []
    alive_during_pass: list[int] = []
    chunks = LayerCapture.grad_output_chunks

    def watched(self: LayerCapture, *args: object, **kwargs: object
                ) -> Iterator[dict[str, list[Tensor]]]:
        for chunk in chunks(self, *args, **kwargs):
            alive_during_pass.append(sum(ref() is not None for ref in earlier))
            earlier.extend(weakref.ref(g) for grads in chunk.values() for g in grads)
            yield chunk
            del chunk  # hold nothing while the next pass runs

    monkeypatch.setattr(LayerCapture, "grad_output_chunks", watched)
    estimate = method(model, loss_fn, fisher="type2")
    estimate.update(x, y)
    classes = model(x).shape[1]
    assert classes > 1 and len(alive_during_pass) == classes  # one pass per class
    assert alive_during_pass == [0] * classes


@pytest.mark.parametrize("method", [KFAC, EKFAC])
@pytest.mark.parametrize("fisher", ["type2", "mc"])
def test_update_frees_its_graph_and_record_keeps_it(
    method: type[KroneckerEstimate], fisher: str
) -> None:
    """update()'s own forward is freed by its last backward pass (its saved tensors do not
    outlive the pass that reads them); under record() the training backward still follows."""
    model, loss_fn, x, y = make_case("cnn", "cross_entropy", "mean", batch=3)
    outputs: list[Tensor] = []
    handle = model.register_forward_hook(lambda module, args, output: outputs.append(output))
    estimate = method(model, loss_fn, fisher=fisher)
    estimate.update(x, y)
    with pytest.raises(RuntimeError, match="second time"):
        outputs[-1].sum().backward()
    with estimate.record(y):
        loss = loss_fn(model(x), y)
    loss.backward()
    handle.remove()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------- numerics
def test_float32_model_matches_float64() -> None:
    model, loss_fn, x, y = make_case("cnn", "cross_entropy", "mean", batch=4)
    reference = fitted(EKFAC, model, loss_fn, [(x, y)], fisher="type2").to_dense()
    model32 = model.float()
    estimate = fitted(EKFAC, model32, loss_fn, [(x.float(), y)], fisher="type2")
    assert estimate.dtype == torch.float32
    dense = estimate.to_dense()
    assert dense.dtype == torch.float32
    assert_close(dense, reference, rtol=1e-4, what="float32")
    wide = fitted(KFAC, model32, loss_fn, [(x.float(), y)], fisher="type2", dtype=torch.float64)
    assert wide.factors()["0"]["A"].dtype == torch.float64


def test_eigendecomposition_retries_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = torch.randn(6, 4, dtype=torch.float32)
    matrix = matrix @ matrix.T  # rank 4: two zero eigenvalues
    original = torch.linalg.eigh

    def failing_in_float32(m: Tensor) -> tuple[Tensor, Tensor]:
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced failure")
        return original(m)

    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    values, vectors = eigh_psd(matrix, "a test factor")
    assert values.dtype == torch.float32 and bool((values >= 0).all())
    assert_close((vectors * values) @ vectors.T, matrix, rtol=1e-5, what="retried")


class SolverSpy:
    """Wraps one of the optional solvers of curvlib.kron.eigen (``"_eigh_range"``,
    ``"_eigh_rows"``), counting calls and successful results."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, solver: str) -> None:
        self.calls, self.found = 0, 0
        self.original = getattr(eigen, solver)
        monkeypatch.setattr(eigen, solver, self)

    def __call__(self, sym: Tensor, arg: int | Tensor) -> tuple[Tensor, Tensor] | None:
        self.calls += 1
        result = self.original(sym, arg)
        self.found += result is not None
        return result


def assert_low_rank_eigendecomposition(values: Tensor, vectors: Tensor, matrix: Tensor,
                                       rank: int, rtol: float) -> None:
    """Eigenvalues ≥ 0 in ascending order and the factor's dtype, orthonormal eigenvectors, the
    factor reconstructed, and the full solver's ``rank`` nonzero eigenvalues."""
    assert values.dtype == matrix.dtype and bool((values >= 0).all())
    assert bool((values[1:] >= values[:-1]).all())
    eye = torch.eye(matrix.shape[0], dtype=torch.float64)
    assert_close(vectors.double().T @ vectors.double(), eye, atol=10 * rtol, what="orthonormal")
    assert_close((vectors * values) @ vectors.T, matrix, rtol=rtol, what="reconstruction")
    full = torch.linalg.eigh(matrix.double()).eigenvalues
    assert_close(values[-rank:].double(), full[-rank:], rtol=rtol, what="nonzero spectrum")


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_low_rank_eigendecomposition_reconstructs_factor(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, rtol: float
) -> None:
    """A factor of 12 rows in 100 dimensions, decomposed from its range: F = U diag(s) Uᵀ with U
    orthonormal, s ascending, and the nonzero spectrum of the full solver."""
    spy = SolverSpy(monkeypatch, "_eigh_range")
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(12, 100, dtype=torch.float64, generator=gen) * torch.logspace(0, -2, 100)
    matrix = (rows.T @ rows).to(dtype)
    values, vectors = eigh_psd(matrix, "a test factor", rank_bound=12)
    assert (spy.calls, spy.found) == (1, 1)
    assert_low_rank_eigendecomposition(values, vectors, matrix, 12, rtol)


def test_wrong_rank_bound_falls_back_to_the_full_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = SolverSpy(monkeypatch, "_eigh_range")
    gen = torch.Generator().manual_seed(4)
    rows = torch.randn(40, 100, dtype=torch.float64, generator=gen)
    matrix = rows.T @ rows  # rank 40, claimed ≤ 10
    values, vectors = eigh_psd(matrix, "a test factor", rank_bound=10)
    assert (spy.calls, spy.found) == (1, 0)
    assert_close((vectors * values) @ vectors.T, matrix, rtol=1e-11, what="fallback")


@pytest.mark.parametrize("method", METHODS)
def test_low_rank_refresh_equals_full_refresh(
    monkeypatch: pytest.MonkeyPatch, method: type[KroneckerEstimate]
) -> None:
    """Wide layers and few rows: the range-only decomposition gives the same estimate as the full
    solver (bases may differ inside the null spaces, the matrices may not), and one datum is
    still exact."""
    spy = SolverSpy(monkeypatch, "_eigh_range")
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(60, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(3, 60, dtype=torch.float64), torch.randint(0, 3, (3,))
    batches = [(x[:1], y[:1]), (x[1:], y[1:])]
    low = fitted(method, model, loss_fn, batches, fisher="type2")
    low_dense = low.to_dense()
    assert spy.found == 1  # the 61 × 61 input factor of the first layer (3 rows)
    full = fitted(method, model, loss_fn, batches, fisher="type2")
    full._rank_bounds = None  # as for a state without rank bounds: the full solver
    assert_close(low_dense, full.to_dense(), rtol=1e-10, what=method.__name__)
    one = fitted(method, model, loss_fn, batches[:1], fisher="type2")
    assert_close(one.to_dense(), ggn_blocks(one, *batches[0]), rtol=1e-10, what="one datum")


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_eigendecomposition_from_rows_reconstructs_factor(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, rtol: float
) -> None:
    """F = 0.3 RᵀR of 30 rows in 100 dimensions, decomposed from R: orthonormal column-major
    eigenvectors, ascending eigenvalues, the full solver's nonzero spectrum."""
    spy = SolverSpy(monkeypatch, "_eigh_rows")
    gen = torch.Generator().manual_seed(6)
    rows = torch.randn(30, 100, dtype=torch.float64, generator=gen) * torch.logspace(0, -2, 100)
    matrix = (0.3 * rows.T @ rows).to(dtype)
    values, vectors = eigh_psd(matrix, "a test factor", rank_bound=30, rows=lambda: rows.to(dtype))
    assert (spy.calls, spy.found) == (1, 1)
    assert vectors.stride(0) == 1  # column-major, like LAPACK's (torch.kron needs one layout)
    assert_low_rank_eigendecomposition(values, vectors, matrix, 30, rtol)


def test_rows_of_another_factor_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A factor of two batches is not proportional to the second batch's Gram: the probe rejects
    the rows and the range-only solver decomposes the factor."""
    spy, ranges = SolverSpy(monkeypatch, "_eigh_rows"), SolverSpy(monkeypatch, "_eigh_range")
    gen = torch.Generator().manual_seed(7)
    first, second = (torch.randn(10, 100, dtype=torch.float64, generator=gen) for _ in range(2))
    matrix = first.T @ first + second.T @ second
    values, vectors = eigh_psd(matrix, "a test factor", rank_bound=10, rows=lambda: second)
    assert (spy.calls, spy.found) == (1, 0)
    assert ranges.calls == 1  # the bound of 10 rows (false here) then tries the range solver
    assert_close((vectors * values) @ vectors.T, matrix, rtol=1e-11, what="fallback")


def test_eigenbasis_squares_on_the_support_of_the_rows() -> None:
    """Rows in the span of the trailing eigenvectors of their own Grams: computing the squares
    on that block alone gives the whole result."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 9, dtype=torch.float64, generator=gen)  # 6 rows in 9 dimensions
    grads = torch.randn(1, 3, 2, 8, dtype=torch.float64, generator=gen)  # 6 rows in 8
    basis_in = torch.linalg.eigh(x.reshape(-1, 9).T @ x.reshape(-1, 9)).eigenvectors
    basis_out = torch.linalg.eigh(grads.reshape(-1, 8).T @ grads.reshape(-1, 8)).eigenvectors
    inputs = linear_rows(x)
    expected = eigenbasis_squares(inputs, grads, basis_in, basis_out)
    got = eigenbasis_squares(inputs, grads, basis_in, basis_out, support=(6, 6))
    assert_close(got, expected, rtol=1e-10, atol=1e-12, what="support")
    assert not bool(got[:2].any()) and not bool(got[:, :3].any())


def conv_then_linear() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """Few rows for wide factors: 2 examples of 4×3×3 (18 convolution rows of 37 entries; the
    linear layer's 2 rows of 73)."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(72, 10)).double()
    x, y = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randint(0, 10, (2,))
    return model, nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("weight_sharing,from_rows", [("expand", 3), ("reduce", 4)])
@pytest.mark.parametrize("method", METHODS)
def test_refresh_from_kept_rows_equals_full_refresh(
    monkeypatch: pytest.MonkeyPatch, method: type[KroneckerEstimate], weight_sharing: str,
    from_rows: int,
) -> None:
    """After one statistics step the factors are that step's Grams: decomposing its rows, and
    refitting the diagonal on their trailing eigenvectors only, gives the estimate of the full
    solver and the full refit (expand: the convolution's 18 gradient rows of 8 entries are too
    many; reduce: its rows are the 2 examples).

    Under reduce the convolution's per-example gradients Σ_t g_t ā_tᵀ leave the span of its
    factors (they hold position means and sums), so its refit diagonal depends on the basis
    chosen in their null spaces, which no solver fixes: only its factors are compared there."""
    spy = SolverSpy(monkeypatch, "_eigh_rows")
    model, loss_fn, x, y = conv_then_linear()
    kwargs = {"fisher": "mc", "weight_sharing": weight_sharing, "seed": 3}
    low = fitted(method, model, loss_fn, [(x, y)], **kwargs)
    low_dense, low_factors = low.to_dense(), low.factors()
    assert (spy.calls, spy.found) == (from_rows, from_rows)
    full = fitted(method, model, loss_fn, [(x, y)], **kwargs)
    full._rank_bounds = None  # as for a state without rank bounds: the full solver
    if weight_sharing == "expand":
        assert_close(low_dense, full.to_dense(), rtol=1e-10, what=method.__name__)
    names = [name.removeprefix("eigvecs_") for name in low_factors["0"] if "eigvecs" in name]
    for layer, entry in full.factors().items():
        for name in names:
            vectors, values = low_factors[layer][f"eigvecs_{name}"], low_factors[layer][
                f"eigvals_{name}"]
            assert_close((vectors * values) @ vectors.T, entry[name], rtol=1e-10,
                         what=f"factor {name} of {layer}")
        if "diagonal" in entry and (weight_sharing == "expand" or layer == "3"):
            assert_close(low_factors[layer]["diagonal"], entry["diagonal"], rtol=1e-10,
                         atol=1e-14 * float(entry["diagonal"].max()), what=f"diagonal of {layer}")
    low.update(x, y)  # a second step: the factors are no longer one step's Grams
    low.refresh()
    assert spy.calls == from_rows


@pytest.mark.parametrize("method", METHODS)
def test_type2_rows_of_every_backward_pass_decomposed_together(
    monkeypatch: pytest.MonkeyPatch, method: type[KroneckerEstimate]
) -> None:
    """K-FAC and TKFAC type-2 on CPU backpropagate the K = 3 columns one pass at a time
    (EKFAC and TEKFAC in one chunk): the first layer's 6 gradient rows of 40 entries are kept
    from all three passes and decomposed as one matrix (with the 6- and 41-wide input factors'
    rows), giving the full solver's estimate."""
    spy = SolverSpy(monkeypatch, "_eigh_rows")
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(2, 5, dtype=torch.float64), torch.randint(0, 3, (2,))
    low = fitted(method, model, loss_fn, [(x, y)], fisher="type2")
    low_dense = low.to_dense()
    assert (spy.calls, spy.found) == (3, 3)
    full = fitted(method, model, loss_fn, [(x, y)], fisher="type2")
    full._rank_bounds = None  # as for a state without rank bounds: the full solver
    assert_close(low_dense, full.to_dense(), rtol=1e-10, what=method.__name__)


@pytest.mark.parametrize("method", [KFAC, TKFAC])
def test_input_changed_in_place_after_the_step_is_not_decomposed(
    monkeypatch: pytest.MonkeyPatch, method: type[KroneckerEstimate]
) -> None:
    """K-FAC and TKFAC never read a step's inputs again once folded: a batch overwritten in
    place before the refresh (a reused data buffer) leaves the convolution's kept input rows
    unused (the linear layer's are still decomposed), and the estimate as it was."""
    spy = SolverSpy(monkeypatch, "_eigh_rows")
    model, loss_fn, x, y = conv_then_linear()
    estimate = fitted(method, model, loss_fn, [(x, y)], fisher="mc", seed=3)
    expected = estimate.to_dense()
    calls = spy.calls
    changed = fitted(method, model, loss_fn, [(x, y)], fisher="mc", seed=3)
    x.mul_(2.0)
    assert_close(changed.to_dense(), expected, rtol=1e-10, what="refreshed after the change")
    assert (calls, spy.calls - calls) == (3, 2)


def test_rank_deficient_estimate_is_finite_and_solve_needs_damping() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=1)
    for method in METHODS:
        estimate = fitted(method, model, loss_fn, [(x, y)], fisher="type2")
        part = estimate.partition
        v = part.unflatten(torch.ones(part.numel, dtype=torch.float64))
        assert bool(torch.isfinite(estimate.to_dense()).all())
        assert all(bool(torch.isfinite(t).all()) for t in estimate.solve(v, 1e-3))
        with pytest.raises(ValueError, match="singular"):
            estimate.solve(v, 0.0)


@pytest.mark.parametrize(
    "t,route",
    [(1, "auto"), (1, "outer"), (1, "per_example"), (1, "gram"), (3, "auto"), (3, "gram"),
     (3, "per_example"), (8, "auto"), (8, "gram"), (8, "per_example")],
)
@pytest.mark.parametrize("bias", [False, True])
def test_eigenbasis_squares_routes_agree(t: int, route: SquaresRoute, bias: bool) -> None:
    """The one-matmul, per-example (rows rotated at T = 1, 3; formed gradients rotated on both
    sides at T = 8 > K·d_out, d_in') and Gram routes all equal
    Σ_{n,k} (U_outᵀ U_{n,k} U_in)^{∘2}, with or without the homogeneous coordinate (which the
    rotated routes add as the basis' last row)."""
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(5, t, 4, dtype=torch.float64, generator=gen)
    inputs = linear_rows(x, bias)
    rows = torch.cat([x, torch.ones(5, t, 1, dtype=torch.float64)], -1) if bias else x
    d_in = rows.shape[-1]
    grads = torch.randn(3, 5, t, 2, dtype=torch.float64, generator=gen)
    basis_in = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64, generator=gen))[0]
    basis_out = torch.linalg.qr(torch.randn(2, 2, dtype=torch.float64, generator=gen))[0]
    per_example = torch.einsum("knti,ntj->knij", grads, rows)
    expected = (basis_out.T @ per_example @ basis_in).square().sum((0, 1))
    blocks = grads.transpose(-1, -2).contiguous().transpose(-1, -2)  # a convolution's layout
    for layout, g in (("rows", grads), ("blocks", blocks)):
        for max_elements in (1, 1 << 20):  # chunks of one example, and all at once
            what = f"T={t}, {route}, {layout}, bias={bias}, max_elements={max_elements}"
            got = eigenbasis_squares(inputs, g, basis_in, basis_out, max_elements, route)
            assert_close(got, expected, rtol=1e-12, what=what)
            # Into a reused buffer: overwritten whatever it held, then added to; scaled by α.
            out = torch.full((16, padded_width(d_in)), math.nan, dtype=torch.float64)
            scaled = eigenbasis_squares(inputs, g[:1], basis_in, basis_out, max_elements, route,
                                        alpha=0.5, out=out)
            eigenbasis_squares(inputs, g[1:], basis_in, basis_out, max_elements, route,
                               alpha=0.5, out=out, accumulate=True)
            assert scaled.data_ptr() == out.data_ptr() and scaled.shape == expected.shape
            assert_close(scaled, 0.5 * expected, rtol=1e-12, what=f"{what}, out")


@pytest.mark.parametrize("route", ["auto", "per_example", "gram"])
@pytest.mark.parametrize("calls", [1, 2], ids=["convolved", "formed"])
def test_eigenbasis_squares_of_a_convolution(route: SquaresRoute, calls: int) -> None:
    """On a strided, padded convolution the routes equal Σ_{n,k} (U_outᵀ U_{n,k} U_in)^{∘2}
    whether its rows are rotated as a convolution (one call) or formed and multiplied (two
    calls, every call's positions side by side)."""
    gen = torch.Generator().manual_seed(calls)
    layer = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1).double()
    layout = LayerLayout("conv", layer, [layer.weight, layer.bias])
    xs = [torch.randn(4, 2, 5, 4, dtype=torch.float64, generator=gen) for _ in range(calls)]
    inputs = LayerInputs.recorded(layout, [LayerCall(x, layer(x), 0) for x in xs], torch.float64)
    rows = inputs.rows(0, 4)
    t, d_in = rows.shape[1:]
    grads = torch.randn(3, 4, 3, t, dtype=torch.float64, generator=gen).transpose(-1, -2)
    basis_in = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64, generator=gen))[0]
    basis_out = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=gen))[0]
    per_example = torch.einsum("knti,ntj->knij", grads, rows)
    expected = (basis_out.T @ per_example @ basis_in).square().sum((0, 1))
    for max_elements in (1, 1 << 20):
        got = eigenbasis_squares(inputs, grads, basis_in, basis_out, max_elements, route)
        assert_close(got, expected, rtol=1e-12, what=f"{route}, max_elements={max_elements}")


@pytest.mark.parametrize("column_major", [False, True])
def test_pad_columns_appends_zero_columns(column_major: bool) -> None:
    basis = torch.randn(5, 5, dtype=torch.float64)
    basis = basis.T.contiguous().T if column_major else basis
    padded = pad_columns(basis, multiple=4)
    assert padded.shape == (5, 8) and torch.equal(padded[:, :5], basis)
    assert not bool(padded[:, 5:].any())
    assert pad_columns(padded, multiple=4) is padded


def test_eigenbasis_squares_outer_route_needs_one_position() -> None:
    inputs, grads = linear_rows(torch.randn(2, 3, 4)), torch.randn(1, 2, 3, 2)
    with pytest.raises(ValueError, match="T=3"):
        eigenbasis_squares(inputs, grads, torch.eye(4), torch.eye(2), route="outer")


def test_eigenbasis_squares_refuses_a_wrong_or_missing_buffer() -> None:
    inputs, grads = linear_rows(torch.randn(2, 1, 4)), torch.randn(1, 2, 1, 2)
    with pytest.raises(ValueError, match=r"out has shape \(2, 4\).*\(16, 16\)"):
        eigenbasis_squares(inputs, grads, torch.eye(4), torch.eye(2), out=torch.empty(2, 4))
    with pytest.raises(ValueError, match="accumulate=True needs"):
        eigenbasis_squares(inputs, grads, torch.eye(4), torch.eye(2), accumulate=True)


def test_sequence_type2_per_term_splits_terms() -> None:
    """type2_columns="per_term" splits the type-2 vectors per loss term, so one datum of a
    sequence model gives exactly its GGN's trace (K = C would add cross-term products to EKFAC's
    diagonal)."""
    model, loss_fn, x, y = make_case("sequence", "mse", "sum", batch=1)
    estimate = fitted(EKFAC, model, loss_fn, [(x, y)], fisher="type2", type2_columns="per_term")
    reference = dense_ggn(model, loss_fn, x, y, estimate.partition)
    assert_close(estimate.trace(), torch.trace(reference), rtol=1e-10, what="trace")
    joint = fitted(EKFAC, model, loss_fn, [(x, y)], fisher="type2")
    assert abs(float(joint.trace() - torch.trace(reference))) > 1e-6


class TokenMixer(nn.Module):
    """Per-token Linear layers with a causal running sum over tokens in between."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(x)).cumsum(dim=1)).transpose(1, 2)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_type2_joint_columns_equal_per_term_when_positions_do_not_mix(loss: str) -> None:
    """K-FAC's G from the C joint columns, Σ_c (Σ_r J_rᵀ s_rc)(·)ᵀ, equals the per-term split when
    J_{t,r} = 0 for r ≠ t (per-token layers), and differs by the cross terms when tokens mix."""
    model, loss_fn, x, y = make_case("sequence", loss, "mean", batch=3)
    for method in (KFAC, TEKFAC):
        joint = fitted(method, model, loss_fn, [(x, y)], fisher="type2")
        split = fitted(method, model, loss_fn, [(x, y)], fisher="type2",
                       type2_columns="per_term")
        for layer, f in joint.factors().items():
            name = "G" if method is KFAC else "Psi_raw"
            assert_close(f[name], split.factors()[layer][name], rtol=1e-10, what=name)
    torch.manual_seed(0)
    mixer = TokenMixer().double()
    loss_fn = nn.CrossEntropyLoss()
    y = torch.randint(0, 3, (3, 4))
    joint = fitted(KFAC, mixer, loss_fn, [(x, y)], fisher="type2")
    split = fitted(KFAC, mixer, loss_fn, [(x, y)], fisher="type2", type2_columns="per_term")
    assert_close(joint.factors()["head"]["G"], split.factors()["head"]["G"], rtol=1e-10,
                 what="G after the mixing")
    difference = joint.factors()["embed"]["G"] - split.factors()["embed"]["G"]
    assert float(difference.abs().max()) > 1e-6
    with pytest.raises(ValueError, match="type2_columns"):
        KFAC(mixer, loss_fn, fisher="type2", type2_columns="columns")  # type: ignore[arg-type]
