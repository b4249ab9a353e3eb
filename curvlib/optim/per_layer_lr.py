"""Per-subset learning rates from any curvature estimate, on top of any torch optimizer.

Wolinski ("Gathering and Exploiting Higher-Order Information when Training Large Structured Models",
arXiv 2312.03885, §3.1 of ``research/wolinski.md``) reads the order-2 partitioned step as a way to
obtain *one learning rate per subset*: along a proposed step u, restricted to each subset s of a
partition (u_s, zero elsewhere), the loss restricted to the S-dimensional family θ − Σ_s η_s u_s is

    φ(η) ≈ L(θ) − gᵀη + ½ ηᵀ R η,   g_s = ⟨∇_s L, u_s⟩,   R_st = u_sᵀ C_st u_t,

with C the curvature (R = H̄ when C is the Hessian). Minimising the model gives

    (R + damping·I) η = g,

the exact per-subset line-search optimum when L is quadratic and C its Hessian (damping = 0).
:class:`PerLayerLR` computes R with ``estimate.reduced(u)`` for any
:class:`~curvlib.CurvatureEstimate` (exact Hessian or GGN, K-FAC, EKFAC, ...) and u the step the
wrapped optimizer proposes (SGD, Adam, a natural-gradient optimizer, ...), and takes θ_s ← θ_s −
multiplier·η_s·u_s instead of the base step θ ← θ − u.

How the proposed step is obtained (works for any ``torch.optim.Optimizer``): snapshot the
partition's parameters θ⁰, let the base optimizer step to θ¹ (its internal state, e.g. Adam's
moments, advances as usual), read u = θ⁰ − θ¹, restore θ⁰ (where the estimate is fed and read),
and take θ⁰ − multiplier·η_s·u_s. Parameters the base optimizer holds outside the estimate's
partition keep the base step unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlib.estimate import CurvatureEstimate, dense_symmetric_solve
from curvlib.exact.base import ExactEstimate
from curvlib.partition import Partition

__all__ = ["PerLayerLR", "PerLayerLRRecord"]


def check_int(value: object, name: str, minimum: int) -> int:
    """``value`` as an int ≥ ``minimum``, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}.")
    return value


def check_float(value: object, name: str, *, positive: bool = False, at_most: float = math.inf
                ) -> float:
    """``value`` as a finite float ≥ 0 (> 0 if ``positive``, ≤ ``at_most``), or a ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    low_ok = number > 0 if positive else number >= 0
    if not (math.isfinite(number) and low_ok and number <= at_most):
        bound = "> 0" if positive else "≥ 0"
        upper = f" and ≤ {at_most}" if math.isfinite(at_most) else ""
        raise ValueError(f"{name} must be finite, {bound}{upper}, got {value!r}.")
    return number


def check_bool(value: object, name: str) -> bool:
    """``value`` as a bool, or a ValueError naming the argument."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


def current_gradients(partition: Partition, owner: str) -> list[Tensor]:
    """The ``.grad`` of every tensor of the partition (detached); ValueError names a missing one."""
    grads = []
    for name, p in zip(partition.parameter_names, partition.parameters):
        if p.grad is None:
            raise ValueError(
                f"{owner}.step: parameter {name!r} has no gradient; pass a closure that calls "
                "backward(), or call backward() before step()."
            )
        grads.append(p.grad.detach())
    return grads


@dataclass(frozen=True)
class PerLayerLRRecord:
    """One recomputation of the per-subset learning rates.

    Attributes:
        step: the step index (0-based) at which the rates were computed.
        g: ⟨∇_s L, u_s⟩ for the proposed step u, shape (S,), float64.
        R: the reduced curvature u_sᵀ C_st u_t, shape (S, S), float64.
        eta: the rates in use from this step on (after clipping; the previous ones on failure).
        success: whether (R + damping·I) η = g was solved.
        message: why the solve failed, or ``""``.
    """

    step: int
    g: Tensor
    R: Tensor
    eta: Tensor
    success: bool
    message: str


