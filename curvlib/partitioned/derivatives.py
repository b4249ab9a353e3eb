"""Exact partitioned derivative tensors ḡ, H̄ and D̄ of a loss along a direction.

Wolinski, "Gathering and Exploiting Higher-Order Information when Training Large Structured
Models", arXiv 2312.03885 (``research/wolinski.md`` §1-§3). A :class:`~curvlib.Partition` splits θ
into S subsets; the direction u restricted to subset s is u^{(s)} (zero outside it), and u_s its
entries on the subset. With φ(τ) = L(θ + Σ_s τ_s u^{(s)}), τ ∈ ℝ^S, the tensors are the
derivatives of φ at τ = 0:

    ḡ_s   = ∂_s φ       = ⟨∇_s L, u_s⟩,
    H̄_st  = ∂_s∂_t φ    = u_sᵀ ∇²L u_t                       (S×S, symmetric),
    D̄_rst = ∂_r∂_s∂_t φ = ∇³L[u^{(r)}, u^{(s)}, u^{(t)}]      (S×S×S, symmetric),

so that L(θ − Σ_s η_s u^{(s)}) = L − ḡᵀη + ½ηᵀH̄η − ⅙ D̄[η,η,η] + O(‖η‖⁴) (the step convention
θ ← θ − Σ_s η_s u^{(s)} of ``DESIGN.md``). D̄ is homogeneous of degree 3 in u, and coarsening the
partition sums the corresponding entries.

**Algorithm** (``research/wolinski.md`` §2.1-§2.2: differentiate, then contract per subset). One
forward and one backward with ``create_graph`` give ḡ as S attached scalars. Row i of H̄ is the
gradient of ḡ_i contracted per subset with u; by symmetry only the columns t ≥ i are needed, so the
gradient is taken with respect to the tensors of subsets i..S−1 only, which lets autograd skip every
part of the graph that leads only to earlier subsets (for a network whose subsets follow the layers,
a late row touches only the late layers). D̄_iii is the gradient of the attached H̄_ii contracted
with u_i over subset i; a full D̄ differentiates H̄_ij (i ≤ j) with respect to subsets k ≥ j and
mirrors the sorted triples i ≤ j ≤ k by symmetry. Costs, in backward-type passes: 1 for ḡ, S for H̄,
S more for diag D̄, S(S+1)/2 more for the full D̄.

Two engines run this algorithm:

* ``method="loop"``: one row (or one (i, j) pair) per ``torch.autograd.grad`` call — the reference
  algorithm. Each pass is pruned to the subsets it needs, so it is the one with the fewest
  floating-point operations.
* ``method="batched"``: ``torch.func`` transforms of φ, vmapped over rows (or sorted (i, j) pairs),
  ``chunk_size`` at a time (``None``: all at once). A vmapped pass carries every lane of its chunk
  through the union of their graphs, pruned only to the subsets from the chunk's first row on, so
  it does more arithmetic than the loop — counted on an MLP 784-512-512-10 with S = 6, all rows at
  once: 3.2× for H̄, 5× for H̄ with diag D̄ — in fewer, larger kernels. Memory grows with the
  chunk: each lane keeps its own second-order graph. On CPU it was slower than the loop for every
  quantity of the benchmark workloads (``docs/performance.md``) and faster only for some
  quantities of tiny models; it is there for accelerators and small models, where fewer kernel
  launches can outweigh the extra arithmetic.

The forward-over-reverse form of ``research/wolinski.md`` §2.4 (H̄ = jacfwd(∇φ), D̄_iii by nested
jvp) is exact too, but it propagates tangents through the forward pass that reverse mode never
needs: on the same MLP it counted 3.3× the loop's arithmetic for H̄ and 7.7× for H̄ with diag D̄,
so it is not offered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from curvlib.estimate import check_damping
from curvlib.exact.base import as_args, check_no_training_batchnorm, parameter_names
from curvlib.partition import Partition
from curvlib.partitioned.cubic import CubicStepResult, solve_cubic_step

__all__ = ["PartitionedDerivatives", "partitioned_derivatives"]

Method = Literal["batched", "loop"]
Third = Literal["diag", "full"]
LossFn = Callable[[Any, Any], Tensor]


# --------------------------------------------------------------------------------- the result
@dataclass
class PartitionedDerivatives:
    """Partitioned derivative tensors of a loss along a direction (Wolinski, arXiv 2312.03885).

    A plain container: :func:`partitioned_derivatives` returns one for a batch, and users build one
    from their own tensors, e.g. averages over batches,
    ``PartitionedDerivatives(g=g_avg, H=H_avg, D=D_avg)``.

    Attributes:
        g: ḡ, shape (S,), ḡ_s = ⟨∇_sL, u_s⟩ (positive for a gradient-like direction).
        H: H̄, shape (S, S), H̄_st = u_sᵀ∇²L u_t; ``None`` when only first order was computed.
        D: D̄, either its diagonal D̄_sss, shape (S,), or the full symmetric tensor, shape
            (S, S, S), D̄_rst = ∇³L[u^{(r)}, u^{(s)}, u^{(t)}]; ``None`` below third order.

    Raises:
        ValueError: a field that is not a real floating-point tensor, of the wrong shape, on
            another device than ``g``, or with non-finite entries; ``D`` without ``H``.
    """

    g: Tensor
    H: Tensor | None = None
    D: Tensor | None = None

    def __post_init__(self) -> None:
        _check_field(self.g, "g", None, None)
        size = self.g.shape[0]
        device = self.g.device
        if self.H is not None:
            _check_field(self.H, "H", (size, size), device)
        if self.D is not None:
            if self.H is None:
                raise ValueError("PartitionedDerivatives: D was given without H.")
            shapes = ((size,), (size, size, size))
            if tuple(self.D.shape) not in shapes:
                raise ValueError(
                    f"PartitionedDerivatives: D must have shape {shapes[0]} (the diagonal D̄_sss) "
                    f"or {shapes[1]} (the full tensor) for S = {size}, got {tuple(self.D.shape)}."
                )
            _check_field(self.D, "D", None, device)

    @property
    def num_subsets(self) -> int:
        """S, the number of subsets."""
        return self.g.shape[0]

    def diagonal_third(self) -> Tensor:
        """D̄_sss, shape (S,), from either form of ``D``.

        Raises:
            ValueError: ``D`` is None.
        """
        if self.D is None:
            raise ValueError("PartitionedDerivatives has no third derivative D (order < 3).")
        if self.D.dim() == 1:
            return self.D
        return torch.diagonal(torch.diagonal(self.D, dim1=0, dim2=1))

    def learning_rates(self, damping: float = 0.0) -> Tensor:
        """η solving (H̄ + damping·I) η = ḡ: the minimiser of −ḡᵀη + ½ηᵀ(H̄ + damping·I)η.

        The S×S system is solved in float64 through the eigendecomposition of the symmetric part
        of H̄ + damping·I; η is returned in the dtype of ``g``. When H̄ + damping·I is positive
        definite η is the Newton step on the partition (``research/wolinski.md`` §3.1). When it is
        indefinite but non-singular, η is still the unique solution of the system — the stationary
        point of the quadratic model, a saddle rather than a minimiser — and is returned as such;
        use :meth:`cubic_step` or a damping above −λ_min(H̄) to get a minimiser. A ridge
        (damping > 0) breaks the reparameterisation invariance of the step (§3.4).

        Raises:
            ValueError: ``H`` is None; damping negative or not finite; H̄ + damping·I singular to
                working precision (|λ| ≤ S·ε·max(|λ_max|, damping) for some eigenvalue λ).
        """
        if self.H is None:
            raise ValueError("PartitionedDerivatives.learning_rates needs H (order ≥ 2).")
        check_damping(damping)
        H = self.H.detach().to(torch.float64)
        g = self.g.detach().to(torch.float64)
        evals, evecs = torch.linalg.eigh(0.5 * (H + H.T))
        shifted = evals + damping
        scale = max(float(evals.abs().max()), float(damping))
        tol = H.shape[0] * torch.finfo(torch.float64).eps * scale
        if bool((shifted.abs() <= tol).any()):
            raise ValueError(
                f"PartitionedDerivatives.learning_rates: H + {damping}·I is singular (smallest "
                f"|eigenvalue| {float(shifted.abs().min()):.3e} ≤ {tol:.3e}); use a positive "
                "damping or cubic_step."
            )
        eta = evecs @ ((evecs.T @ g) / shifted)
        return eta.to(self.g.dtype)

    def cubic_step_result(self, lambda_int: float = 1.0, *, zero_tol: float = 0.0
                          ) -> CubicStepResult:
        """The global minimiser of the anisotropic cubic model, with the solver's diagnosis.

        T(η) = −ḡᵀη + ½ηᵀH̄η + (λ_int/6)‖Dη‖³ with D = Diag(d), d_s = |D̄_sss|^{1/3}
        (``research/wolinski.md`` §3.3), solved by
        :func:`~curvlib.partitioned.cubic.solve_cubic_step` in float64. When T has no minimiser
        (e.g. some d_s = 0 with H̄ not positive definite on those subsets) or the solver fails, the
        result says so (``success=False``, a zero step, never NaN) instead of raising.

        Args:
            lambda_int: the internal damping λ_int ≥ 0; 0 gives the Newton step.
            zero_tol: d_s ≤ zero_tol·max(d) counts as 0 (relative, so the default keeps the
                invariance of §3.4 exact).

        Raises:
            ValueError: ``H`` or ``D`` is None; invalid λ_int or zero_tol.
        """
        if self.H is None:
            raise ValueError("PartitionedDerivatives.cubic_step needs H (order ≥ 2).")
        d = self.diagonal_third().detach().abs().to(torch.float64).pow(1.0 / 3.0)
        return solve_cubic_step(self.g.detach(), self.H.detach(), d, lambda_int,
                                zero_tol=zero_tol)

    def cubic_step(self, lambda_int: float = 1.0, *, zero_tol: float = 0.0) -> Tensor:
        """η*, the global minimiser of the anisotropic cubic model, in the dtype of ``g``.

        See :meth:`cubic_step_result` for the model; this raises instead of returning a failure.

        Raises:
            ValueError: as :meth:`cubic_step_result`, and when the model has no minimiser or the
                solver fails (the message is the solver's).
        """
        result = self.cubic_step_result(lambda_int, zero_tol=zero_tol)
        if not result.success:
            raise ValueError(f"PartitionedDerivatives.cubic_step: no step ({result.case}): "
                             f"{result.message}")
        return result.eta.to(self.g.dtype)


def _check_field(value: object, name: str, shape: tuple[int, ...] | None,
                 device: torch.device | None) -> None:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"PartitionedDerivatives.{name} must be a real floating-point tensor, "
                         f"got {kind}.")
    if shape is None and name == "g" and (value.dim() != 1 or value.numel() == 0):
        raise ValueError(f"PartitionedDerivatives.g must have shape (S,) with S ≥ 1, got "
                         f"{tuple(value.shape)}.")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"PartitionedDerivatives.{name} must have shape {shape}, got "
                         f"{tuple(value.shape)}.")
    if device is not None and value.device != device:
        raise ValueError(f"PartitionedDerivatives.{name} is on {value.device} but g is on "
                         f"{device}.")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"PartitionedDerivatives.{name} has non-finite entries.")


# --------------------------------------------------------------------------------- the problem
class _Problem:
    """The loss as a function of the partition's tensors, the direction and the subset layout."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any,
                 partition: Partition, direction: list[Tensor]) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.args = as_args(inputs)
        self.targets = targets
        self.names = parameter_names(model, partition)
        self.theta = [p.detach() for p in partition.parameters]
        self.u = direction
        self.subset_of = partition.subset_of
        self.size = len(partition)
        # Subsets are contiguous runs of partition.parameters: subset s starts at start[s].
        self.start = [partition.subset_of.index(s) for s in range(self.size)] + [
            len(partition.parameters)]

    def loss(self, values: Sequence[Tensor]) -> Tensor:
        """L with the partition's tensors replaced by ``values``."""
        outputs = functional_call(self.model, dict(zip(self.names, values)), self.args)
        return self.loss_fn(outputs, self.targets)

    def contract(self, grads: Sequence[Tensor | None], first: int) -> list[Tensor]:
        """[⟨grads_s, u_s⟩ for s = first..S−1] for gradients w.r.t. the tensors of those subsets;
        ``None`` (a tensor the output does not depend on) contributes 0.

        The entries stay separate scalars, not one stacked tensor: differentiating an entry of a
        stack would send zero cotangents through the graphs of all the other entries.
        """
        ref = self.theta[0]
        out = [torch.zeros((), dtype=ref.dtype, device=ref.device)
               for _ in range(self.size - first)]
        for k, gr in enumerate(grads, start=self.start[first]):
            if gr is not None:
                s = self.subset_of[k] - first
                out[s] = out[s] + torch.dot(gr.reshape(-1), self.u[k].reshape(-1))
        return out

    def check_loss(self, loss: Tensor) -> None:
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}.")
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"The loss of this batch is not finite ({float(loss.detach())}).")


