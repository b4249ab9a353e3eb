"""Natural-gradient descent preconditioned by any :class:`~curvlib.CurvatureEstimate`.

The natural gradient (Amari, "Natural gradient works efficiently in learning", Neural Computation
10, 1998) steps along F⁻¹∇L, with F the Fisher information; for the losses curvlib supports the
Fisher equals the generalized Gauss-Newton matrix, and K-FAC (Martens & Grosse, "Optimizing neural
networks with Kronecker-factored approximate curvature", ICML 2015) and its relatives make F⁻¹v
affordable. With C the estimate, g = ∇L the mini-batch gradient, θ the parameters it covers and a
step counter k = 0, 1, ..., one step of :class:`NaturalGradient` is

    g̃   = g + ω θ                                         (weight decay ω, added to the gradient)
    Δ   = (C + λ_k I)⁻¹ g̃                                 (``estimate.solve(g̃, λ_k)``)
    ν   = min(1, √(κ / Σ_p α_p² ⟨Δ_p, g̃_p⟩))               (KL clipping, only when κ is given)
    b   ← μ b + ν Δ                                       (heavy-ball momentum, b₀ = 0)
    θ   ← θ − α b

with learning rate α (per parameter group, so ``torch.optim.lr_scheduler`` applies), damping λ_k
(a number or a schedule k ↦ λ_k), momentum μ and KL-clipping radius κ. The defaults (μ = 0, ω = 0,
no κ) give the plain preconditioned step θ ← θ − α (C + λI)⁻¹ g.

**Order of momentum** (research/kfac_family.md, pitfall P12): the gradient is preconditioned first
and the momentum averages the *preconditioned* (and clipped) directions, as in K-FAC used as a
preconditioner for SGD with momentum. This differs from preconditioning a running average of raw
gradients (an Adam-style first moment), which mixes gradients measured under older curvature.

**KL clipping** (Ba, Grosse & Martens, "Distributed second-order optimization using
Kronecker-factored approximations", ICLR 2017): α²·⟨Δ, g̃⟩ is the quadratic model's prediction of
the KL divergence 2·KL ≈ δᵀFδ moved by the step δ = αΔ when C ≈ F; ν shrinks the step so that this
prediction stays below κ.

**Statistics come from the training step.** Every ``stat_every``-th step is a statistics step:

* an estimate with a ``record`` method (the Kronecker family) collects them from the training
  forward and backward: run the forward inside ``with optimizer.record(targets): ...``. With
  ``fisher="empirical"`` the training backward is reused; ``"mc"``/``"type2"`` add one batched
  backward on leaving the block. ``step`` then calls ``estimate.flush()``;
* otherwise (or when nothing was recorded) ``step(inputs=..., targets=...)`` calls
  ``estimate.update(inputs, targets)``, which runs its own passes. The exact estimates keep every
  batch they see, so they are cleared first: their curvature is that of the latest statistics
  batch, evaluated at the current parameters.

Every ``refresh_every``-th step calls ``estimate.refresh()`` when the estimate has one (eigenbases
of the Kronecker factors; the optimizer turns ``estimate.auto_refresh`` off to own that schedule).

**Parameters without curvature.** Parameters of ``params`` outside ``estimate.partition`` (e.g.
LayerNorm or embeddings that a Kronecker estimate does not cover) are updated by a first-order
rule instead of being ignored: ``fallback="sgd"`` (θ ← θ − α_f b, b ← μ b + g + ωθ) or ``"adam"``
(Kingma & Ba 2015, bias-corrected, ω added to the gradient as in ``torch.optim.Adam``), with the
learning rate α_f = ``fallback_lr`` (default: the group's ``lr``); ``fallback="error"`` refuses such
parameters instead. They are listed in :attr:`NaturalGradient.fallback_params`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from curvlib.estimate import CurvatureEstimate
from curvlib.exact.base import ExactEstimate
from curvlib.optim.per_layer_lr import check_float, check_int

Damping = float | Callable[[int], float]
FALLBACKS: tuple[str, ...] = ("sgd", "adam", "error")


class NaturalGradient(torch.optim.Optimizer):
    """Natural-gradient descent with a curvature estimate as preconditioner (see module docstring).

    Args:
        params: the parameters to optimise (tensors or parameter groups). Every tensor of
            ``estimate.partition`` must be among them; the others get the fallback update.
        estimate: any :class:`~curvlib.CurvatureEstimate` over (some of) ``params``.
        lr: learning rate α (≥ 0), per group.
        damping: Tikhonov damping λ ≥ 0, or a schedule ``step -> λ`` called with the number of
            steps taken so far (0 on the first step).
        momentum: heavy-ball coefficient μ ∈ [0, 1) on the preconditioned direction (default 0),
            per group; also the momentum of the ``"sgd"`` fallback.
        weight_decay: ω ≥ 0 (default 0), per group, added to the gradient before preconditioning.
        kl_clip: KL-clipping radius κ > 0; ``None`` (default) disables clipping.
        damping_mode: passed to ``estimate.solve`` for estimates that offer several ways of
            damping (``estimate.damping_modes``, e.g. K-FAC's factored ``"pi"`` damping of
            Martens & Grosse §6.3); ``None`` (default) uses the estimate's default, the exact
            Tikhonov (C + λI)⁻¹.
        stat_every: statistics are gathered on steps k with k % stat_every == 0 (default 1).
        refresh_every: ``estimate.refresh()`` runs on steps k with k % refresh_every == 0
            (default 1: every step uses eigenbases of the latest statistics).
        fallback: ``"sgd"`` (default), ``"adam"`` or ``"error"``: the update of parameters that
            the estimate does not cover.
        fallback_lr: learning rate of the fallback update, per group (default: the group's lr).
        betas: Adam's (β₁, β₂) for ``fallback="adam"``, per group (default (0.9, 0.999)).
        eps: Adam's ε > 0 for ``fallback="adam"``, per group (default 1e-8).

    Raises:
        ValueError: a hyper-parameter out of range (naming it), an estimate that is not a
            CurvatureEstimate, a partition tensor missing from ``params``, or uncovered parameters
            with ``fallback="error"``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        estimate: CurvatureEstimate,
        lr: float,
        damping: Damping,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        damping_mode: str | None = None,
        stat_every: int = 1,
        refresh_every: int = 1,
        fallback: str = "sgd",
        fallback_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not isinstance(estimate, CurvatureEstimate):
            raise ValueError(
                f"estimate must be a curvlib.CurvatureEstimate, got {type(estimate).__name__}."
            )
        if not callable(damping):
            damping = check_float(damping, "damping")
        if kl_clip is not None:
            kl_clip = check_float(kl_clip, "kl_clip", positive=True)
        if damping_mode is not None:
            modes = getattr(estimate, "damping_modes", ())
            if damping_mode not in modes:
                raise ValueError(
                    f"damping_mode must be one of {type(estimate).__name__}'s damping_modes "
                    f"{tuple(modes)}, got {damping_mode!r}."
                )
        check_int(stat_every, "stat_every", 1)
        check_int(refresh_every, "refresh_every", 1)
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}.")
        self.estimate = estimate
        self.damping = damping
        self.kl_clip = kl_clip
        # Only estimates with several modes take the keyword; the others get none.
        self._solve_options = {} if damping_mode is None else {"damping_mode": damping_mode}
        self.stat_every = stat_every
        self.refresh_every = refresh_every
        self.fallback = fallback
        # Set before Optimizer.__init__, whose add_param_group calls classify the parameters.
        self._curvature_ids = {id(p) for p in estimate.partition.parameters}
        self._steps = 0
        self._recorded = False
        defaults = {
            "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
            "fallback_lr": fallback_lr, "betas": betas, "eps": eps,
        }
        super().__init__(params, defaults)
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        missing = [name for name, p in zip(estimate.partition.parameter_names,
                                           estimate.partition.parameters) if id(p) not in owned]
        if missing:
            raise ValueError(
                f"estimate covers parameters that are not in params: {missing}. Pass every "
                "parameter of estimate.partition to the optimizer."
            )
        if hasattr(estimate, "auto_refresh"):
            # The optimizer owns the refresh schedule (refresh_every); refreshing on every read
            # would recompute eigenbases on each solve.
            estimate.auto_refresh = False

    # ------------------------------------------------------------------ parameter groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as ``torch.optim.Optimizer``), validating its hyper-parameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_float(group["lr"], "lr")
        if check_float(group["momentum"], "momentum") >= 1.0:
            raise ValueError(f"momentum must be < 1, got {group['momentum']!r}.")
        check_float(group["weight_decay"], "weight_decay")
        if group["fallback_lr"] is not None:
            check_float(group["fallback_lr"], "fallback_lr")
        betas = group["betas"]
        if not (isinstance(betas, tuple | list) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (β₁, β₂), got {betas!r}.")
        for i, beta in enumerate(betas):
            if check_float(beta, f"betas[{i}]") >= 1.0:
                raise ValueError(f"betas[{i}] must be < 1, got {beta!r}.")
        check_float(group["eps"], "eps", positive=True)
        if self.fallback == "error":
            uncovered = [tuple(p.shape) for p in group["params"] if not self._has_curvature(p)]
            if uncovered:
                raise ValueError(
                    f"fallback='error': parameters of shapes {uncovered} are not covered by the "
                    f"estimate's partition; use fallback='sgd' or 'adam' to update them."
                )

    def _has_curvature(self, p: Tensor) -> bool:
        return id(p) in self._curvature_ids

    @property
    def fallback_params(self) -> list[Tensor]:
        """The parameters of ``params`` that the estimate does not cover (fallback update)."""
        return [p for g in self.param_groups for p in g["params"] if not self._has_curvature(p)]

    # ------------------------------------------------------------------ statistics
    @property
    def steps(self) -> int:
        """Number of steps taken."""
        return self._steps

    def is_statistics_step(self) -> bool:
        """Whether the next step gathers statistics (``steps % stat_every == 0``)."""
        return self._steps % self.stat_every == 0

    @contextmanager
    def record(self, targets: Any) -> Iterator[None]:
        """Collect the estimate's statistics from the training forward run inside this block.

        On a statistics step this is ``estimate.record(targets)``; on other steps it does nothing,
        so that the forward costs no more than plain training. Run exactly one forward of the
        model inside, then the training backward, then :meth:`step`.

        Raises:
            ValueError: the estimate has no ``record`` (pass ``inputs``/``targets`` to
                :meth:`step` instead), or ``record`` was already used for this step.
        """
        if not hasattr(self.estimate, "record"):
            raise ValueError(
                f"{type(self.estimate).__name__} has no record(); pass inputs= and targets= to "
                "NaturalGradient.step() so that it calls estimate.update(inputs, targets)."
            )
        if self._recorded:
            raise ValueError("record() was already used for this step; call step() first.")
        if not self.is_statistics_step():
            yield
            return
        with self.estimate.record(targets):
            yield
        self._recorded = True

    def _gather_statistics(self, inputs: Any, targets: Any) -> None:
        if self._recorded:
            self.estimate.flush()
        elif inputs is not None and targets is not None:
            if isinstance(self.estimate, ExactEstimate):
                self.estimate.clear()
            with torch.enable_grad():
                self.estimate.update(inputs, targets)
        else:
            raise ValueError(
                f"step {self._steps} is a statistics step (stat_every={self.stat_every}) but no "
                "statistics were given: run the forward inside `with optimizer.record(targets):` "
                "or pass inputs= and targets= to step()."
            )

    def _current_damping(self) -> float:
        if not callable(self.damping):
            return float(self.damping)
        return check_float(self.damping(self._steps),
                           f"damping({self._steps}) (the damping schedule's value)")

    # ------------------------------------------------------------------ the step
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        inputs: Any = None,
        targets: Any = None,
    ) -> Tensor | None:
        """One natural-gradient step.

        Args:
            closure: re-evaluates the model and returns the loss after ``loss.backward()`` (it may
                run its forward inside :meth:`record`).
            inputs, targets: the batch for ``estimate.update`` on a statistics step where nothing
                was recorded; ignored otherwise.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.is_statistics_step():
            self._gather_statistics(inputs, targets)
        if self._steps % self.refresh_every == 0 and hasattr(self.estimate, "refresh"):
            self.estimate.refresh()
        self._natural_step()
        self._fallback_step()
        self._recorded = False
        self._steps += 1
        return loss

    # No graph is needed through the step; the function transforms (torch.func) inside an exact
    # estimate's solve differentiate regardless of the outer no_grad.
    @torch.no_grad()
    def _natural_step(self) -> None:
        partition = self.estimate.partition
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        groups = [group_of[id(p)] for p in partition.parameters]
        grads = []
        for p, group in zip(partition.parameters, groups):
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            if group["weight_decay"] != 0:
                grad = grad.add(p, alpha=group["weight_decay"])
            grads.append(grad)
        direction = self.estimate.solve(grads, self._current_damping(), **self._solve_options)
        scale = 1.0
        if self.kl_clip is not None:
            predicted = sum(
                group["lr"] ** 2 * float(torch.sum(d * g))
                for d, g, group in zip(direction, grads, groups)
            )
            # ⟨Δ, g̃⟩ ≥ 0 for a positive semi-definite C + λI; a zero prediction needs no clip.
            if predicted > 0:
                scale = min(1.0, math.sqrt(self.kl_clip / predicted))
        for p, d, group in zip(partition.parameters, direction, groups):
            update = d if scale == 1.0 else d * scale
            if group["momentum"] != 0:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                update = state["momentum_buffer"]
            p.add_(update, alpha=-group["lr"])

    @torch.no_grad()
    def _fallback_step(self) -> None:
        for group in self.param_groups:
            lr = group["lr"] if group["fallback_lr"] is None else group["fallback_lr"]
            for p in group["params"]:
                if p.grad is None or self._has_curvature(p):
                    continue
                grad = p.grad
                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if self.fallback == "adam":
                    beta1, beta2 = group["betas"]
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    first = state["exp_avg"] / (1 - beta1 ** state["step"])
                    second = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
                    p.addcdiv_(first, second.sqrt_().add_(group["eps"]), value=-lr)
                else:
                    if group["momentum"] != 0:
                        if "momentum_buffer" not in state:
                            state["momentum_buffer"] = grad.clone()
                        else:
                            state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                        grad = state["momentum_buffer"]
                    p.add_(grad, alpha=-lr)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (as ``torch.optim``) plus the step counter and the estimate's
        statistics, so that resuming reproduces the trajectory exactly."""
        state = super().state_dict()
        state["natural_gradient"] = {
            "steps": self._steps, "estimate": self.estimate.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (the estimate's statistics included)."""
        state_dict = dict(state_dict)
        if "natural_gradient" not in state_dict:
            raise ValueError(
                "state_dict has no 'natural_gradient' entry: it was not saved by NaturalGradient."
            )
        extra = state_dict.pop("natural_gradient")
        super().load_state_dict(state_dict)
        self._steps = int(extra["steps"])
        self._recorded = False
        self.estimate.load_state_dict(extra["estimate"])
