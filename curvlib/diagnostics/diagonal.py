"""Diagonal curvature estimates: :class:`DiagGGN` and :class:`DiagHessian`.

Each is the :class:`~curvlib.CurvatureEstimate` C = Diag(d) with d the diagonal of the
generalized Gauss-Newton matrix (``DiagGGN``) or of the Hessian (``DiagHessian``) of the loss, in
the scale of the user's ``loss_fn``. Two ways to get d, chosen by ``method``:

* ``"backpack"`` — exact, through BackPACK's ``DiagGGNExact`` / ``DiagHessian`` extensions
  (Dangel, Kunstner & Hennig 2020, "BackPACK: packing more into backprop"). BackPACK is an optional
  dependency (``pip install curvlib[backpack]``), imported only when this path runs. It handles
  ``nn.Sequential`` models built from the layers in :data:`BACKPACK_MODULES`, with 2-D outputs
  and the losses of :mod:`curvlib.losses`. BackPACK's ``extend`` installs hooks and attributes on
  the modules it touches, so curvlib never extends the user's model: every ``update`` runs BackPACK
  on a deep copy of the model and the loss, made for that batch and dropped afterwards.
* ``"hutchinson"`` — unbiased and model-agnostic: with Rademacher probes z_k (E[z zᵀ] = I),

      d ≈ (1/m) Σ_{k=1}^{m} z_k ⊙ C z_k,

  whose entry i has variance (1/m) Σ_{j≠i} C_ij² (Bekas, Kokiopoulou & Saad 2007, "An estimator
  for the diagonal of a matrix", after Hutchinson 1989). The products C z_k are those of
  :class:`~curvlib.ExactGGN` / :class:`~curvlib.ExactHessian`, vmapped over probes.
* ``"auto"`` (default) — BackPACK when it is installed and supports the model and the batch,
  Hutchinson otherwise. ``method_used`` says which path ran and ``fallback_reason`` why BackPACK
  did not.

Batches are weighted as the loss reduces, like the exact estimates: with ``reduction="mean"``,
batch b of N_b examples contributes (N_b / Σ N) d_b, with ``"sum"`` it contributes d_b. The
statistics are kept as the sum Σ N_b d_b (or Σ d_b) and the count Σ N_b until read.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlib.diagnostics.operand import check_positive_int, check_seed, make_generator, rademacher
from curvlib.diagnostics.progress import progress_bar
from curvlib.estimate import CurvatureEstimate, check_damping
from curvlib.exact import ExactGGN, ExactHessian
from curvlib.exact.base import (
    ExactEstimate,
    as_args,
    batch_size,
    check_no_training_batchnorm,
    parameter_names,
)
from curvlib.losses import LossFunction, check_finite
from curvlib.partition import Partition, Vector

METHODS: tuple[str, ...] = ("auto", "backpack", "hutchinson")

BACKPACK_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.LogSigmoid, nn.Flatten, nn.MaxPool2d, nn.ZeroPad2d,
)
"""Layers the BackPACK path accepts inside (nested) ``nn.Sequential`` models: those both BackPACK
extensions support and that curvlib's tests check against autograd in float64."""


def backpack_model_problem(model: nn.Module) -> str | None:
    """Why BackPACK cannot give exact diagonals for ``model`` (``None``: it can).

    BackPACK backpropagates through module hooks only, so the forward pass must be a composition of
    known modules: any other module (a custom ``forward`` with functional operations, a skip
    connection) would be invisible to it. A module called twice would overwrite the inputs BackPACK
    stores on it, a parameter shared by two modules would get only one of their diagonals, and an
    in-place activation breaks its hooks.
    """
    seen: set[int] = set()
    owned: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        label = f"{name or type(model).__name__!r} ({type(module).__name__})"
        if isinstance(module, nn.Sequential):
            if id(module) in seen:
                return f"module {label} appears twice in the model"
            seen.add(id(module))
            continue
        if not isinstance(module, BACKPACK_MODULES):
            return f"module {label} is not one of the layers BackPACK supports here"
        if id(module) in seen:
            return f"module {label} appears twice in the model (weight sharing)"
        seen.add(id(module))
        if getattr(module, "inplace", False):
            return f"module {label} is in-place"
        if isinstance(getattr(module, "padding", None), str):
            return f"module {label} has string padding {module.padding!r}"
        for p in module.parameters(recurse=False):
            if id(p) in owned:
                return f"module {label} shares a parameter with another module (weight tying)"
            owned.add(id(p))
    return None


