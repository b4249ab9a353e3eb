"""Dense autograd references and assertions for regression tests of curvature estimates.

These are the ground truth, written to be obviously correct rather than fast: they flatten the
partition's parameters into one vector θ (dense order ``torch.cat([p.flatten() ...])``) and use
``torch.autograd.functional.hessian`` and ``torch.func.jacrev`` on functions of θ. Use them on
small models, in float64::

    from curvlib.testing import dense_hessian, assert_estimate_close
    H = dense_hessian(model, loss_fn, x, y)
    estimate = curvlib.ExactHessian(model, loss_fn); estimate.update(x, y)
    assert_estimate_close(estimate, H)

References (all in the scale of ``loss_fn`` as it reduces):

* :func:`dense_hessian`: ∇²L;
* :func:`dense_ggn`: Jᵀ (∇²_f L) J, with J the Jacobian of the flattened outputs;
* :func:`dense_empirical_fisher`: (1/c) Σ_n ∇L_n ∇L_nᵀ, where L_n is example n's contribution to
  L and c the reduction factor (so it is Σ_n ∇ℓ_n ∇ℓ_nᵀ scaled by c, with ℓ_n unreduced);
* :func:`dense_projected_hessian`: H̄ = V ∇²L Vᵀ with V the S×P block-direction matrix
  (Wolinski, arXiv 2312.03885), whose row s is the direction u restricted to subset s.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from curvlib.estimate import CurvatureEstimate
from curvlib.exact.base import parameter_names
from curvlib.losses import LossFunction
from curvlib.partition import Partition

__all__ = [
    "assert_close",
    "assert_estimate_close",
    "default_tolerances",
    "dense_empirical_fisher",
    "dense_ggn",
    "dense_hessian",
    "dense_projected_hessian",
    "flat_function",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _partition(model: nn.Module, partition: Partition | None) -> Partition:
    return partition if partition is not None else Partition.by_tensor(model)


def flat_function(
    model: nn.Module, partition: Partition, inputs: Any
) -> tuple[Callable[[Tensor], Any], Tensor]:
    """(θ ↦ model output with the partition's tensors taken from θ, θ₀)."""
    names = parameter_names(model, partition)
    args = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)

    def outputs_of(theta: Tensor) -> Any:
        return functional_call(model, dict(zip(names, partition.unflatten(theta))), args)

    theta0 = torch.cat([p.detach().reshape(-1) for p in partition.parameters])
    return outputs_of, theta0


def dense_hessian(
    model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any,
    partition: Partition | None = None,
) -> Tensor:
    """∇²L as a P×P matrix, by ``torch.autograd.functional.hessian``."""
    partition = _partition(model, partition)
    outputs_of, theta0 = flat_function(model, partition, inputs)
    return torch.autograd.functional.hessian(lambda t: loss_fn(outputs_of(t), targets), theta0)


def dense_ggn(
    model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any,
    partition: Partition | None = None,
) -> Tensor:
    """Jᵀ (∇²_f L) J as a P×P matrix, J by ``jacrev`` and ∇²_f L by autograd's ``hessian``."""
    partition = _partition(model, partition)
    outputs_of, theta0 = flat_function(model, partition, inputs)
    outputs = outputs_of(theta0).detach()
    jac = jacrev(lambda t: outputs_of(t).reshape(-1))(theta0)  # [O, P]
    loss_hessian = torch.autograd.functional.hessian(
        lambda f: loss_fn(f.view(outputs.shape), targets), outputs.reshape(-1)
    )
    return jac.T @ loss_hessian @ jac


def dense_empirical_fisher(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor,
    partition: Partition | None = None,
) -> Tensor:
    """c Σ_n ∇ℓ_n ∇ℓ_nᵀ with ℓ_n example n's unreduced loss and c the reduction factor."""
    partition = _partition(model, partition)
    loss = LossFunction(loss_fn)
    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    outputs_of, theta0 = flat_function(model, partition, inputs)
    c = loss.reduction_factor(outputs_of(theta0).detach(), targets)

    def per_example(t: Tensor) -> Tensor:
        out = outputs_of(t)
        return torch.stack([summed(out[n : n + 1], targets[n : n + 1]) for n in range(len(out))])

    grads = jacrev(per_example)(theta0)  # [N, P]
    return c * grads.T @ grads


def dense_projected_hessian(
    model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any,
    partition: Partition, direction: Sequence[Tensor],
) -> Tensor:
    """H̄ = V ∇²L Vᵀ (S×S), V the block-direction matrix of ``direction``."""
    blocks = partition.block_directions(direction)
    return blocks @ dense_hessian(model, loss_fn, inputs, targets, partition) @ blocks.T


def default_tolerances(*tensors: Tensor) -> tuple[float, float]:
    """(rtol, atol) for comparisons at the precision of the least precise tensor given."""
    if all(t.dtype == torch.float64 for t in tensors):
        return 1e-7, 1e-10
    return 1e-4, 1e-6


def assert_close(
    actual: Tensor, expected: Tensor, rtol: float | None = None, atol: float | None = None,
    what: str = "value",
) -> None:
    """Assert ‖actual − expected‖_max ≤ atol + rtol·‖expected‖_max, reporting the errors.

    Tolerances default to float64 ones when both tensors are float64 and to float32 ones otherwise.
    """
    default_rtol, default_atol = default_tolerances(actual, expected)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{what}: shape {tuple(actual.shape)} differs from expected {tuple(expected.shape)}."
        )
    actual, expected = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    error = float((actual - expected).abs().max()) if actual.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not error <= atol + rtol * scale:
        raise AssertionError(
            f"{what}: max abs error {error:.3e} exceeds {atol:.1e} + {rtol:.1e}·{scale:.3e} "
            f"(relative {error / max(scale, 1e-300):.3e})."
        )


def assert_estimate_close(
    estimate: CurvatureEstimate, reference: Tensor, rtol: float | None = None,
    atol: float | None = None, check_products: bool = True, seed: int = 0,
) -> None:
    """Assert that an estimate equals a dense reference, and is consistent with itself.

    Checks ``to_dense`` against ``reference``; with ``check_products`` also that ``matvec`` on a
    random vector, ``trace`` and ``reduced`` on a random direction agree with the dense matrix.
    Tolerances default to the precision of the estimate's parameters (see :func:`assert_close`).
    """
    part = estimate.partition
    dense = estimate.to_dense()
    default_rtol, default_atol = default_tolerances(dense, reference)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    assert_close(dense, reference, rtol, atol, f"{type(estimate).__name__}.to_dense()")
    if not check_products:
        return
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(part.numel, generator=gen, dtype=torch.float64).to(dense)
    mv = part.flatten(estimate.matvec(part.unflatten(flat)))
    assert_close(mv, reference @ flat, rtol, atol, f"{type(estimate).__name__}.matvec")
    assert_close(estimate.trace(), torch.trace(reference), rtol, atol,
                 f"{type(estimate).__name__}.trace")
    blocks = part.block_directions(part.unflatten(flat))
    assert_close(estimate.reduced(part.unflatten(flat)), blocks @ reference @ blocks.T, rtol,
                 atol, f"{type(estimate).__name__}.reduced")
