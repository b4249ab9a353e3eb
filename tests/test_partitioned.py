"""Tests of the partitioned derivative tensors ḡ, H̄, D̄ (``curvlib.partitioned.derivatives``;
Wolinski, arXiv 2312.03885, ``research/wolinski.md`` §1.2 and the checks of §2.5).

Every reference is computed independently of the engines, in float64:

* H̄ = V ∇²L Vᵀ with the dense autograd Hessian (:func:`curvlib.testing.dense_projected_hessian`);
* ḡ_s, H̄_ss, D̄_sss by central finite differences of t ↦ L(θ + t u^{(s)});
* the full D̄ by differentiating the dense projected Hessian θ ↦ V ∇²L(θ) Vᵀ once more
  (``torch.autograd.functional.jacobian`` of ``hessian(create_graph=True)``) and contracting with V.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from curvlib import ExactHessian, Partition, PartitionedDerivatives, partitioned_derivatives
from curvlib.partitioned.cubic import solve_cubic_step
from curvlib.testing import assert_close, dense_projected_hessian, flat_function
from tests.cases import make_case

ENGINES = [("loop", None), ("batched", None), ("batched", 1), ("batched", 2)]
PARTITIONS: dict[str, Callable[[nn.Module], Partition]] = {
    "by_tensor": Partition.by_tensor,
    "by_module": Partition.by_module,
}


def random_direction(partition: Partition, seed: int = 1) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in partition.parameters]


def line_loss(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, partition: Partition,
              v: Tensor) -> Callable[[float], float]:
    """t ↦ L(θ + t v) for a P-vector v in the dense order."""
    outputs_of, theta0 = flat_function(model, partition, x)

    def f(t: float) -> float:
        with torch.no_grad():
            return float(loss_fn(outputs_of(theta0 + t * v), y))

    return f


def central_differences(f: Callable[[float], float], h: float) -> tuple[float, float, float]:
    """Central differences for f'(0), f''(0), f'''(0), with O(h²) truncation error."""
    f2, f1, f0, fm1, fm2 = f(2 * h), f(h), f(0.0), f(-h), f(-2 * h)
    return ((f1 - fm1) / (2 * h), (f1 - 2 * f0 + fm1) / h**2,
            (f2 - 2 * f1 + 2 * fm1 - fm2) / (2 * h**3))


def line_derivatives(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor,
                     partition: Partition, v: Tensor) -> tuple[float, ...]:
    """f'(0), f''(0), f'''(0) of f(t) = L(θ + t v) by Richardson-extrapolated central differences
    (4·D(h/2) − D(h))/3, whose O(h⁴) truncation error allows a step large enough to keep the
    rounding error of f''' (≈ ε/h³) small; h = 1e-2/‖v‖ makes the accuracy independent of ‖v‖."""
    f = line_loss(model, loss_fn, x, y, partition, v)
    h = 1e-2 / float(v.norm())
    coarse, fine = central_differences(f, h), central_differences(f, h / 2)
    return tuple((4 * b - a) / 3 for a, b in zip(coarse, fine))


def dense_third(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, partition: Partition,
                direction: list[Tensor]) -> Tensor:
    """D̄_rst = Σ_p ∂_p(V ∇²L Vᵀ)_rs V_tp, with the Hessian by autograd's functional API."""
    outputs_of, theta0 = flat_function(model, partition, x)
    blocks = partition.block_directions(direction)

    def projected(theta: Tensor) -> Tensor:
        hess = torch.autograd.functional.hessian(
            lambda t: loss_fn(outputs_of(t), y), theta, create_graph=True)
        return blocks @ hess @ blocks.T

    jac = torch.autograd.functional.jacobian(projected, theta0)  # [S, S, P]
    return jac @ blocks.T


# ----------------------------------------------------------------------------- H̄ against autograd
@pytest.mark.parametrize("name", ["mlp", "cnn", "residual", "shared"])
@pytest.mark.parametrize("kind", list(PARTITIONS))
def test_hessian_equals_dense_projection(name: str, kind: str) -> None:
    model, loss_fn, x, y = make_case(name, batch=4)
    partition = PARTITIONS[kind](model)
    u = random_direction(partition)
    expected = dense_projected_hessian(model, loss_fn, x, y, partition, u)
    for method, chunk in ENGINES:
        pd = partitioned_derivatives(model, loss_fn, x, y, u, partition, order=2,
                                     method=method, chunk_size=chunk)
        assert_close(pd.H, expected, rtol=1e-10, atol=1e-13, what=f"H {method}/{chunk}")
        assert pd.D is None
        assert torch.equal(pd.H, pd.H.T)


def test_gradient_equals_dense_projection_and_order_one() -> None:
    model, loss_fn, x, y = make_case("cnn", batch=4)
    partition = Partition.by_tensor(model)
    u = random_direction(partition)
    outputs_of, theta0 = flat_function(model, partition, x)
    full = torch.func.grad(lambda t: loss_fn(outputs_of(t), y))(theta0)
    expected = partition.block_directions(u) @ full
    for method, chunk in ENGINES[:2]:
        pd = partitioned_derivatives(model, loss_fn, x, y, u, partition, order=1, method=method,
                                     chunk_size=chunk)
        assert pd.H is None and pd.D is None
        assert_close(pd.g, expected, rtol=1e-12, atol=1e-15, what=f"g {method}")


# ----------------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("name", ["mlp", "residual"])
@pytest.mark.parametrize("method", ["loop", "batched"])
def test_diagonals_match_finite_differences(name: str, method: str) -> None:
    model, loss_fn, x, y = make_case(name, batch=5)
    partition = Partition.by_tensor(model)
    u = random_direction(partition)
    pd = partitioned_derivatives(model, loss_fn, x, y, u, partition, method=method)
    blocks = partition.block_directions(u)
    for s in range(len(partition)):
        d1, d2, d3 = line_derivatives(model, loss_fn, x, y, partition, blocks[s])
        assert pd.g[s].item() == pytest.approx(d1, rel=1e-8, abs=1e-10)
        assert pd.H[s, s].item() == pytest.approx(d2, rel=1e-8, abs=1e-9)
        assert pd.D[s].item() == pytest.approx(d3, rel=1e-6, abs=1e-7)


def test_off_diagonal_entries_satisfy_polarization() -> None:
    """H̄_st = ½(q(u^{(s)} + u^{(t)}) − q(u^{(s)}) − q(u^{(t)})), q(v) = d²/dt² L(θ + t v)."""
    model, loss_fn, x, y = make_case("mlp", batch=5)
    partition = Partition.by_module(model)
    u = random_direction(partition)
    pd = partitioned_derivatives(model, loss_fn, x, y, u, partition, order=2)
    blocks = partition.block_directions(u)

    def q(v: Tensor) -> float:
        return line_derivatives(model, loss_fn, x, y, partition, v)[1]

    expected = 0.5 * (q(blocks[0] + blocks[1]) - q(blocks[0]) - q(blocks[1]))
    assert pd.H[0, 1].item() == pytest.approx(expected, rel=1e-8, abs=1e-9)


# ----------------------------------------------------------------------------- full D̄
@pytest.mark.parametrize("name,kind", [("mlp", "by_tensor"), ("residual", "by_module"),
                                       ("cnn", "by_module")])
def test_full_third_equals_nested_autograd(name: str, kind: str) -> None:
    model, loss_fn, x, y = make_case(name, batch=3)
    partition = PARTITIONS[kind](model)
    u = random_direction(partition)
    expected = dense_third(model, loss_fn, x, y, partition, u)
    for method, chunk in ENGINES:
        pd = partitioned_derivatives(model, loss_fn, x, y, u, partition, third="full",
                                     method=method, chunk_size=chunk)
        assert_close(pd.D, expected, rtol=1e-9, atol=1e-13, what=f"D {method}/{chunk}")
        for perm in itertools.permutations(range(3)):
            assert torch.equal(pd.D, pd.D.permute(*perm))
        diag = partitioned_derivatives(model, loss_fn, x, y, u, partition, third="diag",
                                       method=method, chunk_size=chunk)
        assert_close(diag.D, pd.diagonal_third(), rtol=1e-12, atol=1e-15, what="diag D")


def test_quadratic_loss_has_zero_third_derivative() -> None:
    """Linear model + MSE: L is quadratic in θ, so D̄ = 0 and H̄ = V A Vᵀ with A constant."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    for p in model[0].parameters():  # a quadratic L needs a model linear in its parameters
        p.requires_grad_(False)
    loss_fn = nn.MSELoss()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    partition = Partition.by_tensor(model)
    u = random_direction(partition)
    expected_H = dense_projected_hessian(model, loss_fn, x, y, partition, u)
    for method, chunk in ENGINES[:2]:
        for third in ("diag", "full"):
            pd = partitioned_derivatives(model, loss_fn, x, y, u, partition, third=third,
                                         method=method, chunk_size=chunk)
            assert torch.count_nonzero(pd.D) == 0
            assert_close(pd.H, expected_H, rtol=1e-12, what="H of a quadratic")


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize("method", ["loop", "batched"])
def test_homogeneity_in_the_direction(method: str) -> None:
    model, loss_fn, x, y = make_case("residual", batch=4)
    partition = Partition.by_tensor(model)
    u = random_direction(partition)
    c = -1.7
    pd = partitioned_derivatives(model, loss_fn, x, y, u, partition, third="full", method=method)
    scaled = partitioned_derivatives(model, loss_fn, x, y, [c * t for t in u], partition,
                                     third="full", method=method)
    assert_close(scaled.g, c * pd.g, rtol=1e-12, what="degree 1")
    assert_close(scaled.H, c**2 * pd.H, rtol=1e-12, what="degree 2")
    assert_close(scaled.D, c**3 * pd.D, rtol=1e-12, what="degree 3")


def test_per_subset_scaling() -> None:
    """Scaling u_s by a_s scales ḡ_s by a_s, H̄_st by a_s a_t, D̄_rst by a_r a_s a_t."""
    model, loss_fn, x, y = make_case("mlp", batch=4)
    partition = Partition.by_tensor(model)
    u = random_direction(partition)
    a = torch.tensor([2.0, -0.5, 3.0, 0.25], dtype=torch.float64)
    pd = partitioned_derivatives(model, loss_fn, x, y, u, partition, third="full")
    scaled = partitioned_derivatives(model, loss_fn, x, y, partition.scale(u, a), partition,
                                     third="full")
    assert_close(scaled.g, a * pd.g, rtol=1e-12, what="g")
    assert_close(scaled.H, torch.outer(a, a) * pd.H, rtol=1e-12, what="H")
    assert_close(scaled.D, torch.einsum("r,s,t->rst", a, a, a) * pd.D, rtol=1e-12, what="D")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_coarsening_the_partition_sums_entries(name: str) -> None:
    model, loss_fn, x, y = make_case(name, batch=4)
    fine, coarse = Partition.by_tensor(model), Partition.by_module(model)
    assert [id(p) for p in fine.parameters] == [id(p) for p in coarse.parameters]
    u = random_direction(fine)
    # M[a, s] = 1 when tensor-subset s lies in module-subset a.
    membership = torch.zeros(len(coarse), len(fine), dtype=torch.float64)
    membership[coarse.subset_of, torch.arange(len(fine))] = 1.0
    pf = partitioned_derivatives(model, loss_fn, x, y, u, fine, third="full")
    pc = partitioned_derivatives(model, loss_fn, x, y, u, coarse, third="full", method="batched")
    assert_close(pc.g, membership @ pf.g, rtol=1e-12, what="g")
    assert_close(pc.H, membership @ pf.H @ membership.T, rtol=1e-12, what="H")
    summed = torch.einsum("ar,bs,ct,rst->abc", membership, membership, membership, pf.D)
    assert_close(pc.D, summed, rtol=1e-11, what="D")
    single = Partition([fine.parameters])  # S = 1: the ordinary directional derivatives
    p1 = partitioned_derivatives(model, loss_fn, x, y, u, single)
    assert_close(p1.g, pf.g.sum().reshape(1), rtol=1e-12, what="S=1 g")
    assert_close(p1.H, pf.H.sum().reshape(1, 1), rtol=1e-12, what="S=1 H")
    assert_close(p1.D, pf.D.sum().reshape(1), rtol=1e-11, what="S=1 D")


def test_sequence_outputs() -> None:
    """Per-token cross-entropy over [N, C, T] outputs."""
    model, loss_fn, x, y = make_case("sequence", batch=3)
    partition = Partition.by_module(model)
    u = random_direction(partition)
    expected = dense_projected_hessian(model, loss_fn, x, y, partition, u)
    for method in ("loop", "batched"):
        pd = partitioned_derivatives(model, loss_fn, x, y, u, partition, order=2, method=method)
        assert_close(pd.H, expected, rtol=1e-10, atol=1e-13, what=f"sequence H {method}")


def test_results_detached_in_parameter_dtype_and_model_untouched() -> None:
    model, loss_fn, x, y = make_case("mlp", batch=4, dtype=torch.float32)
    partition = Partition.by_tensor(model)
    u = [t.double() for t in random_direction(partition)]  # cast to the parameters' dtype
    before = [p.detach().clone() for p in model.parameters()]
    for method in ("loop", "batched"):
        pd = partitioned_derivatives(model, loss_fn, x, y, u, partition, third="full",
                                     method=method)
        for value in (pd.g, pd.H, pd.D):
            assert value.dtype == torch.float32 and not value.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    model64 = copy.deepcopy(model).double()
    ref = partitioned_derivatives(model64, loss_fn, x.double(), y, u, Partition.by_tensor(model64))
    assert_close(pd.H, ref.H, rtol=1e-5, what="float32 H")


class WithUnused(nn.Module):
    """An MLP plus a layer the forward never calls: its subset has zero derivatives."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(2, 2)
        self.body = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def test_unused_parameters_give_zero_entries() -> None:
    torch.manual_seed(0)
    model = WithUnused().double()
    _, loss_fn, x, y = make_case("mlp", batch=4)
    partition = Partition.by_module(model)
    u = random_direction(partition)
    for method in ("loop", "batched"):
        pd = partitioned_derivatives(model, loss_fn, x, y, u, partition, third="full",
                                     method=method)
        assert pd.g[0] == 0 and torch.count_nonzero(pd.H[0]) == 0
        assert torch.count_nonzero(pd.D[0]) == 0 and torch.count_nonzero(pd.D[1:, 1:, 1:]) > 0
        expected = dense_projected_hessian(model, loss_fn, x, y, partition, u)
        assert_close(pd.H, expected, rtol=1e-10, atol=1e-13, what=f"H with unused {method}")


def test_default_partition_is_by_tensor() -> None:
    model, loss_fn, x, y = make_case("mlp", batch=4)
    u = random_direction(Partition.by_tensor(model))
    default = partitioned_derivatives(model, loss_fn, x, y, u, order=2)
    explicit = partitioned_derivatives(model, loss_fn, x, y, u, Partition.by_tensor(model),
                                       order=2)
    assert torch.equal(default.H, explicit.H) and default.H.shape == (4, 4)


# ----------------------------------------------------------------------------- ExactHessian
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_hessian_reduced_equals_dense_projection(reduction: str) -> None:
    model, loss_fn, x, y = make_case("cnn", batch=5, reduction=reduction)
    partition = Partition.by_module(model)
    estimate = ExactHessian(model, loss_fn, partition)
    estimate.update(x[:2], y[:2])  # batches of different sizes: weights 2/5 and 3/5 for "mean"
    estimate.update(x[2:], y[2:])
    u = random_direction(partition)
    expected = dense_projected_hessian(model, loss_fn, x, y, partition, u)
    assert_close(estimate.reduced(u), expected, rtol=1e-10, atol=1e-13, what="reduced")
    with pytest.raises(ValueError, match="u has 3 tensors"):
        estimate.reduced(u[:3])


# ----------------------------------------------------------------------------- bad input
def test_direction_mismatch_raises() -> None:
    model, loss_fn, x, y = make_case("mlp", batch=3)
    partition = Partition.by_tensor(model)
    u = random_direction(partition)
    with pytest.raises(ValueError, match="direction has 3 tensors"):
        partitioned_derivatives(model, loss_fn, x, y, u[:3], partition)
    with pytest.raises(ValueError, match=r"direction\[0\] has shape \(20,\)"):
        partitioned_derivatives(model, loss_fn, x, y, [u[0].flatten(), *u[1:]], partition)
    with pytest.raises(ValueError, match=r"direction\[0\] has shape \(4,\)"):  # order swapped
        partitioned_derivatives(model, loss_fn, x, y, [u[1], u[0], *u[2:]], partition)
    reordered = Partition([partition.groups[2], partition.groups[0]])  # wb-like reordering
    with pytest.raises(ValueError, match=r"direction\[0\] has shape \(4, 5\)"):
        partitioned_derivatives(model, loss_fn, x, y, [u[0], u[2]], reordered)
    with pytest.raises(ValueError, match="must be a list of tensors"):
        partitioned_derivatives(model, loss_fn, x, y, partition.flatten(u), partition)
    bad = [u[0].clone(), *u[1:]]
    bad[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"direction\[0\] \('0.weight'\) has non-finite"):
        partitioned_derivatives(model, loss_fn, x, y, bad, partition)


@pytest.mark.parametrize("kwargs,match", [
    ({"order": 4}, "order must be"),
    ({"order": True}, "order must be"),
    ({"third": "diagonal"}, "third must be"),
    ({"method": "vmap"}, "method must be"),
    ({"chunk_size": 0}, "chunk_size must be"),
    ({"chunk_size": 2.0}, "chunk_size must be"),
])
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    model, loss_fn, x, y = make_case("mlp", batch=3)
    u = random_direction(Partition.by_tensor(model))
    with pytest.raises(ValueError, match=match):
        partitioned_derivatives(model, loss_fn, x, y, u, **kwargs)


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_bad_loss_or_model_raises(method: str) -> None:
    model, loss_fn, x, y = make_case("mlp", batch=3)
    u = random_direction(Partition.by_tensor(model))
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="loss of this batch is not finite"):
        partitioned_derivatives(model, loss_fn, x_bad, y, u, method=method)
    x_bad[0, 0] = float("inf")  # tanh saturates: a finite loss, but 0·inf in its derivatives
    with pytest.raises(ValueError, match="g, H, D not finite"):
        partitioned_derivatives(model, loss_fn, x_bad, y, u, method=method)
    with pytest.raises(ValueError, match="scalar"):
        partitioned_derivatives(model, nn.CrossEntropyLoss(reduction="none"), x, y, u,
                                method=method)
    other = nn.Linear(5, 4).double()
    with pytest.raises(ValueError, match="not parameters of the model"):
        partitioned_derivatives(model, loss_fn, x, y, u[:2], Partition.by_tensor(other),
                                method=method)
    partition = Partition.by_tensor(model)  # also a partition of the models below
    for layer in (nn.BatchNorm1d(4), nn.Dropout(0.5)):
        noisy = nn.Sequential(model[0], layer, *model[1:]).double()
        with pytest.raises(ValueError, match=r"Module '1' .* training mode"):
            partitioned_derivatives(noisy, loss_fn, x, y, u, partition, method=method)
        noisy.eval()
        partitioned_derivatives(noisy, loss_fn, x, y, u, partition, order=1, method=method)


# ----------------------------------------------------------------------------- the dataclass
def spd_example() -> PartitionedDerivatives:
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    H = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]], dtype=torch.float64)
    D = torch.tensor([0.3, -8.0, 1.0], dtype=torch.float64)
    return PartitionedDerivatives(g=g, H=H, D=D)


def test_learning_rates_solve_the_damped_system() -> None:
    pd = spd_example()
    for damping in (0.0, 0.7):
        eta = pd.learning_rates(damping)
        assert_close((pd.H + damping * torch.eye(3, dtype=torch.float64)) @ eta, pd.g,
                     rtol=1e-13, what="(H + ρI)η = g")
    indefinite = PartitionedDerivatives(g=pd.g, H=torch.diag(torch.tensor(
        [1.0, -2.0, 3.0], dtype=torch.float64)))
    assert_close(indefinite.learning_rates(), pd.g / torch.tensor([1.0, -2.0, 3.0]).double(),
                 rtol=1e-14, what="indefinite H: the stationary point")
    singular = PartitionedDerivatives(g=pd.g, H=torch.tensor(
        [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="singular"):
        singular.learning_rates()
    assert torch.isfinite(singular.learning_rates(damping=1e-3)).all()
    with pytest.raises(ValueError, match="damping"):
        pd.learning_rates(-1.0)
    with pytest.raises(ValueError, match="needs H"):
        PartitionedDerivatives(g=pd.g).learning_rates()


def test_float32_learning_rates_keep_the_dtype() -> None:
    pd = spd_example()
    single = PartitionedDerivatives(g=pd.g.float(), H=pd.H.float(), D=pd.D.float())
    assert single.learning_rates().dtype == torch.float32
    assert single.cubic_step().dtype == torch.float32
    assert_close(single.learning_rates(), pd.learning_rates(), rtol=1e-6, what="float32 η")


def test_cubic_step_uses_the_cube_root_of_the_diagonal() -> None:
    pd = spd_example()
    d = pd.D.abs() ** (1 / 3)
    expected = solve_cubic_step(pd.g, pd.H, d, 2.0)
    result = pd.cubic_step_result(2.0)
    assert result.success and result.case == "interior"
    assert_close(result.eta, expected.eta, rtol=1e-14, what="η*")
    assert_close(pd.cubic_step(2.0), expected.eta, rtol=1e-14, what="cubic_step")
    # The step equation of the paper: (H + (λ/2)‖Dη‖ D²) η = g.
    eta = result.eta
    residual = (pd.H + torch.diag(d**2) * torch.linalg.norm(d * eta)) @ eta - pd.g
    assert float(residual.abs().max()) < 1e-10
    full = torch.zeros(3, 3, 3, dtype=torch.float64)
    full[0, 1, 2] = 5.0  # off-diagonal entries of a full D̄ do not enter the model
    full[range(3), range(3), range(3)] = pd.D
    from_full = PartitionedDerivatives(g=pd.g, H=pd.H, D=full)
    assert_close(from_full.cubic_step(2.0), result.eta, rtol=1e-14, what="η* from a full D")
    assert_close(pd.cubic_step(0.0), pd.learning_rates(), rtol=1e-12, what="λ_int = 0: Newton")


def test_cubic_step_without_minimiser_reports_or_raises() -> None:
    """d = 0 on a subset where H̄ is negative: T is unbounded below, there is no step."""
    g = torch.tensor([1.0, 1.0], dtype=torch.float64)
    H = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    pd = PartitionedDerivatives(g=g, H=H, D=torch.tensor([1.0, 0.0], dtype=torch.float64))
    result = pd.cubic_step_result()
    assert not result.success and result.case == "unbounded"
    assert torch.equal(result.eta, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="no step"):
        pd.cubic_step()
    with pytest.raises(ValueError, match="no third derivative"):
        PartitionedDerivatives(g=g, H=H).cubic_step()


@pytest.mark.parametrize("fields,match", [
    ({"g": torch.zeros(2, 2)}, "g must have shape"),
    ({"g": torch.zeros(0)}, "g must have shape"),
    ({"g": [1.0, 2.0]}, "g must be a real floating-point tensor"),
    ({"g": torch.tensor([1, 2])}, "g must be a real floating-point tensor"),
    ({"g": torch.zeros(2), "H": torch.zeros(3, 3)}, r"H must have shape \(2, 2\)"),
    ({"g": torch.zeros(2), "H": torch.eye(2), "D": torch.zeros(2, 2)}, "D must have shape"),
    ({"g": torch.zeros(2), "D": torch.zeros(2)}, "D was given without H"),
    ({"g": torch.tensor([0.0, float("nan")])}, "g has non-finite"),
    ({"g": torch.zeros(2), "H": torch.full((2, 2), float("inf"))}, "H has non-finite"),
])
def test_dataclass_validates_its_fields(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PartitionedDerivatives(**fields)