def _check_direction(partition: Partition, direction: Sequence[Tensor]) -> list[Tensor]:
    """The direction aligned with the partition, detached, in the parameters' dtypes.

    Non-finite entries are diagnosed only when the results are not finite (they always propagate
    into ḡ), so that the common case pays no extra pass over the P entries.
    """
    direction = partition.check_vector(direction, "direction")
    out = []
    for i, (u, p) in enumerate(zip(direction, partition.parameters)):
        name = partition.parameter_names[i]
        if not u.is_floating_point():
            raise ValueError(f"direction[{i}] ({name!r}) has dtype {u.dtype}, not floating point.")
        if u.device != p.device:
            raise ValueError(f"direction[{i}] ({name!r}) is on {u.device} but its parameter is "
                             f"on {p.device}.")
        out.append(u.detach().to(p.dtype))
    return out


def _check_results(partition: Partition, direction: list[Tensor],
                   results: dict[str, Tensor | None]) -> None:
    """Name the cause of non-finite results: a direction tensor, or the derivatives themselves."""
    if all(v is None or bool(torch.isfinite(v).all()) for v in results.values()):
        return
    for i, u in enumerate(direction):
        if not bool(torch.isfinite(u).all()):
            raise ValueError(f"direction[{i}] ({partition.parameter_names[i]!r}) has non-finite "
                             "entries.")
    bad = [name for name, v in results.items() if v is not None and not torch.isfinite(v).all()]
    raise ValueError(f"partitioned_derivatives: {', '.join(bad)} not finite (the loss is finite "
                     "but its derivatives overflow).")


