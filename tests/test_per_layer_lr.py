"""PerLayerLR: per-subset learning rates from a curvature estimate on top of a torch optimizer
(Wolinski, arXiv 2312.03885, ``research/wolinski.md`` §3.1), in float64.

The base optimizer's own step is reproduced independently on a deep copy of the model and the
optimizer, so that "the applied step is η_s times the base step" is checked against a step the
wrapper never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from curvlib import KFAC, ExactHessian, Partition
from curvlib.optim import NaturalGradient, PerLayerLR
from curvlib.testing import assert_close, dense_projected_hessian
from tests.cases import make_case

BaseFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
BASES: dict[str, BaseFactory] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


class TwoInputLinear(nn.Module):
    """out = A x₁ + b + B x₂: the MSE loss is an exact quadratic in its three tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 2)
        self.second = nn.Linear(2, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.first(x[:, :3]) + self.second(x[:, 3:])


def quadratic_problem(seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = TwoInputLinear().double()
    return model, nn.MSELoss(), torch.randn(8, 5, dtype=torch.float64), torch.randn(
        8, 2, dtype=torch.float64)


def closure_for(model: nn.Module, loss_fn: nn.Module, optimizer: object, x: Tensor, y: Tensor
                ) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        optimizer.zero_grad()  # type: ignore[attr-defined]
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def base_step(model: nn.Module, base: torch.optim.Optimizer, loss_fn: nn.Module, x: Tensor,
              y: Tensor) -> list[Tensor]:
    """The step θ¹ − θ⁰ that the base optimizer alone would take, on deep copies."""
    model_copy, base_copy = copy.deepcopy((model, base))
    before = params_of(model_copy)
    base_copy.step(closure_for(model_copy, loss_fn, base_copy, x, y))
    return [p.detach() - b for p, b in zip(model_copy.parameters(), before)]


@pytest.mark.parametrize("base_name", sorted(BASES))
def test_exact_hessian_on_a_quadratic_gives_the_per_subset_line_search_optimum(
    base_name: str,
) -> None:
    model, loss_fn, x, y = quadratic_problem()
    estimate = ExactHessian(model, loss_fn)
    wrapper = PerLayerLR(BASES[base_name](list(model.parameters())), estimate, period=1,
                         clip_negative=False)
    before = params_of(model)
    start = float(loss_fn(model(x), y).detach())
    wrapper.step(closure_for(model, loss_fn, wrapper, x, y), inputs=x, targets=y)
    steps = [p.detach() - b for p, b in zip(model.parameters(), before)]
    # φ(η) = L(θ⁰ − Σ η_s u_s) is an exact quadratic; its minimiser is stationary along each
    # subset's step: ∂φ/∂η_s ∝ ⟨∇_s L(θ_new), θ_new_s − θ⁰_s⟩ = 0.
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    part = estimate.partition
    along = part.subset_dots(list(grads), steps)
    scale = part.subset_dots([g.abs() for g in grads], [s.abs() for s in steps])
    assert bool((along.abs() <= 1e-10 * scale.max()).all()), (along, scale)
    assert float(loss.detach()) < start
    # and η is the closed-form optimum η = H̄⁻¹ḡ along the base step u (dense autograd H̄)
    model_at_start = copy.deepcopy(model)
    with torch.no_grad():
        for p, b in zip(model_at_start.parameters(), before):
            p.copy_(b)
    u = [-s for s in base_step(model_at_start, BASES[base_name](
        list(model_at_start.parameters())), loss_fn, x, y)]
    start_part = Partition.by_tensor(model_at_start)
    H_bar = dense_projected_hessian(model_at_start, loss_fn, x, y, start_part, u)
    start_grads = torch.autograd.grad(loss_fn(model_at_start(x), y),
                                      list(model_at_start.parameters()))
    g_bar = start_part.subset_dots(list(start_grads), u)
    assert_close(wrapper.last_eta, torch.linalg.solve(H_bar, g_bar), rtol=1e-9, what="η")


@pytest.mark.parametrize("base_name", sorted(BASES))
def test_each_subset_moves_by_eta_times_the_base_step(base_name: str) -> None:
    model, loss_fn, x, y = make_case("mlp", batch=6)
    estimate = ExactHessian(model, loss_fn)
    base = BASES[base_name](list(model.parameters()))
    wrapper = PerLayerLR(base, estimate, period=2, multiplier=0.5, clip_negative=False)
    part = estimate.partition
    for step in range(3):
        xb, yb = x[step:step + 4], y[step:step + 4]
        reference = base_step(model, base, loss_fn, xb, yb)
        before = params_of(model)
        wrapper.step(closure_for(model, loss_fn, wrapper, xb, yb), inputs=x, targets=y)
        eta = wrapper.last_eta
        expected = part.scale(reference, 0.5 * eta)
        moved = [p.detach() - b for p, b in zip(model.parameters(), before)]
        for i, (m, e) in enumerate(zip(moved, expected)):
            assert_close(m, e, rtol=1e-10, what=f"step {step}, tensor {i}")
    # η was computed at steps 0 and 2 only; step 1 reused step 0's
    assert [r.step for r in wrapper.history] == [0, 2]
    assert not torch.equal(wrapper.history[0].eta, wrapper.history[1].eta)
    if base_name == "adam":
        assert all(int(base.state[p]["step"]) == 3 for p in model.parameters())


def test_singular_solve_keeps_the_previous_rates_and_starts_from_the_base_step() -> None:
    model, loss_fn, x, y = quadratic_problem()
    base = BASES["sgd"](list(model.parameters()))
    wrapper = PerLayerLR(base, ExactHessian(model, loss_fn), period=1)
    zeros = torch.zeros_like(x)  # no curvature on the weights: R is singular
    reference = base_step(model, base, loss_fn, x, y)
    before = params_of(model)
    wrapper.step(closure_for(model, loss_fn, wrapper, x, y), inputs=zeros, targets=y)
    assert not wrapper.history[-1].success and "singular" in wrapper.history[-1].message
    assert torch.equal(wrapper.last_eta, torch.ones(3, dtype=torch.float64))
    for m, r in zip([p.detach() - b for p, b in zip(model.parameters(), before)], reference):
        assert_close(m, r, rtol=1e-12, what="base step before any successful solve")
    wrapper.step(closure_for(model, loss_fn, wrapper, x, y), inputs=x, targets=y)
    solved = wrapper.last_eta
    assert wrapper.history[-1].success and not torch.equal(solved, torch.ones_like(solved))
    wrapper.step(closure_for(model, loss_fn, wrapper, x, y), inputs=zeros, targets=y)
    assert not wrapper.history[-1].success
    assert torch.equal(wrapper.last_eta, solved)


@pytest.mark.parametrize("clip", [True, False])
def test_negative_rates_are_clipped_on_request(clip: bool) -> None:
    model, mse, x, y = quadratic_problem()

    def concave(out: Tensor, target: Tensor) -> Tensor:  # R ≺ 0 along the gradient: η < 0
        return -mse(out, target)

    base = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = PerLayerLR(base, ExactHessian(model, concave), period=1, clip_negative=clip)
    before = params_of(model)
    wrapper.step(closure_for(model, concave, wrapper, x, y), inputs=x, targets=y)
    raw = torch.linalg.solve(wrapper.history[0].R, wrapper.history[0].g)
    assert bool((raw < 0).all())
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before)]
    if clip:
        assert torch.equal(wrapper.last_eta, torch.zeros(3, dtype=torch.float64))
        assert max(moved) == 0.0
    else:
        assert_close(wrapper.last_eta, raw, what="unclipped η")
        assert min(moved) > 0.0


