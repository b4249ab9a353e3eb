"""NaturalGradient: exact steps on quadratics, descent with every estimate, exact resume, errors."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from curvlib import EKFAC, KFAC, TEKFAC, TKFAC, ExactGGN, Partition
from curvlib.estimate import CurvatureEstimate
from curvlib.optim import NaturalGradient


def least_squares(
    seed: int = 0, n: int = 20, d_in: int = 5, d_out: int = 2
) -> tuple[nn.Linear, nn.MSELoss, Tensor, Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(n, d_in, dtype=torch.float64)
    y = torch.randn(n, d_out, dtype=torch.float64)
    return nn.Linear(d_in, d_out).double(), nn.MSELoss(), x, y


def backward(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    model.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss.detach()


def test_least_squares_optimum_in_one_step() -> None:
    """With C = GGN = Hessian of a linear least-squares loss, lr=1 and no damping give Newton's
    step, which lands on the least-squares solution."""
    model, loss_fn, x, y = least_squares()
    opt = NaturalGradient(model.parameters(), ExactGGN(model, loss_fn), lr=1.0, damping=0.0)
    backward(model, loss_fn, x, y)
    opt.step(inputs=x, targets=y)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    torch.testing.assert_close(model.weight.detach(), solution[:-1].T, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), solution[-1], rtol=0, atol=1e-12)


def newton_direction(model: nn.Linear, x: Tensor, y: Tensor, damping: float = 0.0) -> Tensor:
    """(C + λI)⁻¹ g for the mean-squared loss of a linear model, in closed form, as [W | b]."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    theta = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], dim=1)  # [d_out, d+1]
    c = 2.0 / y.numel()  # MSELoss (no ½) averaged over all N·d_out entries
    residual = design @ theta.T - y
    grad = c * residual.T @ design
    curvature = c * design.T @ design + damping * torch.eye(design.shape[1], dtype=x.dtype)
    return torch.linalg.solve(curvature, grad.T).T


def test_momentum_averages_preconditioned_directions() -> None:
    """θ₂ = θ₁ − α(μΔ₀ + Δ₁): the momentum acts after preconditioning (pitfall P12)."""
    model, loss_fn, x, y = least_squares()
    lr, mu, lam = 0.3, 0.9, 0.1
    opt = NaturalGradient(model.parameters(), ExactGGN(model, loss_fn), lr=lr, damping=lam,
                          momentum=mu)
    reference = copy.deepcopy(model)
    delta0 = newton_direction(reference, x, y, lam)
    with torch.no_grad():
        reference.weight -= lr * delta0[:, :-1]
        reference.bias -= lr * delta0[:, -1]
    delta1 = newton_direction(reference, x, y, lam)
    step = mu * delta0 + delta1
    for _ in range(2):
        backward(model, loss_fn, x, y)
        opt.step(inputs=x, targets=y)
    torch.testing.assert_close(model.weight.detach(), reference.weight.detach() - lr * step[:, :-1])
    torch.testing.assert_close(model.bias.detach(), reference.bias.detach() - lr * step[:, -1])


def test_kl_clipping_scales_the_step() -> None:
    model, loss_fn, x, y = least_squares()
    lr, lam, kappa = 0.5, 0.01, 1e-4
    start = copy.deepcopy(model)
    opt = NaturalGradient(model.parameters(), ExactGGN(model, loss_fn), lr=lr, damping=lam,
                          kl_clip=kappa)
    backward(model, loss_fn, x, y)
    grads = [model.weight.grad.clone(), model.bias.grad.clone()]
    opt.step(inputs=x, targets=y)
    delta = newton_direction(start, x, y, lam)
    predicted = lr**2 * (torch.sum(delta[:, :-1] * grads[0]) + torch.sum(delta[:, -1] * grads[1]))
    nu = math.sqrt(kappa / float(predicted))
    assert nu < 1.0  # the test must exercise the clip
    step = lr * nu * delta
    torch.testing.assert_close(model.weight.detach(), start.weight.detach() - step[:, :-1])
    torch.testing.assert_close(model.bias.detach(), start.bias.detach() - step[:, -1])


