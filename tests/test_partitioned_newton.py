"""PartitionedNewton (Wolinski, arXiv 2312.03885, ``research/wolinski.md`` §3-§4), in float64.

The central check is the invariance of §3.4: a model whose layers use a_s·θ̃_s for their tensors,
trained from θ̃ = θ/a, must follow the same trajectory in θ as the plain model, for the Newton
(order 2) and the cubic (order 3) steps, with the SGD-momentum updater (c_s = a_s).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlib import Partition
from curvlib.optim import PartitionedNewton
from curvlib.partitioned.cubic import solve_cubic_step
from curvlib.testing import assert_close, dense_projected_hessian
from tests.cases import make_case


class ScaledMLP(nn.Module):
    """A tanh MLP 5-4-3 whose forward uses a_s·θ̃_s for its four tensors (a_s fixed)."""

    def __init__(self, scales: Sequence[float]) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 4)
        self.out = nn.Linear(4, 3)
        self.scales = tuple(scales)

    def forward(self, x: Tensor) -> Tensor:
        a = self.scales
        h = torch.tanh(F.linear(x, a[0] * self.hidden.weight, a[1] * self.hidden.bias))
        return F.linear(h, a[2] * self.out.weight, a[3] * self.out.bias)


def closure_for(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def data(n: int = 48, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    return x, (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()


def train(model: nn.Module, opt: PartitionedNewton, x: Tensor, y: Tensor, steps: range,
          loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> list[float]:
    """Training batches of 8 cycling over the first 32 examples; derivative batches of 16 from the
    last 16 (separate, as in the paper)."""
    losses = []
    for k in steps:
        lo = 8 * (k % 4)
        batch = (x[32:], y[32:]) if opt.will_evaluate else (None, None)
        loss = opt.step(closure_for(model, loss_fn, opt, x[lo:lo + 8], y[lo:lo + 8]), *batch)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize(
    "order,normalize,clip", [(2, False, True), (3, False, True), (3, False, False), (3, True, True)]
)
def test_trajectory_is_invariant_to_per_subset_rescaling(order: int, normalize: bool, clip: bool
                                                         ) -> None:
    scales = (2.0, 0.5, 3.0, 0.25)
    torch.manual_seed(0)
    plain = ScaledMLP((1.0,) * 4).double()
    scaled = copy.deepcopy(plain)
    scaled.scales = scales
    with torch.no_grad():
        for p, a in zip(scaled.parameters(), scales):
            p.div_(a)
    x, y = data()
    options = {"order": order, "lr": 0.5, "period": 2, "window": 2, "warmup": 1,
               "normalize_direction": normalize, "clip_negative": clip}
    opt_plain = PartitionedNewton(plain.parameters(), plain, F.cross_entropy, **options)
    opt_scaled = PartitionedNewton(scaled.parameters(), scaled, F.cross_entropy, **options)
    start = [p.detach().clone() for p in plain.parameters()]
    for k in range(12):
        train(plain, opt_plain, x, y, range(k, k + 1))
        train(scaled, opt_scaled, x, y, range(k, k + 1))
        for i, (p, q, a) in enumerate(zip(plain.parameters(), scaled.parameters(), scales)):
            assert_close(a * q.detach(), p.detach(), rtol=1e-9, what=f"step {k}, tensor {i}")
    # a real trajectory (clipping may hold some subsets still)
    assert sum(not torch.equal(p, s) for p, s in zip(plain.parameters(), start)) >= 2
    # η̃_s = η_s / (a_s c_s): c_s = a_s for momentum; normalised, ũ_s = u_s/‖u_s‖ has the same
    # coordinates in θ̃ as in θ, so c_s = 1.
    a = torch.tensor(scales, dtype=torch.float64)
    factor = a if normalize else a**2
    for rec_p, rec_s in zip(opt_plain.history[1:], opt_scaled.history[1:]):
        assert rec_p.success and rec_s.success
        assert_close(rec_s.eta * factor, rec_p.eta, rtol=1e-8, what="η̃·a·c")


@pytest.mark.parametrize("order,updater", [(3, "sgd"), (3, "adam"), (2, "sgd")])
def test_training_decreases_the_loss(order: int, updater: str) -> None:
    torch.manual_seed(1)
    model = ScaledMLP((1.0,) * 4).double()
    x, y = data(seed=1)
    opt = PartitionedNewton(model.parameters(), model, F.cross_entropy, order=order,
                            updater=updater, lr=0.3, period=3, warmup=1)
    with torch.no_grad():
        start = float(F.cross_entropy(model(x[:32]), y[:32]))
    train(model, opt, x, y, range(60))
    with torch.no_grad():
        end = float(F.cross_entropy(model(x[:32]), y[:32]))
    assert end < 0.8 * start, (start, end)
    assert sum(r.success for r in opt.history) >= len(opt.history) - 2


@pytest.mark.parametrize("normalize", [False, True])
def test_one_step_moves_each_subset_by_lr_eta_along_its_direction(normalize: bool) -> None:
    model, loss_fn, x, y = make_case("mlp", batch=10)
    opt = PartitionedNewton(model.parameters(), model, loss_fn, lr=0.7, momentum=0.0, period=1,
                            warmup=0, window=0, normalize_direction=normalize, clip_negative=False)
    start = copy.deepcopy(model)
    part = Partition.by_tensor(start)
    u = list(torch.autograd.grad(loss_fn(start(x[:4]), y[:4]), list(start.parameters())))
    if normalize:
        u = part.scale(u, 1.0 / part.subset_dots(u, u).sqrt())
    opt.step(closure_for(model, loss_fn, opt, x[:4], y[:4]), x[4:], y[4:])
    record = opt.history[0]
    # the derivatives are taken along u on the separate batch, at the parameters before the step
    grads = torch.autograd.grad(loss_fn(start(x[4:]), y[4:]), list(start.parameters()))
    assert_close(record.g, part.subset_dots(list(grads), u), rtol=1e-10, what="ḡ")
    H_ref = dense_projected_hessian(start, loss_fn, x[4:], y[4:], part, u)
    assert_close(record.H, H_ref, rtol=1e-9, what="H̄")
    assert record.count == 1 and torch.equal(record.H_avg, record.H)
    eta = solve_cubic_step(record.g, record.H, record.D.abs() ** (1 / 3), 1.0).eta
    assert_close(opt.last_eta, eta, rtol=1e-12, what="η")
    for p, b, ui, e in zip(model.parameters(), start.parameters(), u, eta):
        assert_close(p.detach(), b.detach() - 0.7 * e * ui, rtol=1e-12, what="θ − λ₁ η_s u_s")


@pytest.mark.parametrize("window,counts", [(2, [1, 2, 3, 4, 3, 4, 3]), (0, [1] * 7)])
def test_window_average_is_the_mean_since_the_previous_window(window: int, counts: list[int]
                                                              ) -> None:
    model, loss_fn, x, y = make_case("mlp", batch=12)
    opt = PartitionedNewton(model.parameters(), model, loss_fn, period=1, window=window,
                            warmup=0)
    for _ in range(7):
        opt.step(closure_for(model, loss_fn, opt, x[:6], y[:6]), x[6:], y[6:])
    assert [r.count for r in opt.history] == counts
    for n, record in enumerate(opt.history):
        # all evaluations since the start of the previous complete window of `window`
        first = 0 if window == 0 or n < window else (n // window - 1) * window
        first = n if window == 0 else first
        members = opt.history[first:n + 1]
        assert len(members) == record.count
        for name in ("g", "H", "D"):
            mean = torch.stack([getattr(m, name) for m in members]).mean(0)
            assert_close(getattr(record, f"{name}_avg"), mean, rtol=1e-12, what=name)


def test_warmup_does_not_move_the_parameters() -> None:
    model, loss_fn, x, y = make_case("mlp", batch=12)
    opt = PartitionedNewton(model.parameters(), model, loss_fn, period=3, warmup=2)
    start = [p.detach().clone() for p in model.parameters()]
    for k in range(7):
        batch = (x[6:], y[6:]) if opt.will_evaluate else (None, None)
        opt.step(closure_for(model, loss_fn, opt, x[:6], y[:6]), *batch)
        unmoved = all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
        assert unmoved == (k < 6), k
    assert [r.warmup for r in opt.history] == [True, True, False]
    assert [r.eta is None for r in opt.history] == [True, True, False]
    # the updater ran during warm-up: its buffer holds the momentum of all 7 gradients
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


def quadratic_loss(out: Tensor, weight: Tensor) -> Tensor:
    """mean_n w_n·out_n²: convex for w > 0, concave for w < 0, flat for w = 0; D̄ = 0."""
    return (weight * out.squeeze(-1) ** 2).mean()


@pytest.mark.parametrize("order,bad_weight,case", [(3, -1.0, "unbounded"), (2, 0.0, "failed")])
def test_solver_failure_keeps_the_previous_eta(order: int, bad_weight: float, case: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    ones = torch.ones(8, dtype=torch.float64)
    opt = PartitionedNewton(model.parameters(), model, quadratic_loss, order=order, lr=0.5,
                            period=1, window=0, warmup=0, momentum=0.0)
    closure = closure_for(model, quadratic_loss, opt, x, ones)
    opt.step(closure, x, ones)
    good = opt.last_eta
    assert opt.history[0].success and good is not None
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure, x, bad_weight * ones)
    assert not opt.history[1].success and opt.history[1].case == case
    assert "previous η is kept" in opt.history[1].message
    assert torch.equal(opt.last_eta, good)
    # the kept η still moves the parameters along the new direction
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_plateau_halves_the_global_multiplier() -> None:
    model, loss_fn, x, y = make_case("mlp")
    opt = PartitionedNewton(model.parameters(), model, loss_fn, lr=0.4)
    reduced = [opt.scheduler_step(v) for v in [1.0, 0.9, 0.9, 0.89999, 0.9]]
    assert reduced == [False, False, False, False, True]  # 3 epochs > patience 2 without a
    assert opt.param_groups[0]["lr"] == 0.2  # relative improvement of 1e-4
    reduced = [opt.scheduler_step(torch.tensor(v)) for v in [0.8, 0.8, 0.8, 0.8]]
    assert reduced == [False, False, False, True]
    assert opt.param_groups[0]["lr"] == 0.1
    # the halved λ₁ is the one applied
    opt.warmup, opt.period = 0, 1
    start = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(model, loss_fn, opt, x, y), x, y)
    u = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    for p, s, ui, e in zip(model.parameters(), start, u, opt.last_eta):
        assert_close(p.detach(), s - 0.1 * e * ui, rtol=1e-12, what="step with λ₁ = 0.1")


@pytest.mark.parametrize("updater", ["sgd", "adam"])
def test_state_dict_round_trip_continues_the_same_trajectory(updater: str) -> None:
    x, y = data()
    torch.manual_seed(2)
    model = ScaledMLP((1.0,) * 4).double()
    options = {"updater": updater, "lr": 0.3, "period": 2, "window": 2, "warmup": 1}
    opt = PartitionedNewton(model.parameters(), model, F.cross_entropy, **options)
    train(model, opt, x, y, range(7))
    opt.scheduler_step(1.0)
    opt.scheduler_step(2.0)
    saved = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    train(model, opt, x, y, range(7, 12))
    expected = [p.detach().clone() for p in model.parameters()]
    twin = ScaledMLP((1.0,) * 4).double()
    twin.load_state_dict(weights)
    opt_twin = PartitionedNewton(twin.parameters(), twin, F.cross_entropy, **options)
    opt_twin.load_state_dict(saved)
    assert torch.equal(opt_twin.last_eta, saved["partitioned_newton"]["eta"])
    train(twin, opt_twin, x, y, range(7, 12))
    for p, e in zip(twin.parameters(), expected):
        assert torch.equal(p.detach(), e)
    assert [r.count for r in opt_twin.history] == [r.count for r in opt.history[4:]]
    assert opt_twin.scheduler_step(2.0) == opt.scheduler_step(2.0)


def test_bad_input_raises() -> None:
    model, loss_fn, x, y = make_case("mlp")
    params = list(model.parameters())
    make = PartitionedNewton
    for kwargs, name in [
        ({"order": 4}, "order"), ({"updater": "lbfgs"}, "updater"), ({"lr": 0.0}, "lr"),
        ({"lambda_int": -1.0}, "lambda_int"), ({"momentum": 1.5}, "momentum"),
        ({"betas": (1.0, 0.9)}, "betas"), ({"eps": 0.0}, "eps"), ({"period": 0}, "period"),
        ({"window": -1}, "window"), ({"warmup": 1.5}, "warmup"), ({"ridge": -1.0}, "ridge"),
        ({"clip_negative": None}, "clip_negative"), ({"plateau_patience": -1}, "patience"),
        ({"plateau_factor": 0.0}, "plateau_factor"), ({"plateau_factor": 2.0}, "plateau_factor"),
        ({"plateau_threshold": float("inf")}, "plateau_threshold"),
        ({"normalize_direction": 1}, "normalize_direction"), ({"chunk_size": 0}, "chunk_size"),
        ({"partition": Partition([params[:2], params[2:3]])}, "partition"),
    ]:
        with pytest.raises(ValueError, match=name):
            make(params, model, loss_fn, **kwargs)
    with pytest.raises(ValueError, match="params is empty"):
        make([], model, loss_fn)
    with pytest.raises(ValueError, match="parameter groups"):
        make([{"params": params}], model, loss_fn)
    with pytest.raises(ValueError, match="not parameters of the model"):
        make([nn.Parameter(torch.zeros(2))], model, loss_fn)
    with pytest.raises(ValueError, match=r"model must be a torch\.nn\.Module"):
        make(params, "mlp", loss_fn)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_fn"):
        make(params, model, "cross_entropy")  # type: ignore[arg-type]
    opt = make(params, model, loss_fn)
    with pytest.raises(ValueError, match="no gradient"):
        opt.step(inputs=x, targets=y)
    with pytest.raises(ValueError, match="needs their batch"):
        opt.step(closure_for(model, loss_fn, opt, x, y))
    with pytest.raises(ValueError, match="epoch_loss"):
        opt.scheduler_step(float("nan"))
    with pytest.raises(ValueError, match="partitioned_newton"):
        opt.load_state_dict(torch.optim.SGD(params, lr=0.1).state_dict())