def test_a_user_fed_estimate_is_used_as_it_stands() -> None:
    model, loss_fn, x, y = make_case("mlp", batch=6)
    estimate = ExactHessian(model, loss_fn)
    estimate.update(x[:3], y[:3])
    wrapper = PerLayerLR(torch.optim.SGD(model.parameters(), lr=0.1), estimate,
                         update_estimate=False)
    with pytest.raises(ValueError, match="update_estimate=False"):
        wrapper.step(closure_for(model, loss_fn, wrapper, x, y), inputs=x, targets=y)
    u = [0.1 * g for g in torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))]
    expected = dense_projected_hessian(model, loss_fn, x[:3], y[:3], estimate.partition, u)
    wrapper.step(closure_for(model, loss_fn, wrapper, x, y))
    assert_close(wrapper.history[0].R, expected, rtol=1e-9, what="R from the user's batch")
    assert estimate.num_data == 3


def test_state_dict_round_trip_continues_the_same_trajectory() -> None:
    model, loss_fn, x, y = make_case("mlp", batch=8)

    def make(m: nn.Module) -> PerLayerLR:
        return PerLayerLR(BASES["adam"](list(m.parameters())), ExactHessian(m, loss_fn),
                          period=2)

    def run(m: nn.Module, wrapper: PerLayerLR, steps: range) -> list[list[Tensor]]:
        out = []
        for k in steps:
            xb, yb = x[k % 5:k % 5 + 3], y[k % 5:k % 5 + 3]
            wrapper.step(closure_for(m, loss_fn, wrapper, xb, yb), inputs=x, targets=y)
            out.append(params_of(m))
        return out

    first = make(model)
    run(model, first, range(3))
    saved, weights = copy.deepcopy(first.state_dict()), copy.deepcopy(model.state_dict())
    expected = run(model, first, range(3, 6))
    twin, _, _, _ = make_case("mlp", batch=8, seed=1)
    twin.load_state_dict(weights)
    second = make(twin)
    second.load_state_dict(saved)
    assert torch.equal(second.last_eta, saved["eta"])
    for a, b in zip(run(twin, second, range(3, 6)), expected):
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)