def test_weight_decay_is_added_to_the_gradient() -> None:
    model, loss_fn, x, y = least_squares()
    start = copy.deepcopy(model)
    lr, lam, wd = 1.0, 0.5, 0.2
    opt = NaturalGradient(model.parameters(), ExactGGN(model, loss_fn), lr=lr, damping=lam,
                          weight_decay=wd)
    backward(model, loss_fn, x, y)
    opt.step(inputs=x, targets=y)
    # (C + λI)⁻¹(g + ωθ) = (C + λI)⁻¹g + ω(C + λI)⁻¹θ, the second term in closed form.
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    c = 2.0 / y.numel()
    curvature = c * design.T @ design + lam * torch.eye(design.shape[1], dtype=x.dtype)
    theta = torch.cat([start.weight.detach(), start.bias.detach()[:, None]], dim=1)
    delta = newton_direction(start, x, y, lam) + wd * torch.linalg.solve(curvature, theta.T).T
    torch.testing.assert_close(model.weight.detach(), start.weight.detach() - lr * delta[:, :-1])
    torch.testing.assert_close(model.bias.detach(), start.bias.detach() - lr * delta[:, -1])


def test_damping_schedule_is_called_with_the_step_count() -> None:
    model, loss_fn, x, y = least_squares()
    seen: list[int] = []

    def schedule(step: int) -> float:
        seen.append(step)
        return 1.0 / (1 + step)

    opt = NaturalGradient(model.parameters(), ExactGGN(model, loss_fn), lr=0.5, damping=schedule)
    for _ in range(3):
        backward(model, loss_fn, x, y)
        opt.step(inputs=x, targets=y)
    assert seen == [0, 1, 2]
    opt.damping = lambda step: -1.0
    backward(model, loss_fn, x, y)
    with pytest.raises(ValueError, match="damping schedule"):
        opt.step(inputs=x, targets=y)


def test_statistics_every_k_steps_reuse_the_kept_batch() -> None:
    """With stat_every=2 the odd steps reuse the previous statistics batch (here a different
    batch than the one of the gradient), the even steps replace it."""
    model, loss_fn, x, y = least_squares()
    estimate = ExactGGN(model, loss_fn)
    opt = NaturalGradient(model.parameters(), estimate, lr=0.5, damping=0.1, stat_every=2)
    half = len(x) // 2
    backward(model, loss_fn, x, y)
    opt.step(inputs=x[:half], targets=y[:half])
    assert estimate.num_data == half
    backward(model, loss_fn, x, y)
    opt.step()  # not a statistics step: nothing needed
    assert estimate.num_data == half
    backward(model, loss_fn, x, y)
    with pytest.raises(ValueError, match="statistics step"):
        opt.step()
    opt.step(inputs=x, targets=y)
    assert estimate.num_data == len(x)


def test_closure_is_evaluated_and_returned() -> None:
    model, loss_fn, x, y = least_squares()
    opt = NaturalGradient(model.parameters(), ExactGGN(model, loss_fn), lr=1.0, damping=0.0)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure, inputs=x, targets=y)
    second = opt.step(closure, inputs=x, targets=y)
    assert first is not None and second is not None
    assert second.item() < first.item()


