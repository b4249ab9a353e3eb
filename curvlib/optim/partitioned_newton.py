"""Wolinski's partitioned Newton optimizer: one learning rate per subset from ḡ, H̄ and diag D̄.

Wolinski, "Gathering and Exploiting Higher-Order Information when Training Large Structured
Models", arXiv 2312.03885 (``research/wolinski.md`` §3-§4). The parameters are split into S subsets
(default: one per tensor, the paper's canonical partition). At training step k:

1. **Direction.** A first-order *updater* turns the training gradient ∇L into a proposed step u_k
   without applying it: SGD with momentum μ (u_k = b_k, b_k = μ b_{k−1} + ∇L, b_0 = ∇L, dampening 0,
   learning rate 1) or Adam (u_k = m̂_k / (√v̂_k + ε), bias-corrected, learning rate 1).
2. **Every T = ``period`` steps** (k ≡ 0 mod T), on a *separate* batch passed to :meth:`step`, the
   partitioned derivatives along u_k (sign convention θ ← θ − Σ_s η_s u_s): ḡ_s = ⟨∇_sL, u_s⟩,
   H̄_st = u_sᵀ ∇²L u_t and, for ``order=3``, D̄_sss = ∇³L[u^{(s)}, u^{(s)}, u^{(s)}]
   (:func:`curvlib.partitioned.derivatives.partitioned_derivatives`). They are averaged over a
   window (below; the raw signed D̄_sss are averaged, before any |·|^{1/3}), and η solves
   * ``order=2``: the Newton step on the partition, H̄ η = ḡ (§3.2);
   * ``order=3``: the anisotropic cubic step, the global minimiser of
     −ḡᵀη + ½ηᵀH̄η + (λ_int/6)‖Dη‖³ with D = Diag(|D̄_sss|^{1/3}) (§3.3), i.e. the solution of
     η = (H̄ + (λ_int/2)‖Dη‖ D²)⁻¹ ḡ with the largest ‖Dη‖.
   When the solve fails (singular H̄ for order 2; an unbounded model or a numerical failure for
   order 3) the previous η is kept. With ``clip_negative`` negative η_s become 0 (the paper's
   ``remove_negative``; a negative rate on a gradient-like direction would climb).
3. **Update.** θ_s ← θ_s − λ₁·η_s·u_{k,s} for every subset, λ₁ = ``lr`` (the paper's "damping", a
   global multiplier). The η of the last evaluation is reused with u_{k+1}, ..., u_{k+T−1}.

**Warm-up.** During the first W = ``warmup`` evaluations the averages only accumulate and the
parameters do not move (the first W·T steps); before the first successful solve there is no η, so
no update either.

**Averaging** (the paper's "uniform average" variant, §4). Two uniform averages are kept: *up*
holds the evaluations of the current window of A = ``window`` evaluations, *use* those since the
start of the previous window. At each evaluation, if *up* holds A evaluations, *use* ← *up* and
*up* restarts; then the new evaluation joins both, and the solve sees the mean of *use*: after a
start-up of 1..A evaluations, the last A+1 to 2A evaluations. ``window=0`` disables averaging
(the solve sees the latest evaluation alone).

**Loss plateaus.** :meth:`scheduler_step` (call it once per epoch with the epoch's mean training
loss) halves λ₁ when the loss has not improved by a relative ``plateau_threshold`` for more than
``plateau_patience`` epochs (the paper's ReduceDampingOnPlateau: factor 0.5, patience 2,
threshold 1e-4, cooldown 0). λ₁ lives in ``param_groups[0]["lr"]``, so torch's own
``ReduceLROnPlateau`` works too.

**Invariance** (§3.4). If each subset is reparameterised as θ_s = a_s θ̃_s and the updater's
proposal scales as ũ_s = c_s u_s with a_s c_s > 0 fixed in time (gradient and SGD-momentum:
c_s = a_s), then ḡ, H̄, D̄ scale as (a_s c_s), (a_s c_s)(a_t c_t), (a_s c_s)³, both steps return
η_s/(a_s c_s), and the trajectory in θ is unchanged — also through the window averages and the
clipping. A positive ``ridge`` breaks this; Adam keeps it only up to ε. ``normalize_direction``
divides each u_s by its norm before everything (the tensors and the update), the author's later
fix for the averaging of tensors computed along directions whose scale drifts (§3.4, §7.6); the
step per subset is then λ₁η_s along a unit vector, and the invariance still holds.

**Departures from the published runs** (``research/wolinski.md`` §4, §7):

* the averages are proper means; the authors' code gives the first evaluation of every window
  weight 0 through an aliasing bug (§7.7);
* the updater runs at every step, also during warm-up, while the authors' code calls it only at
  the evaluation steps during warm-up (§7.11);
* ``window=0``, ``ridge``, ``normalize_direction`` and the Adam updater's ``betas``/``eps`` are
  options; the paper's runs used the defaults here (SGD momentum 0.9, A = 3, no ridge, no
  normalisation).

Paper's hyper-parameters (final runs, §5.1): λ₁ = 0.03 (MLP on MNIST), 0.3 (LeNet-5, VGG-11 on
CIFAR-10), 0.1 (20-layer MLP); λ_int = 1 (3 also tried); T = 10, A = 3, W = 3; batch 100 for both
the training and the derivative batches; SGD-momentum 0.9 updater; remove_negative on; plateau
factor 0.5, patience 2, threshold 1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlib.optim.per_layer_lr import check_bool, check_float, check_int, current_gradients
from curvlib.partition import Partition
from curvlib.partitioned.derivatives import PartitionedDerivatives, partitioned_derivatives

__all__ = ["PartitionedNewton", "PartitionedNewtonRecord"]

Updater = Literal["sgd", "adam"]
UPDATERS: tuple[str, ...] = ("sgd", "adam")


@dataclass(frozen=True)
class PartitionedNewtonRecord:
    """One evaluation of the partitioned derivatives and what the solve made of it.

    Attributes:
        step: the training step (0-based) of the evaluation.
        evaluation: 1-based count of evaluations.
        g, H, D: this evaluation's ḡ (S,), H̄ (S, S) and diag D̄ (S,) (None for order 2), float64.
        g_avg, H_avg, D_avg: the window averages the solve saw.
        count: how many evaluations the averages hold.
        warmup: whether this evaluation fell in the warm-up (no solve).
        eta: η in use after this evaluation (clipped; the previous one on failure; None while
            there is none). The per-subset learning rates are ``lr · eta``.
        lr: λ₁ at the time of the evaluation.
        success: whether the solve succeeded (False during warm-up).
        case: the solver's case (:class:`~curvlib.partitioned.cubic.CubicStepResult`; "newton" for
            order 2, "failed" when H̄ η = ḡ has no solution, "warmup" during warm-up).
        message: the solver's message.
    """

    step: int
    evaluation: int
    g: Tensor
    H: Tensor
    D: Tensor | None
    g_avg: Tensor
    H_avg: Tensor
    D_avg: Tensor | None
    count: int
    warmup: bool
    eta: Tensor | None
    lr: float
    success: bool
    case: str
    message: str


class _WindowAverage:
    """Wolinski's uniform "use"/"up" averages (module docstring), kept as float64 sums + counts."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.use: dict[str, Tensor] = {}
        self.up: dict[str, Tensor] = {}
        self.use_count = 0
        self.up_count = 0

    def add(self, sample: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        """Add one evaluation; return the mean the solve sees and how many evaluations it holds."""
        if self.window == 0:
            self.use, self.use_count = {}, 0
        elif self.up_count == self.window:
            self.use, self.use_count = self.up, self.up_count
            self.up, self.up_count = {}, 0
        # Fresh tensors each time: no sum aliases a sample or the other sum.
        self.use = {k: v + self.use[k] if k in self.use else v.clone() for k, v in sample.items()}
        self.up = {k: v + self.up[k] if k in self.up else v.clone() for k, v in sample.items()}
        self.use_count += 1
        self.up_count += 1
        return {k: v / self.use_count for k, v in self.use.items()}, self.use_count

    def state_dict(self) -> dict[str, Any]:
        return {
            "use": {k: v.clone() for k, v in self.use.items()},
            "up": {k: v.clone() for k, v in self.up.items()},
            "use_count": self.use_count,
            "up_count": self.up_count,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.use = {k: v.to(device=device, dtype=torch.float64) for k, v in state["use"].items()}
        self.up = {k: v.to(device=device, dtype=torch.float64) for k, v in state["up"].items()}
        self.use_count = check_int(state["use_count"], "state['use_count']", 0)
        self.up_count = check_int(state["up_count"], "state['up_count']", 0)


class PartitionedNewton(torch.optim.Optimizer):
    """Wolinski's optimizer: per-subset learning rates from partitioned derivatives along the
    step of a first-order updater (module docstring for the math, the averaging and the
    departures from the published runs).

    Usage::

        opt = PartitionedNewton(model.parameters(), model, loss_fn, lr=0.1)
        for x, y in train_loader:
            batch = next(derivative_batches) if opt.will_evaluate else (None, None)

            def closure():
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            opt.step(closure, *batch)
        opt.scheduler_step(epoch_mean_loss)  # once per epoch

    Args:
        params: the parameters to train (one flat iterable of tensors of ``model``).
        model: the model; the derivative passes call it with ``torch.func.functional_call``.
        loss_fn: ``loss_fn(outputs, targets)`` → scalar, as in training.
        order: 3 for the cubic step (the paper's method), 2 for the plain Newton step H̄⁻¹ḡ.
        lr: λ₁, the global multiplier of every η_s (the paper's "damping"); paper: 0.03-0.3.
        lambda_int: λ_int ≥ 0, the weight of the cubic term (order 3; 0 gives H̄⁻¹ḡ); paper: 1.
        updater: ``"sgd"`` (momentum buffer, the paper's choice) or ``"adam"`` (Adam's step).
        momentum: μ of the SGD updater (0 gives the plain gradient); paper: 0.9.
        betas, eps: Adam updater's moment decays and ε.
        period: T, steps between two evaluations of the derivatives; paper: 10.
        window: A, evaluations per averaging window (0: no averaging); paper: 3.
        warmup: W, evaluations before the first update; paper: 3.
        clip_negative: set negative η_s to 0 (the paper's ``remove_negative``, on in its runs).
        ridge: ρ ≥ 0 added to H̄'s diagonal before the solve (breaks the invariance; default 0).
        plateau_patience, plateau_factor, plateau_threshold: :meth:`scheduler_step`'s rule;
            paper: 2, 0.5, 1e-4.
        partition: the subsets; default one per tensor of ``params`` (Wolinski's canonical
            partition). Its tensors must be exactly ``params``.
        normalize_direction: divide each u_s by ‖u_s‖ (module docstring).
        chunk_size, method: passed to ``partitioned_derivatives`` (memory/speed of the passes).

    Attributes:
        history: one :class:`PartitionedNewtonRecord` per evaluation (for plots; not saved by
            ``state_dict``).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        order: int = 3,
        *,
        lr: float = 0.1,
        lambda_int: float = 1.0,
        updater: Updater = "sgd",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        period: int = 10,
        window: int = 3,
        warmup: int = 3,
        clip_negative: bool = True,
        ridge: float = 0.0,
        plateau_patience: int = 2,
        plateau_factor: float = 0.5,
        plateau_threshold: float = 1e-4,
        partition: Partition | None = None,
        normalize_direction: bool = False,
        chunk_size: int | None = None,
        method: str = "loop",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
        tensors = _flat_parameters(params)
        if order not in (2, 3):
            raise ValueError(f"order must be 2 (Newton step) or 3 (cubic step), got {order!r}.")
        if updater not in UPDATERS:
            raise ValueError(f"updater must be one of {UPDATERS}, got {updater!r}.")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (β₁, β₂), got {betas!r}.")
        defaults = {
            "lr": check_float(lr, "lr", positive=True),
            "lambda_int": check_float(lambda_int, "lambda_int"),
            "momentum": check_float(momentum, "momentum", at_most=1.0),
            "betas": (check_float(betas[0], "betas[0]", at_most=1.0),
                      check_float(betas[1], "betas[1]", at_most=1.0)),
            "eps": check_float(eps, "eps", positive=True),
            "ridge": check_float(ridge, "ridge"),
        }
        if max(defaults["betas"]) >= 1.0:
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}.")
        super().__init__(tensors, defaults)
        self.model = model
        self.loss_fn = loss_fn
        self.partition = _partition_of(model, tensors, partition)
        self.order = order
        self.updater = updater
        self.period = check_int(period, "period", 1)
        self.window = check_int(window, "window", 0)
        self.warmup = check_int(warmup, "warmup", 0)
        self.clip_negative = check_bool(clip_negative, "clip_negative")
        self.plateau_patience = check_int(plateau_patience, "plateau_patience", 0)
        self.plateau_factor = check_float(plateau_factor, "plateau_factor", positive=True,
                                          at_most=1.0)
        self.plateau_threshold = check_float(plateau_threshold, "plateau_threshold", at_most=1.0)
        self.normalize_direction = check_bool(normalize_direction, "normalize_direction")
        if chunk_size is not None:
            check_int(chunk_size, "chunk_size", 1)
        self.chunk_size = chunk_size
        self.method = method
        self.history: list[PartitionedNewtonRecord] = []
        self._average = _WindowAverage(self.window)
        self._step = 0
        self._evaluations = 0
        self._eta: Tensor | None = None
        self._plateau_best = math.inf
        self._plateau_bad = 0

    # ---------------------------------------------------------------- read-outs
    @property
    def will_evaluate(self) -> bool:
        """Whether the next :meth:`step` evaluates the derivatives (and so needs a batch)."""
        return self._step % self.period == 0

    @property
    def last_eta(self) -> Tensor | None:
        """η in use, shape (S,), float64 (None before the first successful solve)."""
        return None if self._eta is None else self._eta.clone()

    @property
    def last_g(self) -> Tensor | None:
        """The averaged ḡ of the latest evaluation (None before any)."""
        return self.history[-1].g_avg if self.history else None

    @property
    def last_H(self) -> Tensor | None:
        """The averaged H̄ of the latest evaluation (None before any)."""
        return self.history[-1].H_avg if self.history else None

    @property
    def last_D(self) -> Tensor | None:
        """The averaged diag D̄ of the latest evaluation (None before any, or for order 2)."""
        return self.history[-1].D_avg if self.history else None

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        inputs: Any = None,
        targets: Any = None,
    ) -> Tensor | None:
        """One training step (module docstring).

        Args:
            closure: recomputes the training loss and its gradients (zero_grad, forward,
                backward) and returns the loss; without it, the ``.grad`` already there are used.
            inputs, targets: the separate batch on which the derivatives are evaluated; needed
                when :attr:`will_evaluate` is True (every ``period`` steps from step 0), ignored
                otherwise.

        Returns:
            The closure's loss, or None.

        Raises:
            ValueError: a missing batch on an evaluation step, a parameter without gradient,
                non-finite averaged derivatives.
        """
        evaluate = self.will_evaluate
        if evaluate and (inputs is None or targets is None):
            raise ValueError(
                f"PartitionedNewton.step: step {self._step} evaluates the partitioned derivatives "
                "(every `period` steps) and needs their batch: step(closure, inputs, targets)."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        direction = self._propose(current_gradients(self.partition, "PartitionedNewton"), group)
        if self.normalize_direction:
            norms = self.partition.subset_dots(direction, direction).sqrt()
            # A vanishing u_s stays zero; its η_s then multiplies nothing.
            direction = self.partition.scale(
                direction, torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
            )
        if evaluate:
            self._evaluate(direction, inputs, targets, group)
        if self._eta is not None:
            rates = group["lr"] * self._eta
            for p, u, s in zip(self.partition.parameters, direction, self.partition.subset_of):
                p.sub_(rates[s].to(p.dtype) * u)
        self._step += 1
        return loss

    def _propose(self, grads: list[Tensor], group: dict[str, Any]) -> list[Tensor]:
        """The updater's step u (learning rate 1), advancing its state; nothing is applied."""
        params = self.partition.parameters
        if self.updater == "sgd":
            out = []
            for p, grad in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                out.append(state["momentum_buffer"])
            return out
        beta1, beta2 = group["betas"]
        t = self._step + 1
        out = []
        for p, grad in zip(params, grads):
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
            out.append(m / (1 - beta1**t) / denom)
        return out

    def _evaluate(self, direction: list[Tensor], inputs: Any, targets: Any, group: dict[str, Any]
                  ) -> None:
        """Derivatives along u on the batch, window average, and (after warm-up) the solve."""
        with torch.enable_grad():
            pd = partitioned_derivatives(
                self.model, self.loss_fn, inputs, targets, [u.detach() for u in direction],
                partition=self.partition, order=self.order, third="diag",
                chunk_size=self.chunk_size, method=self.method,
            )
        sample = {"g": pd.g, "H": pd.H}
        if self.order == 3:
            sample["D"] = pd.D
        sample = {k: v.detach().to(torch.float64) for k, v in sample.items()}
        mean, count = self._average.add(sample)
        self._evaluations += 1
        for name, value in mean.items():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"PartitionedNewton: the averaged {name} is not finite at step {self._step} "
                    f"({value.tolist()}); the loss or the direction has diverged."
                )
        warmup = self._evaluations <= self.warmup
        if warmup:
            success, case, message = False, "warmup", "warm-up: averages accumulate, no update."
        else:
            eta, case, message = self._solve(mean, group)
            success = eta is not None
            if eta is not None:
                self._eta = eta.clamp_min(0.0) if self.clip_negative else eta
            else:
                message = f"{message} The previous η is kept."
        self.history.append(PartitionedNewtonRecord(
            step=self._step, evaluation=self._evaluations,
            g=sample["g"], H=sample["H"], D=sample.get("D"),
            g_avg=mean["g"], H_avg=mean["H"], D_avg=mean.get("D"), count=count,
            warmup=warmup, eta=self.last_eta, lr=group["lr"], success=success, case=case,
            message=message,
        ))

    def _solve(self, mean: dict[str, Tensor], group: dict[str, Any]
               ) -> tuple[Tensor | None, str, str]:
        """(η or None on failure, case, message) from the averaged tensors."""
        H = mean["H"]
        if group["ridge"]:
            H = H + group["ridge"] * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        if self.order == 3:
            result = PartitionedDerivatives(g=mean["g"], H=H, D=mean["D"]).cubic_step_result(
                group["lambda_int"])
            return (result.eta if result.success else None), result.case, result.message
        try:
            eta = PartitionedDerivatives(g=mean["g"], H=H, D=None).learning_rates()
        except ValueError as error:  # H̄ singular: no Newton step this time
            return None, "failed", str(error)
        return eta.to(torch.float64), "newton", "Newton step on the partition: H̄ η = ḡ."

    # ---------------------------------------------------------------- plateau schedule
    def scheduler_step(self, epoch_loss: float | Tensor) -> bool:
        """Halve λ₁ on a loss plateau (the paper's ReduceDampingOnPlateau); call once per epoch.

        The loss improves when it falls below best·(1 − ``plateau_threshold``); after more than
        ``plateau_patience`` epochs in a row without improvement, ``lr`` ← ``plateau_factor``·lr
        and the count restarts (no cooldown).

        Returns:
            Whether λ₁ was reduced.

        Raises:
            ValueError: a non-finite or non-scalar loss.
        """
        if isinstance(epoch_loss, Tensor):
            if epoch_loss.numel() != 1:
                raise ValueError(
                    f"epoch_loss must be a scalar, got shape {tuple(epoch_loss.shape)}."
                )
            epoch_loss = float(epoch_loss.detach())
        loss = float(epoch_loss)
        if not math.isfinite(loss):
            raise ValueError(f"epoch_loss must be finite, got {epoch_loss!r}.")
        if loss < self._plateau_best * (1.0 - self.plateau_threshold):
            self._plateau_best, self._plateau_bad = loss, 0
            return False
        self._plateau_bad += 1
        if self._plateau_bad <= self.plateau_patience:
            return False
        self.param_groups[0]["lr"] *= self.plateau_factor
        self._plateau_bad = 0
        return True

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (updater buffers, λ₁ and the other group values) plus the step
        and evaluation counts, η, the window averages and the plateau counters."""
        state = super().state_dict()
        state["partitioned_newton"] = {
            "step": self._step,
            "evaluations": self._evaluations,
            "eta": self.last_eta,
            "average": self._average.state_dict(),
            "plateau_best": self._plateau_best,
            "plateau_bad": self._plateau_bad,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        state = dict(state_dict)
        if "partitioned_newton" not in state:
            raise ValueError(
                "PartitionedNewton.load_state_dict: state_dict lacks 'partitioned_newton' "
                "(was it saved by another optimizer?)."
            )
        extra = state.pop("partitioned_newton")
        eta = extra["eta"]
        size = len(self.partition)
        if eta is not None and (not isinstance(eta, Tensor) or eta.shape != (size,)):
            raise ValueError(
                f"PartitionedNewton.load_state_dict: eta must be None or a tensor of shape "
                f"({size},), got {eta!r}."
            )
        super().load_state_dict(state)
        device = self.partition.device
        self._step = check_int(extra["step"], "state['step']", 0)
        self._evaluations = check_int(extra["evaluations"], "state['evaluations']", 0)
        self._eta = None if eta is None else eta.to(device=device, dtype=torch.float64).clone()
        self._average.load_state_dict(extra["average"], device)
        self._plateau_best = float(extra["plateau_best"])
        self._plateau_bad = check_int(extra["plateau_bad"], "state['plateau_bad']", 0)


def _flat_parameters(params: Iterable[Tensor]) -> list[Tensor]:
    """``params`` as a non-empty list of distinct tensors that require grad (one group only)."""
    if isinstance(params, Tensor):
        raise ValueError("params must be an iterable of tensors, got a single tensor.")
    tensors = list(params)
    if not tensors:
        raise ValueError("params is empty: PartitionedNewton needs parameters to train.")
    for i, p in enumerate(tensors):
        if isinstance(p, dict):
            raise ValueError(
                "params must be one flat iterable of tensors: PartitionedNewton computes one "
                "learning rate per subset, so it takes no parameter groups (use `partition`)."
            )
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError(f"params[{i}] must be a tensor that requires grad, got {p!r}.")
    if len({id(p) for p in tensors}) != len(tensors):
        raise ValueError("params holds a tensor twice.")
    return tensors


def _partition_of(model: nn.Module, tensors: list[Tensor], partition: Partition | None
                  ) -> Partition:
    """The given partition (checked to hold exactly ``tensors``) or one subset per tensor."""
    names = {id(p): n for n, p in model.named_parameters()}
    if partition is None:
        missing = [i for i, p in enumerate(tensors) if id(p) not in names]
        if missing:
            raise ValueError(f"params{missing} are not parameters of the model.")
        named = [names[id(p)] for p in tensors]
        return Partition([[p] for p in tensors], named, named)
    if not isinstance(partition, Partition):
        raise ValueError(f"partition must be a curvlib.Partition, got {type(partition).__name__}.")
    if {id(p) for p in partition.parameters} != {id(p) for p in tensors}:
        raise ValueError("partition must hold exactly the tensors of params.")
    return partition