class PerLayerLR:
    """Rescale a base optimizer's step per subset with η solving (R + damping·I) η = g.

    The subsets are those of ``estimate.partition``. Every ``period`` steps (from step 0), η is
    recomputed along the step u the base optimizer proposes (module docstring), with
    g_s = ⟨∇_s L, u_s⟩ from the gradients of the current step and R = ``estimate.reduced(u)``;
    in between, the last η multiplies the new proposals (Wolinski, arXiv 2312.03885, §3.1 and §4:
    rates recomputed every T steps and reused). The applied step is
    θ_s ← θ_s − multiplier·η_s·u_s.

    How the estimate is fed:

    * ``update_estimate=True`` (default): ``step`` must get a batch ``(inputs, targets)`` on every
      step that recomputes η (see :attr:`will_evaluate`); the estimate is refreshed on it with
      ``estimate.update(inputs, targets)``. The exact estimates (ExactHessian, ExactGGN) keep every
      batch they see, so they are cleared first: R is the curvature of that batch at the current
      parameters. Estimates with running statistics (the Kronecker family) accumulate as their
      own constructor says (e.g. ``ema_decay``). Use a batch
      other than the training batch: g and R from one batch make η biased (``research/wolinski.md``
      §7.2).
    * ``update_estimate=False``: the estimate is used as it stands — e.g. one that a
      NaturalGradient optimizer keeps up to date — and ``step`` refuses a batch.

    η keeps its previous value when the solve fails (R + damping·I singular); before the first
    successful solve η = 1, i.e. the base step unchanged. With ``clip_negative``, negative η_s
    (indefinite R, or a proposal that is not a descent direction for subset s) become 0: that
    subset does not move until the next recomputation.

    Args:
        base_optimizer: any ``torch.optim.Optimizer`` whose ``step()`` needs no closure; it must
            hold every parameter of the estimate's partition.
        estimate: the curvature estimate; its partition defines the subsets.
        period: recompute η every ``period`` steps (Wolinski's T = 10).
        damping: the ridge added to R (≥ 0); > 0 keeps the solve defined when some u_s vanishes.
        clip_negative: set negative η_s to 0 (Wolinski's ``remove_negative``).
        multiplier: a global factor on every η_s (Wolinski's λ₁; 1 applies the model's optimum).
        update_estimate: feed the estimate from the batch given to ``step`` (see above).

    Attributes:
        history: one :class:`PerLayerLRRecord` per recomputation (for plots; not in state_dict).
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        estimate: CurvatureEstimate,
        period: int = 10,
        damping: float = 0.0,
        clip_negative: bool = True,
        multiplier: float = 1.0,
        update_estimate: bool = True,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise ValueError(
                "base_optimizer must be a torch.optim.Optimizer, got "
                f"{type(base_optimizer).__name__}."
            )
        if not isinstance(estimate, CurvatureEstimate):
            raise ValueError(
                f"estimate must be a curvlib.CurvatureEstimate, got {type(estimate).__name__}."
            )
        held = {id(p) for group in base_optimizer.param_groups for p in group["params"]}
        for name, p in zip(estimate.partition.parameter_names, estimate.partition.parameters):
            if id(p) not in held:
                raise ValueError(
                    f"base_optimizer does not hold parameter {name!r} of the estimate's partition."
                )
        self.base_optimizer = base_optimizer
        self.estimate = estimate
        self.partition = estimate.partition
        self.period = check_int(period, "period", 1)
        self.damping = check_float(damping, "damping")
        self.clip_negative = check_bool(clip_negative, "clip_negative")
        self.multiplier = check_float(multiplier, "multiplier", positive=True)
        self.update_estimate = check_bool(update_estimate, "update_estimate")
        self.history: list[PerLayerLRRecord] = []
        self._step = 0
        ref = self.partition.parameters[0]
        self._eta = torch.ones(len(self.partition), dtype=torch.float64, device=ref.device)

    # ---------------------------------------------------------------- torch.optim look-alike
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's parameter groups (so its learning rate can be read and changed)."""
        return self.base_optimizer.param_groups

    @property
    def state(self) -> Any:
        """The base optimizer's per-parameter state."""
        return self.base_optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def will_evaluate(self) -> bool:
        """Whether the next ``step`` recomputes η (and so, with update_estimate, needs a batch)."""
        return self._step % self.period == 0

    @property
    def last_eta(self) -> Tensor:
        """The per-subset rates η in use (before ``multiplier``), shape (S,), float64."""
        return self._eta.clone()

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Tensor] | None = None,
        inputs: Any = None,
        targets: Any = None,
    ) -> Tensor | None:
        """One step: the base optimizer proposes u, each subset moves by multiplier·η_s·u_s.

        Args:
            closure: recomputes the training loss and its gradients (zero_grad, forward,
                backward) and returns the loss; without it, the ``.grad`` already there are used.
            inputs, targets: the batch that refreshes the estimate on steps that recompute η,
                when ``update_estimate`` is True.

        Returns:
            The closure's loss, or None.

        Raises:
            ValueError: a missing batch on a recomputation step (or a batch given with
                ``update_estimate=False``), a parameter without gradient, non-finite g or R.
        """
        evaluate = self.will_evaluate
        if evaluate and self.update_estimate and (inputs is None or targets is None):
            raise ValueError(
                f"PerLayerLR.step: step {self._step} recomputes the learning rates and needs the "
                "batch (inputs, targets) that refreshes the estimate."
            )
        if not self.update_estimate and (inputs is not None or targets is not None):
            raise ValueError(
                "PerLayerLR.step got inputs/targets but update_estimate=False: the estimate is "
                "used as it stands; feed it yourself or set update_estimate=True."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self.partition.parameters
        grads = current_gradients(self.partition, "PerLayerLR")
        before = [p.detach().clone() for p in params]
        self.base_optimizer.step()
        # u = θ⁰ − θ¹: the base optimizer's proposed step, in the sign convention θ ← θ − η u.
        direction = [b - p for b, p in zip(before, params)]
        # Back to θ⁰ before the estimate is fed or read: its curvature is that at θ⁰.
        for p, b in zip(params, before):
            p.copy_(b)
        if evaluate:
            self._recompute(grads, direction, inputs, targets)
        factors = self.multiplier * self._eta
        for p, u, s in zip(params, direction, self.partition.subset_of):
            p.sub_(factors[s].to(p.dtype) * u)
        self._step += 1
        return loss

    def _recompute(self, grads: list[Tensor], direction: list[Tensor], inputs: Any, targets: Any
                   ) -> None:
        """Refresh the estimate if asked, then solve (R + damping·I) η = g; keep η on failure."""
        if self.update_estimate:
            if isinstance(self.estimate, ExactEstimate):
                # An exact estimate keeps every batch it sees: R must be that of the fresh batch.
                self.estimate.clear()
            with torch.enable_grad():
                self.estimate.update(inputs, targets)
        g = self.partition.subset_dots(grads, direction).to(torch.float64)
        R = self.estimate.reduced(direction).detach().to(torch.float64)
        for what, value in (("⟨∇L, u⟩ per subset", g), ("the reduced curvature R", R)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"PerLayerLR: {what} is not finite ({value.tolist()}).")
        try:
            eta = dense_symmetric_solve(R, g, self.damping, "PerLayerLR")
        except ValueError as error:
            success, message = False, f"{error} The previous learning rates are kept."
        else:
            success, message = True, ""
            self._eta = eta.clamp_min(0.0) if self.clip_negative else eta
        self.history.append(
            PerLayerLRRecord(self._step, g, R, self._eta.clone(), success, message)
        )

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state, the step count and η; the estimate's statistics too when
        this wrapper feeds it (``update_estimate``). ``history`` is a log and is not saved."""
        state: dict[str, Any] = {
            "base": self.base_optimizer.state_dict(),
            "step": self._step,
            "eta": self._eta.clone(),
        }
        if self.update_estimate:
            state["estimate"] = self.estimate.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        missing = {"base", "step", "eta"} - set(state)
        if self.update_estimate:
            missing |= {"estimate"} - set(state)
        if missing:
            raise ValueError(f"PerLayerLR.load_state_dict: state lacks {sorted(missing)}.")
        eta = state["eta"]
        if not isinstance(eta, Tensor) or eta.shape != self._eta.shape:
            raise ValueError(
                "PerLayerLR.load_state_dict: eta must be a tensor of shape "
                f"{tuple(self._eta.shape)} (one rate per subset), got {eta!r}."
            )
        self.base_optimizer.load_state_dict(state["base"])
        if self.update_estimate:
            self.estimate.load_state_dict(state["estimate"])
        self._step = check_int(state["step"], "state['step']", 0)
        self._eta = eta.detach().to(dtype=torch.float64, device=self._eta.device).clone()