def test_bad_input_raises() -> None:
    model, loss_fn, x, y = make_case("mlp")
    estimate = ExactHessian(model, loss_fn)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer"):
        PerLayerLR(model, estimate)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimate"):
        PerLayerLR(sgd, "hessian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"does not hold parameter '0\.bias'"):
        PerLayerLR(torch.optim.SGD([model[0].weight, model[2].weight], lr=0.1), estimate)
    for kwargs, name in [({"period": 0}, "period"), ({"damping": -1.0}, "damping"),
                         ({"clip_negative": 1}, "clip_negative"), ({"multiplier": 0.0},
                         "multiplier"), ({"update_estimate": "yes"}, "update_estimate"),
                         ({"damping": float("nan")}, "damping")]:
        with pytest.raises(ValueError, match=name):
            PerLayerLR(sgd, estimate, **kwargs)
    wrapper = PerLayerLR(sgd, estimate)
    with pytest.raises(ValueError, match="no gradient"):
        wrapper.step(inputs=x, targets=y)
    with pytest.raises(ValueError, match=r"needs the batch \(inputs, targets\)"):
        wrapper.step(closure_for(model, loss_fn, wrapper, x, y))
    state = wrapper.state_dict()
    with pytest.raises(ValueError, match="eta"):
        wrapper.load_state_dict({**state, "eta": torch.ones(2)})
    with pytest.raises(ValueError, match="lacks"):
        wrapper.load_state_dict({"base": state["base"]})


def test_wraps_natural_gradient_with_its_shared_kfac_estimate() -> None:
    model, loss_fn, x, y = make_case("mlp", batch=16)
    estimate = KFAC(model, loss_fn, fisher="type2")
    natural = NaturalGradient(model.parameters(), estimate, lr=0.1, damping=1e-2)
    wrapper = PerLayerLR(natural, estimate, period=1, update_estimate=False, clip_negative=False)
    part = estimate.partition
    for step in range(2):
        wrapper.zero_grad()
        with natural.record(y):
            outputs = model(x)
        loss_fn(outputs, y).backward()
        before = params_of(model)
        wrapper.step()
        # NaturalGradient's own step from the statistics it just gathered: 0.1·(C + 10⁻²I)⁻¹∇L
        grads = [p.grad for p in part.parameters]
        u = [0.1 * v for v in estimate.solve(grads, damping=1e-2)]
        assert_close(wrapper.history[-1].R, estimate.reduced(u), rtol=1e-9, what="R")
        expected = part.scale(u, -wrapper.last_eta)
        for i, (p, b, e) in enumerate(zip(model.parameters(), before, expected)):
            assert_close(p.detach() - b, e, rtol=1e-9, what=f"step {step}, tensor {i}")