class Classifier(nn.Module):
    """A small classifier with a LayerNorm, which no Kronecker estimate covers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def classification_batch(seed: int = 0, n: int = 48) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    # labels from a fixed random linear rule, so the problem is learnable
    y = (x @ torch.randn(6, 3, generator=gen)).argmax(dim=1)
    return x, y


def linear_partition(model: Classifier) -> Partition:
    return Partition.by_module(model, [model.fc1, model.fc2])


def exact_ggn(model: Classifier, loss_fn: nn.Module) -> CurvatureEstimate:
    return ExactGGN(model, loss_fn, linear_partition(model))


def kronecker(
    cls: type[KFAC], fisher: str
) -> Callable[[Classifier, nn.Module], CurvatureEstimate]:
    def build(model: Classifier, loss_fn: nn.Module) -> CurvatureEstimate:
        return cls(model, loss_fn, fisher=fisher, include=[model.fc1, model.fc2])

    return build


# Every Kronecker method, and every Fisher type at least once.
ESTIMATES: dict[str, Callable[[Classifier, nn.Module], CurvatureEstimate]] = {
    "ExactGGN": exact_ggn,
    "KFAC-mc": kronecker(KFAC, "mc"),
    "KFAC-empirical": kronecker(KFAC, "empirical"),
    "EKFAC-empirical": kronecker(EKFAC, "empirical"),
    "TKFAC-type2": kronecker(TKFAC, "type2"),
    "TEKFAC-mc": kronecker(TEKFAC, "mc"),
}


def train(
    model: Classifier, opt: NaturalGradient, loss_fn: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
) -> list[float]:
    """The documented training protocol: record (when the estimate can) → backward → step."""
    losses = []
    for x, y in batches:
        opt.zero_grad()
        if hasattr(opt.estimate, "record"):
            with opt.record(y):
                out = model(x)
        else:
            out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        opt.step(inputs=x, targets=y)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(ESTIMATES))
def test_every_estimate_decreases_the_training_loss(name: str) -> None:
    torch.manual_seed(0)
    model, loss_fn = Classifier(), nn.CrossEntropyLoss()
    x, y = classification_batch()
    opt = NaturalGradient(model.parameters(), ESTIMATES[name](model, loss_fn), lr=0.5,
                          damping=1e-2)
    assert [tuple(p.shape) for p in opt.fallback_params] == [(8,), (8,)]
    losses = train(model, opt, loss_fn, [(x, y)] * 6)
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    assert final < 0.6 * losses[0], losses


def make_run(name: str, seed: int = 0) -> tuple[Classifier, NaturalGradient, nn.Module]:
    torch.manual_seed(seed)
    model, loss_fn = Classifier(), nn.CrossEntropyLoss()
    opt = NaturalGradient(
        model.parameters(), ESTIMATES[name](model, loss_fn), lr=0.3, damping=1e-2, momentum=0.5,
        weight_decay=1e-3, kl_clip=1e-2, stat_every=2, refresh_every=3, fallback="adam",
        fallback_lr=1e-2,
    )
    return model, opt, loss_fn


def checkpoint(model: nn.Module, opt: NaturalGradient) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "rng": torch.get_rng_state()}, buffer)
    return buffer.getvalue()


def restore(blob: bytes, model: nn.Module, opt: NaturalGradient) -> None:
    state: dict[str, Any] = torch.load(io.BytesIO(blob), weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])


@pytest.mark.parametrize("name", list(ESTIMATES))
def test_resume_from_state_dict_is_bit_for_bit(name: str) -> None:
    batches = [classification_batch(seed) for seed in range(8)]
    model, opt, loss_fn = make_run(name)
    train(model, opt, loss_fn, batches[:3])  # stops between statistics and refresh steps
    blob = checkpoint(model, opt)
    train(model, opt, loss_fn, batches[3:])
    expected = [p.detach().clone() for p in model.parameters()]

    fresh_model, fresh_opt, _ = make_run(name, seed=1)  # different initial weights, overwritten
    restore(blob, fresh_model, fresh_opt)
    assert fresh_opt.steps == 3
    train(fresh_model, fresh_opt, loss_fn, batches[3:])
    for p, q in zip(fresh_model.parameters(), expected):
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("fallback,reference_cls,kwargs", [
    ("sgd", torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01}),
    ("adam", torch.optim.Adam, {"weight_decay": 0.01}),
])
def test_fallback_matches_torch_optimizer(
    fallback: str, reference_cls: type[torch.optim.Optimizer], kwargs: dict[str, float]
) -> None:
    """Parameters outside the partition (the LayerNorm) follow torch's SGD-momentum or Adam."""
    x, y = classification_batch()
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = Classifier()
    twins = [p.detach().clone().requires_grad_() for p in model.norm.parameters()]
    opt = NaturalGradient(model.parameters(), exact_ggn(model, loss_fn), lr=0.1, damping=1e-2,
                          fallback=fallback, fallback_lr=0.05, **kwargs)
    reference = reference_cls(twins, lr=0.05, **kwargs)
    for _ in range(3):
        backward(model, loss_fn, x, y)
        for p, twin in zip(model.norm.parameters(), twins):
            twin.grad = p.grad.clone()
        opt.step(inputs=x, targets=y)
        reference.step()
    for p, twin in zip(model.norm.parameters(), twins):
        torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