def backpack_batch_problem(loss: LossFunction, inputs: Any, outputs: Tensor,
                           targets: Tensor) -> str | None:
    """Why BackPACK cannot handle this batch (``None``: it can)."""
    if isinstance(inputs, tuple | list):
        return "the model takes several inputs"
    if loss.kind == "bce":
        if outputs.dim() != 2 or outputs.shape[1] != 1:
            return f"BCEWithLogitsLoss outputs have shape {tuple(outputs.shape)}, not [N, 1]"
    elif outputs.dim() != 2:
        return f"outputs have shape {tuple(outputs.shape)}, not [N, C]"
    if loss.term_mask(outputs, targets) is not None:
        return "targets contain ignore_index (BackPACK does not skip them)"
    return None


def import_backpack() -> Any:
    """The ``backpack`` package, or an ImportError saying how to install it."""
    try:
        return importlib.import_module("backpack")
    except ImportError as error:
        raise ImportError(
            "method='backpack' needs BackPACK: pip install backpack-for-pytorch "
            "(or pip install curvlib[backpack]); method='hutchinson' works without it."
        ) from error


class DiagonalEstimate(CurvatureEstimate):
    """Base of :class:`DiagGGN` and :class:`DiagHessian`: C = Diag(d), d accumulated over batches.

    Args:
        model: the model; BatchNorm layers must be in eval mode.
        loss_fn: ``loss_fn(outputs, targets)`` with ``reduction`` "mean" or "sum".
        partition: defaults to :meth:`Partition.by_tensor`.
        method: ``"auto"``, ``"backpack"`` or ``"hutchinson"`` (see the module docstring).
        num_samples: Rademacher probes per batch on the Hutchinson path.
        seed: seeds the probes (``None``: fresh randomness); the stream continues across batches.
        chunk_size: probes per vmapped product on the Hutchinson path.
        progress: show a progress bar over the probes (``None``: only on a terminal).

    Attributes:
        method_used: ``"backpack"`` or ``"hutchinson"``, the path that computes d.
        fallback_reason: why ``method="auto"`` did not use BackPACK (``None`` if it did).

    Raises:
        ValueError: an unknown ``method``, a non-positive ``num_samples``, a loss without
            "mean"/"sum" reduction, or ``method="backpack"`` on a model BackPACK cannot handle.
        ImportError: ``method="backpack"`` without BackPACK installed.
    """

    _backpack_extension: str
    """Name of the BackPACK extension class computing d."""
    _backpack_savefield: str
    """Attribute BackPACK writes d to on every parameter."""
    _exact_class: type[ExactEstimate]
    """The exact estimate whose products the Hutchinson path probes."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        partition: Partition | None = None,
        method: str = "auto",
        num_samples: int = 100,
        seed: int | None = 0,
        chunk_size: int = 256,
        progress: bool | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        self.model = model
        self.loss_fn = loss_fn
        self.partition = partition if partition is not None else Partition.by_tensor(model)
        self.method = method
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.progress = progress
        self._generator = make_generator(check_seed(seed))
        # the exact estimate validates loss_fn and the partition, and gives Hutchinson its products
        self._exact = self._exact_class(model, loss_fn, self.partition, self.chunk_size)
        self.reduction: str = self._exact.reduction
        self._names = parameter_names(model, self.partition)
        self._loss = self._backpack_loss(loss_fn)
        self.method_used, self.fallback_reason = self._choose_method()
        self._sums: Vector | None = None
        self._count = 0

    # ---------------------------------------------------------------- path
    @staticmethod
    def _backpack_loss(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> LossFunction | None:
        """The loss as BackPACK must know it (``None``: not one of the supported losses)."""
        if not isinstance(loss_fn, nn.Module):
            return None
        try:
            return LossFunction(loss_fn)
        except ValueError:
            return None

    def _choose_method(self) -> tuple[str, str | None]:
        if self.method == "hutchinson":
            return "hutchinson", None
        problem = backpack_model_problem(self.model)
        if problem is None and self._loss is None:
            problem = f"BackPACK does not support the loss {type(self.loss_fn).__name__}"
        if problem is None:
            try:
                import_backpack()
            except ImportError as error:
                if self.method == "backpack":
                    raise
                problem = str(error)
        if problem is None:
            return "backpack", None
        if self.method == "backpack":
            raise ValueError(f"method='backpack' is not possible: {problem}.")
        return "hutchinson", problem

    # ---------------------------------------------------------------- statistics
    def update(self, inputs: Any, targets: Any) -> None:
        """Add the diagonal of this batch's curvature, weighted as the loss reduces."""
        check_no_training_batchnorm(self.model)
        n = batch_size(inputs)
        if self.method_used == "backpack":
            assert self._loss is not None
            with torch.no_grad():
                outputs = self.model(*as_args(inputs))
            self._loss.check(outputs, targets)
            problem = backpack_batch_problem(self._loss, inputs, outputs, targets)
            if problem is not None:
                if self.method == "backpack" or self._count > 0:
                    # switching paths half-way would leave method_used describing only some batches
                    raise ValueError(f"BackPACK cannot handle this batch: {problem}.")
                self.method_used, self.fallback_reason = "hutchinson", problem
        if self.method_used == "backpack":
            diagonal = self._backpack_diagonal(inputs, targets)
        else:
            diagonal = self._hutchinson_diagonal(inputs, targets)
        for name, d in zip(self.partition.parameter_names, diagonal):
            check_finite(d, f"{type(self).__name__}: the diagonal of parameter {name!r}")
        weight = n if self.reduction == "mean" else 1
        accumulate = [torch.promote_types(p.dtype, torch.float32) for p in diagonal]
        scaled = [weight * d.detach().to(dtype) for d, dtype in zip(diagonal, accumulate)]
        self._sums = scaled if self._sums is None else [s + d for s, d in zip(self._sums, scaled)]
        self._count += n

    def _backpack_diagonal(self, inputs: Tensor, targets: Tensor) -> Vector:
        backpack = import_backpack()
        extension = getattr(importlib.import_module("backpack.extensions"),
                            self._backpack_extension)
        # BackPACK extends modules in place: work on throw-away copies, never the user's model
        model = backpack.extend(copy.deepcopy(self.model))
        loss_fn = backpack.extend(copy.deepcopy(self.loss_fn))
        params = dict(model.named_parameters())
        wanted = [params[name] for name in self._names]
        with torch.enable_grad(), warnings.catch_warnings():
            # the inputs need no gradient, so torch warns that BackPACK's full backward hooks
            # fire on the module outputs: exactly what BackPACK uses them for
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            loss = loss_fn(model(inputs), targets)
            check_finite(loss, "The loss of this batch")
            with backpack.backpack(extension()):
                loss.backward()
        return [getattr(p, self._backpack_savefield).detach() for p in wanted]

    def _hutchinson_diagonal(self, inputs: Any, targets: Any) -> Vector:
        exact, part = self._exact, self.partition
        exact.clear()
        exact.update(inputs, targets)
        sums = [torch.zeros_like(p) for p in part.parameters]
        bar = progress_bar(self.num_samples, f"{type(self).__name__} probes", self.progress)
        done = 0
        with bar:
            while done < self.num_samples:
                count = min(self.chunk_size, self.num_samples - done)
                probes = rademacher(part.numel, count, self._generator, part.dtype, part.device)
                batched = part.unflatten_batched(probes.T.contiguous())
                products = exact.matmat(batched)
                sums = [s + (z * c.detach()).sum(0) for s, z, c in zip(sums, batched, products)]
                done += count
                bar.update(count)
        exact.clear()
        return [s / self.num_samples for s in sums]

    @property
    def num_data(self) -> int:
        """Σ N_b, the number of examples seen."""
        return self._count

    def diagonal(self) -> Vector:
        """d = Σ_b w_b d_b, as a parameter-aligned vector in the parameters' dtypes."""
        if self._sums is None:
            raise ValueError(f"{type(self).__name__} has no data: call update() first.")
        total = self._count if self.reduction == "mean" else 1
        return [(s / total).to(p.dtype) for s, p in zip(self._sums, self.partition.parameters)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": None if self._sums is None else [s.clone() for s in self._sums],
            "count": self._count,
            "reduction": self.reduction,
            "method_used": self.method_used,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("reduction") != self.reduction:
            raise ValueError(
                f"state_dict was saved with reduction={state.get('reduction')!r}, "
                f"this estimate uses {self.reduction!r}."
            )
        sums = state["sums"]
        if sums is not None:
            self.partition.check_vector(sums, "state_dict['sums']")
            sums = [s.clone() for s in sums]
        self._sums = sums
        self._count = int(state["count"])
        self.method_used = state["method_used"]

    # ---------------------------------------------------------------- products
    def matvec(self, v: Sequence[Tensor]) -> Vector:
        """d ⊙ v."""
        v = self.partition.check_vector(v, "v")
        return [d * x for d, x in zip(self.diagonal(), v)]

    def matmat(self, vectors: Sequence[Tensor]) -> Vector:
        self.partition.check_batched_vector(vectors)
        return [d.unsqueeze(0) * x for d, x in zip(self.diagonal(), vectors)]

    def to_dense(self) -> Tensor:
        return torch.diag(torch.cat([d.reshape(-1) for d in self.diagonal()]))

    def trace(self) -> Tensor:
        return torch.cat([d.reshape(-1) for d in self.diagonal()]).sum()

    def reduced(self, u: Sequence[Tensor]) -> Tensor:
        """Diag(Σ_{i∈s} d_i u_i²): a diagonal C has no coupling between subsets."""
        part = self.partition
        u = part.check_vector(u, "u")
        return torch.diag(part.subset_dots(u, self.matvec(u)))

    def solve(self, v: Sequence[Tensor], damping: float = 0.0) -> Vector:
        """(Diag(d) + damping·I)⁻¹ v, entry by entry.

        Raises:
            ValueError: negative damping, or an entry of d + damping that is zero to working
                precision (the tensor holding it is named).
        """
        v = self.partition.check_vector(v, "v")
        check_damping(damping)
        diagonal = self.diagonal()
        scale = max(max(float(d.abs().max()) for d in diagonal), float(damping), 1e-300)
        tol = self.partition.numel * torch.finfo(diagonal[0].dtype).eps * scale
        out = []
        for name, d, x in zip(self.partition.parameter_names, diagonal, v):
            shifted = d + damping
            if bool((shifted.abs() <= tol).any()):
                raise ValueError(
                    f"{type(self).__name__}.solve: diagonal + damping={damping} is zero for "
                    f"parameter {name!r}; use a positive damping."
                )
            out.append(x / shifted)
        return out


class DiagGGN(DiagonalEstimate):
    """The diagonal of the generalized Gauss-Newton matrix (type-2 Fisher), diag(Jᵀ H_f J).

    ``loss_fn`` must be ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``. See
    :class:`DiagonalEstimate` for the arguments and the module docstring for the two paths.
    """

    _backpack_extension = "DiagGGNExact"
    _backpack_savefield = "diag_ggn_exact"
    _exact_class = ExactGGN


class DiagHessian(DiagonalEstimate):
    """The diagonal of the Hessian of the loss, diag(∇²L).

    The Hutchinson path accepts any differentiable scalar ``loss_fn`` with a ``reduction`` of
    "mean" or "sum"; the BackPACK path the losses of :mod:`curvlib.losses`. See
    :class:`DiagonalEstimate` for the arguments.
    """

    _backpack_extension = "DiagHessian"
    _backpack_savefield = "diag_h"
    _exact_class = ExactHessian