def _check_deterministic(model: nn.Module) -> None:
    """Every pass must see the same loss function: no BatchNorm statistics or dropout masks."""
    check_no_training_batchnorm(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise ValueError(
                f"Module {name!r} ({type(module).__name__}) is in training mode: the loss would "
                "differ between the passes of one evaluation. Call model.eval()."
            )


def _grad(output: Tensor, inputs: Sequence[Tensor], *, create_graph: bool
          ) -> Sequence[Tensor | None]:
    """Gradient of a scalar node w.r.t. ``inputs``; all None if it does not depend on them."""
    if not output.requires_grad:
        return [None] * len(inputs)
    return torch.autograd.grad(output, inputs, retain_graph=True, create_graph=create_graph,
                               allow_unused=True)


# --------------------------------------------------------------------------------- engines
def _loop(problem: _Problem, order: int, third: Third
          ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The reference algorithm (``research/wolinski.md`` §2.2), one pruned pass per row/pair."""
    S, start = problem.size, problem.start
    leaves = [t.detach().requires_grad_(True) for t in problem.theta]  # fresh leaves, no copy
    loss = problem.loss(leaves)
    problem.check_loss(loss)
    g = problem.contract(_grad(loss, leaves, create_graph=order > 1), 0)
    if order == 1:
        return _stack(g), None, None
    H = torch.zeros(S, S, dtype=loss.dtype, device=loss.device)
    D = torch.zeros((S,) if third == "diag" else (S, S, S), dtype=loss.dtype, device=loss.device)
    for i in range(S):
        row = problem.contract(_grad(g[i], leaves[start[i]:], create_graph=order > 2), i)
        H[i, i:] = _stack(row)
        if order < 3:
            continue
        if third == "diag":
            own = _grad(row[0], leaves[start[i]:start[i + 1]], create_graph=False)
            D[i] = problem.contract(own, i)[0].detach()
        else:
            for j in range(i, S):
                tail = _grad(row[j - i], leaves[start[j]:], create_graph=False)
                D[i, j, j:] = _stack(problem.contract(tail, j))
    if order < 3:
        return _stack(g), _mirror2(H), None
    return _stack(g), _mirror2(H), (D if third == "diag" else _mirror3(D))


def _stack(values: list[Tensor]) -> Tensor:
    """Detached S-vector of separate scalars."""
    return torch.stack(values).detach()


def _batched(problem: _Problem, order: int, third: Third, chunk_size: int | None
             ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``torch.func`` lanes: vmap over rows (or sorted pairs) of φ's derivatives, per chunk."""
    S = problem.size
    ref = problem.theta[0]
    if order == 1:
        tau = torch.zeros(S, dtype=ref.dtype, device=ref.device)
        g, loss = grad_and_value(_phi(problem, 0))(tau)
        problem.check_loss(loss)
        return g.detach(), None, None
    if order == 3 and third == "full":
        lanes = [(i, j) for i in range(S) for j in range(i, S)]
    else:
        lanes = [(i, i) for i in range(S)]
    chunk = len(lanes) if chunk_size is None else chunk_size
    g = torch.zeros(S, dtype=ref.dtype, device=ref.device)
    H = torch.zeros(S, S, dtype=ref.dtype, device=ref.device)
    D = torch.zeros((S, S, S) if third == "full" else (S,), dtype=ref.dtype, device=ref.device)
    for begin in range(0, len(lanes), chunk):
        part = lanes[begin:begin + chunk]
        first = part[0][0]  # lanes are sorted by row: the chunk needs subsets first..S−1 only
        rows = torch.tensor([i - first for i, _ in part], device=ref.device)
        cols = torch.tensor([j - first for _, j in part], device=ref.device)
        eye = torch.eye(S - first, dtype=ref.dtype, device=ref.device)
        lane = _lane(_phi(problem, first), S - first, order)
        try:
            gi, row, loss, *third_row = vmap(lane)(eye[rows], eye[cols])
        except RuntimeError as error:
            raise ValueError(
                f"method='batched' cannot run this model under torch.func.vmap ({error}); use "
                "method='loop'."
            ) from error
        problem.check_loss(loss[0])
        idx = rows + first
        g[idx] = gi.detach()
        H[idx, first:] = row.detach()
        if order == 3 and third == "diag":
            D[idx] = third_row[0][torch.arange(len(part)), rows].detach()
        elif order == 3:
            D[idx, cols + first, first:] = third_row[0].detach()
    H = _mirror2(H)
    if order < 3:
        return g, H, None
    return g, H, (D if third == "diag" else _mirror3(D))


def _phi(problem: _Problem, first: int) -> Callable[[Tensor], Tensor]:
    """τ ↦ L(θ + Σ_{s ≥ first} τ_{s−first} u^{(s)}); the subsets before ``first`` stay constant,
    so no derivative is ever taken with respect to them."""
    offset = problem.start[first]

    def phi(tau: Tensor) -> Tensor:
        values = list(problem.theta[:offset]) + [
            t + tau[problem.subset_of[k] - first] * problem.u[k]
            for k, t in enumerate(problem.theta[offset:], start=offset)
        ]
        return problem.loss(values)

    return phi


def _lane(phi: Callable[[Tensor], Tensor], size: int, order: int
          ) -> Callable[[Tensor, Tensor], tuple[Tensor, ...]]:
    """For one-hot e_i, e_j (length ``size``) the derivatives of φ at τ = 0 that lane (i, j) needs:
    (ḡ_i, H̄_i·, L) at order 2 and (ḡ_i, H̄_i·, L, ∇_τ H̄_ij = D̄_ij·) at order 3."""

    def lane(e_i: Tensor, e_j: Tensor) -> tuple[Tensor, ...]:
        def first(tau: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            gradient, loss = grad_and_value(phi)(tau)
            return gradient @ e_i, (gradient @ e_i, loss)

        def second(tau: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
            row, (g_i, loss) = grad(first, has_aux=True)(tau)
            return row @ e_j, (g_i, row, loss)

        tau = torch.zeros(size, dtype=e_i.dtype, device=e_i.device)
        if order == 2:
            return second(tau)[1]
        third_row, values = grad(second, has_aux=True)(tau)
        return (*values, third_row)

    return lane


def _mirror2(upper: Tensor) -> Tensor:
    """A symmetric matrix from its upper triangle (the lower one is ignored)."""
    upper = torch.triu(upper)
    return upper + torch.triu(upper, 1).T


def _mirror3(sorted_entries: Tensor) -> Tensor:
    """The symmetric S×S×S tensor whose entry (i, j, k) is sorted_entries at sort(i, j, k) (only
    the entries i ≤ j ≤ k of the argument are read)."""
    S = sorted_entries.shape[0]
    grid = torch.stack(torch.meshgrid(*(torch.arange(S, device=sorted_entries.device),) * 3,
                                      indexing="ij"))
    a, b, c = torch.sort(grid, dim=0).values
    return sorted_entries[a, b, c]


# --------------------------------------------------------------------------------- entry point
def partitioned_derivatives(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    direction: Sequence[Tensor],
    partition: Partition | None = None,
    order: int = 3,
    third: Third = "diag",
    *,
    chunk_size: int | None = None,
    method: Method = "loop",
) -> PartitionedDerivatives:
    """ḡ, H̄ and D̄ of ``loss_fn(model(inputs), targets)`` along ``direction`` on a partition.

    Exact derivatives of φ(τ) = L(θ + Σ_s τ_s u^{(s)}) at τ = 0 (Wolinski, arXiv 2312.03885;
    module docstring for the math, the algorithm and the two engines), in the scale of the loss as
    ``loss_fn`` reduces it.

    Args:
        model: the model; only the partition's tensors are differentiated, and the model's own
            parameters are left untouched (no ``.grad`` is written).
        loss_fn: any differentiable ``loss_fn(outputs, targets)`` → scalar.
        inputs: a tensor or a tuple of tensors passed to ``model``.
        targets: passed to ``loss_fn``.
        direction: u, a list of tensors aligned with ``partition.parameters``; detached and cast to
            the parameters' dtypes.
        partition: defaults to :meth:`Partition.by_tensor` (Wolinski's canonical partition).
        order: 1 (ḡ), 2 (ḡ, H̄) or 3 (ḡ, H̄, D̄).
        third: ``"diag"`` for D̄_sss, shape (S,), in O(S) passes; ``"full"`` for the symmetric
            S×S×S tensor in O(S²) passes.
        chunk_size: ``method="batched"`` only: lanes (rows, or (i, j) pairs for the full D̄) per
            vmapped pass; ``None`` runs all at once. Memory grows linearly with it.
        method: ``"loop"`` (default; the fewest operations, fastest on CPU) or ``"batched"``
            (``torch.func.vmap``; fewer, larger kernels).

    Returns:
        A :class:`PartitionedDerivatives` with detached tensors in the parameters' dtype, on
        their device.

    Raises:
        ValueError: a direction that does not match the partition (tensor count, order or
            shapes), is on another device or has non-finite entries; partition tensors that are
            not the model's; an invalid order, third, method or chunk_size; a non-scalar or
            non-finite loss; BatchNorm or dropout in training mode (the passes must all see the
            same function); a model ``torch.func.vmap`` cannot run with ``method="batched"``.
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}.")
    if third not in ("diag", "full"):
        raise ValueError(f"third must be 'diag' or 'full', got {third!r}.")
    if method not in ("batched", "loop"):
        raise ValueError(f"method must be 'batched' or 'loop', got {method!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int ≥ 1, got {chunk_size!r}.")
    partition = partition if partition is not None else Partition.by_tensor(model)
    u = _check_direction(partition, direction)
    _check_deterministic(model)
    problem = _Problem(model, loss_fn, inputs, targets, partition, u)
    with torch.enable_grad():
        if method == "loop":
            g, H, D = _loop(problem, order, third)
        else:
            g, H, D = _batched(problem, order, third, chunk_size)
    _check_results(partition, u, {"g": g, "H": H, "D": D})
    return PartitionedDerivatives(g=g, H=H, D=D)