def test_damping_mode_is_passed_to_the_estimate() -> None:
    """K-FAC's factored π-damping (Martens & Grosse §6.3): the step is −lr·solve(g, λ, "pi")."""
    torch.manual_seed(0)
    model, loss_fn = Classifier(), nn.CrossEntropyLoss()
    x, y = classification_batch()
    estimate = kronecker(KFAC, "type2")(model, loss_fn)
    opt = NaturalGradient(model.parameters(), estimate, lr=0.5, damping=0.1, damping_mode="pi")
    start = [p.detach().clone() for p in estimate.partition.parameters]
    train(model, opt, loss_fn, [(x, y)])
    grads = [p.grad for p in estimate.partition.parameters]
    expected = estimate.solve(grads, 0.1, damping_mode="pi")
    tikhonov = estimate.solve(grads, 0.1)
    assert not torch.allclose(expected[0], tikhonov[0])  # the mode must matter here
    for p, p0, d in zip(estimate.partition.parameters, start, expected):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * d)


GOOD: dict[str, Any] = {"lr": 0.1, "damping": 0.1}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": -0.1}, "lr must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"damping": -1.0}, "damping must be"),
        ({"damping": "big"}, "damping must be"),
        ({"momentum": -0.5}, "momentum must be"),
        ({"momentum": 1.0}, "momentum must be < 1"),
        ({"weight_decay": -1e-4}, "weight_decay must be"),
        ({"kl_clip": 0.0}, "kl_clip must be"),
        ({"stat_every": 0}, "stat_every must be"),
        ({"stat_every": 1.5}, "stat_every must be"),
        ({"refresh_every": 0}, "refresh_every must be"),
        ({"fallback": "rmsprop"}, "fallback must be"),
        ({"fallback_lr": -1.0}, "fallback_lr must be"),
        ({"damping_mode": "pi"}, "damping_mode must be one of ExactGGN"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\] must be < 1"),
        ({"betas": (0.9,)}, "betas must be a pair"),
        ({"eps": 0.0}, "eps must be"),
    ],
)
def test_bad_hyper_parameters_raise(kwargs: dict[str, Any], message: str) -> None:
    model, loss_fn, _, _ = least_squares()
    with pytest.raises(ValueError, match=message):
        NaturalGradient(model.parameters(), ExactGGN(model, loss_fn), **{**GOOD, **kwargs})


def test_bad_wiring_raises() -> None:
    model, loss_fn, x, y = least_squares()
    with pytest.raises(ValueError, match="estimate must be"):
        NaturalGradient(model.parameters(), object(), **GOOD)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not in params"):
        NaturalGradient([model.weight], ExactGGN(model, loss_fn), **GOOD)
    with pytest.raises(ValueError, match="fallback='error'"):
        classifier = Classifier()
        NaturalGradient(classifier.parameters(), exact_ggn(classifier, nn.CrossEntropyLoss()),
                        fallback="error", **GOOD)
    opt = NaturalGradient(model.parameters(), ExactGGN(model, loss_fn), **GOOD)
    with pytest.raises(ValueError, match="has no record"), opt.record(y):
        model(x)
    with pytest.raises(ValueError, match="natural_gradient"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
