"""The machinery shared by K-FAC, EKFAC, TKFAC and TEKFAC: :class:`KroneckerEstimate`.

Each covered layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``) gets one block of a
block-diagonal estimate. A method supplies its running statistics (:mod:`curvlib.kron.statistics`),
which define two Kronecker factors and a divisor; :meth:`KroneckerEstimate.refresh`
eigendecomposes the factors, and every read then applies the block in its eigenbasis, on the
[W | b] matrix V of the layer (kfac_family.md §1.4, §2.1 step 4):

    C V = U_out [ (U_outᵀ V U_in) ∘ D ] U_inᵀ,
    (C + λI)⁻¹ V = U_out [ (U_outᵀ V U_in) ⊘ (D + λ) ] U_inᵀ,

with D = s_out s_inᵀ / divisor for K-FAC and TKFAC (the Kronecker eigenvalues) and D the diagonal
re-fitted in the eigenbasis for EKFAC and TEKFAC (:mod:`curvlib.kron.eigen`). No Kronecker
product is ever materialised except by :meth:`to_dense`.

**Protocol.** Standalone: ``update(inputs, targets)`` runs one hooked forward and the backward
the Fisher type needs. Training (one step; the optimizer consumes exactly this)::

    with estimate.record(targets):      # module hooks + a forward hook on the model
        outputs = model(inputs)         # exactly one forward of the estimate's model
    # on exit, "type2"/"mc": the extra batched backward runs now (retain_graph, .grad untouched)
    loss_fn(outputs, targets).backward()   # "empirical": output gradients caught by tensor hooks
    estimate.flush()                    # folds a pending "empirical" step; every read calls it
    estimate.refresh()                  # eigendecompositions (+ EKFAC/TEKFAC diagonal reset)

``auto_refresh`` (default True) makes every read refresh when the statistics changed since the
last refresh; optimizers set it to False and call :meth:`refresh` on their own schedule.

**EKFAC/TEKFAC diagonals** (George et al. 2018, Alg. 1; pitfall P9). The diagonal is a running
statistic of its own, kept *in the current basis*: every statistics step adds
c Σ_{n,k} (U_outᵀ U_{n,k} U_in)^{∘2} of its batch (from per-example gradients); :meth:`refresh`
resets it with the new basis — it is never carried across bases — and refits it:

* from every batch given to :meth:`update` since the parameters last changed, replayed in order
  (a second forward/backward per batch, MC vectors redrawn from the batch's stored seed, the
  latest batch served from memory), so that after ``update()`` over a dataset the diagonal is fit
  in the final basis from exactly the data of the factors and the identities of kfac_family.md §4
  hold (D = diag(Qᵀ F Q), trace preserved, Frobenius optimality); this keeps the batches (inputs
  and targets) alive and assumes a deterministic forward (e.g. ``model.eval()``);
* otherwise (training with :meth:`record`) from the latest step alone, as Algorithm 1 computes the
  scalings of the current mini-batch in a freshly computed basis.

Until the first statistics step after a refresh has data the diagonal reads as the Kronecker
eigenvalues (the reset value), i.e. the estimate equals K-FAC/TKFAC.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvlib.capture import LayerCall, LayerCapture, supported_layers
from curvlib.estimate import CurvatureEstimate, check_damping
from curvlib.exact.base import as_args, check_no_training_batchnorm
from curvlib.kron.collect import (
    TYPE2_COLUMNS,
    GradChunk,
    InputRows,
    LayerInputs,
    StepData,
    Type2Columns,
    backprop_vectors,
    input_rows,
    step_data,
)
from curvlib.kron.eigen import decomposed_from_rows, eigenbasis_squares, eigh_psd, pad_columns
from curvlib.kron.layout import LayerLayout
from curvlib.kron.statistics import CurvatureWeights, FactorRows, FactorStatistics, RunningSum
from curvlib.losses import FisherType, LossFunction, check_finite, check_fisher_type
from curvlib.partition import Partition, Vector

WeightSharing = Literal["expand", "reduce"]
DampingMode = Literal["tikhonov", "pi", "symmetric", "trace"]


@dataclass
class Eigenbasis:
    """The eigendecompositions of one layer's factors at the last refresh."""

    basis_in: Tensor
    values_in: Tensor
    basis_out: Tensor
    values_out: Tensor
    divisor: Tensor

    def safe_divisor(self) -> Tensor:
        """The divisor, with 1 in place of 0 (a zero TKFAC δ means a zero block and factors)."""
        return torch.where(self.divisor > 0, self.divisor, torch.ones_like(self.divisor))

    def kronecker_diagonal(self) -> Tensor:
        """s_out s_inᵀ / divisor: the block's eigenvalues as a Kronecker product (d_out × d_in')."""
        return torch.outer(self.values_out, self.values_in) / self.safe_divisor()

    def rotate(self, matrices: Tensor) -> Tensor:
        """U_outᵀ V U_in for V of shape [K, d_out, d_in']."""
        return self.basis_out.T @ matrices @ self.basis_in

    def unrotate(self, matrices: Tensor) -> Tensor:
        """U_out V U_inᵀ."""
        return self.basis_out @ matrices @ self.basis_in.T


@dataclass
class _Replay:
    """A batch given to update(), kept to refit the diagonal in a new basis."""

    inputs: Any
    targets: Any
    seed: int
    step: int


@dataclass
class _Squares:
    """A step's EKFAC/TEKFAC squares per layer (leading blocks of the padded ``buffers``), to be
    added with count ``weight``."""

    numerators: dict[str, Tensor]
    buffers: dict[str, Tensor]
    weight: float


@dataclass
class _PendingEmpirical:
    """A recorded empirical step waiting for the training backward."""

    calls: dict[str, list[LayerCall]]
    outputs: Tensor
    targets: Tensor
    step: int
    handles: list[RemovableHandle] = field(default_factory=list)


def _clone_chunk(chunk: GradChunk) -> GradChunk:
    return {layer: grads.clone() for layer, grads in chunk.items()}


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple | list):
        return type(value)(_detach(v) for v in value)
    return value


class KroneckerEstimate(CurvatureEstimate):
    """Block-diagonal Kronecker-factored curvature over the supported layers of a model.

    Args:
        model: the model; every module that owns trainable parameters must be an ``nn.Linear``,
            ``nn.Conv1d`` or ``nn.Conv2d`` (groups = 1, zero padding) unless ``include`` is given.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``, reduction
            ``"mean"`` or ``"sum"``; the estimate is in the scale of this loss.
        fisher: ``"type2"`` (exact loss-Hessian square roots: the GGN), ``"mc"`` (``mc_samples``
            targets drawn from the model) or ``"empirical"`` (gradients at the true targets).
        mc_samples: samples per example for ``fisher="mc"``.
        weight_sharing: ``"expand"`` or ``"reduce"`` (Eschenhagen et al. 2023) for layers with
            shared positions (sequences, convolutions); identical without sharing.
        ema_decay: None for the exact average over all statistics steps (batch-size weighted),
            else the decay β ∈ [0, 1) of an exponential moving average.
        include: the modules to cover (default: every module with trainable parameters, all of
            which must then be supported).
        dtype: the dtype of the statistics (default: float32, or float64 for a float64 model);
            at least float32.
        seed: seed of the MC target draws (default: drawn from torch's global generator).
        type2_columns: for ``fisher="type2"`` with several loss terms per example,
            ``"joint"`` (default) backpropagates the C loss-Hessian square-root columns of all
            terms at once (exact when positions do not mix, the K-FAC-expand approximation
            otherwise); ``"per_term"`` splits them per term (R·C vectors, the exact GGN
            factors, R× the cost). See :mod:`curvlib.kron.collect`.
        process_group: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``) whose
            ranks each see a shard of every batch: each statistics step sums the shards'
            statistics over the group (two all-reduces) before folding them, so every rank holds
            the estimate of the whole batch, and MC targets are drawn from rank-specific seeds.
            Every rank must then make the same calls (``update``/``record``/``refresh``) in the
            same order. None (default): this process only.

    Attributes:
        partition: :meth:`Partition.by_module` over the covered modules.
        modules: the covered modules by name (the partition's subset names).
        auto_refresh: reads refresh the eigendecompositions when the statistics changed since the
            last :meth:`refresh`.
    """

    damping_modes: ClassVar[tuple[str, ...]] = ("tikhonov",)
    refits_diagonal: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher: FisherType = "mc",
        mc_samples: int = 1,
        weight_sharing: WeightSharing = "expand",
        ema_decay: float | None = None,
        *,
        include: Sequence[nn.Module] | None = None,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
        type2_columns: Type2Columns = "joint",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        name = type(self).__name__
        if process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"{name}: process_group was given but torch.distributed is not initialized."
            )
        check_fisher_type(fisher)
        if type2_columns not in TYPE2_COLUMNS:
            raise ValueError(
                f"{name}: type2_columns must be one of {TYPE2_COLUMNS}, got {type2_columns!r}."
            )
        if weight_sharing not in ("expand", "reduce"):
            raise ValueError(
                f"{name}: weight_sharing must be 'expand' or 'reduce', got {weight_sharing!r}."
            )
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"{name}: mc_samples must be an integer ≥ 1, got {mc_samples!r}.")
        if fisher != "mc" and mc_samples != 1:
            raise ValueError(f"{name}: mc_samples={mc_samples} only applies to fisher='mc'.")
        if ema_decay is not None and not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"{name}: ema_decay must be None or in [0, 1), got {ema_decay!r}.")
        self.model = model
        self.loss = LossFunction(loss_fn)
        self.fisher: FisherType = fisher
        self.mc_samples = mc_samples
        self.type2_columns: Type2Columns = type2_columns
        self.weight_sharing: WeightSharing = weight_sharing
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.modules: dict[str, nn.Module] = supported_layers(model, include)
        self.partition = Partition.by_module(model, self.modules.values())
        self.layouts: dict[str, LayerLayout] = {}
        for (layer, module), subset, group in zip(
            self.modules.items(), self.partition.names, self.partition.groups
        ):
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if subset != layer or len(own) != len(group):
                raise ValueError(
                    f"Module {layer!r} shares a parameter with another module; Kronecker "
                    "estimates need every covered layer to own its weight and bias."
                )
            self.layouts[layer] = LayerLayout(layer, module, group)
        self.dtype = torch.promote_types(self.partition.dtype, torch.float32)
        if dtype is not None:
            if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
                raise ValueError(f"{name}: statistics need float32 or better, got dtype={dtype}.")
            self.dtype = dtype
        self.auto_refresh = True
        self._weights = CurvatureWeights(self.loss.reduction, self.ema_decay)
        self._stats: dict[str, FactorStatistics] = {
            layer: self._new_statistics(self._weights) for layer in self.layouts
        }
        self._bases: dict[str, Eigenbasis] = {}
        # The layers whose input rows were the same in the last statistics step (input_rows), in
        # model order: refresh() decomposes their equal input factors once.
        self._input_groups: list[list[str]] = [[layer] for layer in self.layouts]
        # Rows folded into each layer's (input, output) factor: bounds on their ranks, which let
        # refresh() decompose a factor from its range alone (curvlib.kron.eigen).
        self._rank_bounds: dict[str, tuple[int, int]] | None = {layer: (0, 0) for layer in
                                                                  self.layouts}
        self._diagonals: dict[str, RunningSum] = {}
        self._version = 0
        self._refreshed_version = -1
        self._seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.process_group = process_group
        self._rank = 0 if process_group is None else dist.get_rank(process_group)
        self._steps = 0
        self._pending: _PendingEmpirical | None = None
        self._replay: list[_Replay] = []
        self._replay_fingerprint: tuple[tuple[int, int, int], ...] = ()
        self._last: StepData | None = None
        self._last_step = -1
        # While the factors hold the first statistics step alone: per layer, its recorded inputs
        # and the rows of its factors where refresh() decomposes those instead (FactorRows).
        self._sole: dict[str, tuple[LayerInputs, FactorRows]] | None = None
        # Eigenbasis → its bases with zero columns up to a fast width (eigen.pad_columns), made
        # once per refresh instead of once per diagonal fold.
        self._padded: dict[str, tuple[Eigenbasis, Tensor, Tensor]] = {}
        # Per layer, the padded buffer of a fold's squares that the diagonal did not keep,
        # reused by the next fold (eigen.eigenbasis_squares, ``out``).
        self._spare_squares: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ method hooks
    @staticmethod
    @abstractmethod
    def _new_statistics(weights: CurvatureWeights) -> FactorStatistics:
        """The running statistics of one layer (each method supplies its own)."""

    @abstractmethod
    def _factor_names(self) -> tuple[str, str]:
        """Names of the (input, output) factors in :meth:`factors`."""

    def _damped_diagonals(self, damping: float, mode: str) -> dict[str, Tensor]:
        """Per layer, the eigenbasis diagonal of the damped block that :meth:`solve` inverts.

        ``"tikhonov"`` (every method): D + λ, the exact (C + λI)⁻¹ in the eigenbasis.
        """
        return {layer: self._diagonal(layer) + damping for layer in self.layouts}

    # ------------------------------------------------------------------ repr
    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={list(self.layouts)}, fisher={self.fisher!r}, "
            f"weight_sharing={self.weight_sharing!r}, ema_decay={self.ema_decay})"
        )

    # ------------------------------------------------------------------ statistics steps
    def update(self, inputs: Any, targets: Any) -> None:
        """Accumulate the statistics of one batch (one hooked forward and the needed backward).

        ``.grad`` of the parameters is not touched, and the forward's graph is freed by that
        backward (use :meth:`record` to backpropagate a training loss through the same
        forward). EKFAC/TEKFAC keep the batch (detached) to refit their diagonal at the next
        refresh, as long as the parameters do not change.
        """
        self.flush()
        self._drop_kept_step()
        seed = self._next_seed()
        with torch.enable_grad():
            step = self._forward_step(inputs, targets, seed)
        self._fold(step)
        if self.refits_diagonal:
            fingerprint = self._fingerprint()
            if fingerprint != self._replay_fingerprint:
                self._replay = []  # the kept batches belong to other parameter values
            self._replay.append(_Replay(_detach(inputs), _detach(targets), seed, self._steps))
            self._replay_fingerprint = fingerprint

    @contextmanager
    def record(self, targets: Tensor | None) -> Iterator[None]:
        """Hooks on for one training step: the caller runs exactly one forward of the model inside.

        On exit the model output is known: for ``"type2"``/``"mc"`` the extra batched backward
        from it runs at once (``retain_graph=True``, ``.grad`` untouched) and the step is folded
        in; for ``"empirical"`` tensor hooks wait for the caller's ``loss.backward()`` and
        :meth:`flush` folds the step. ``targets`` may be None except for ``"empirical"``.
        """
        self.flush()
        self._check_model()
        self._drop_kept_step()
        outputs: list[Any] = []

        def catch(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            outputs.append(output)

        handle = self.model.register_forward_hook(catch)
        try:
            with LayerCapture(self.modules) as capture:
                yield
        finally:
            handle.remove()
        if len(outputs) != 1:
            raise ValueError(
                f"{type(self).__name__}.record(): the model ran {len(outputs)} forward passes "
                "inside the block; run exactly one."
            )
        output = self._check_outputs(outputs[0], targets)
        seed = self._next_seed()
        self._replay = []  # training steps refit the diagonal from the latest step only
        if self.fisher == "empirical":
            if targets is None:
                raise ValueError("fisher='empirical' needs the true targets in record(targets).")
            pending = _PendingEmpirical(
                {name: list(calls) for name, calls in capture.calls.items()},
                output.detach(), _detach(targets), self._steps,
            )
            for _, call in capture.outputs():
                def store(grad: Tensor, call: LayerCall = call) -> None:
                    call.grad_output = grad.detach()

                pending.handles.append(call.output.register_hook(store))
            self._pending = pending
        else:
            self._fold(self._backward_step(capture, output, targets, seed))

    def flush(self) -> None:
        """Fold a recorded ``"empirical"`` step, once its training backward has run.

        Raises:
            ValueError: the backward has not reached a covered layer's output yet.
        """
        pending = self._pending
        if pending is None:
            return
        for name, calls in pending.calls.items():
            if any(call.grad_output is None for call in calls):
                raise ValueError(
                    f"{type(self).__name__}.flush(): no gradient reached module {name!r}; run "
                    "the training loss.backward() between record() and flush() (or any read)."
                )
        for handle in pending.handles:
            handle.remove()
        self._pending = None
        c = self.loss.reduction_factor(pending.outputs, pending.targets)
        # The training backward differentiated the reduced loss c·Σℓ: divide c out (§1.5).
        grads = {
            name: [call.grad_output.unsqueeze(0) / c for call in calls]
            for name, calls in pending.calls.items()
        }
        self._fold(step_data(self.layouts, pending.calls, [grads], c,
                             pending.outputs.shape[0], self.dtype), pending.step)

    def refresh(self) -> None:
        """Eigendecompose every layer's factors; EKFAC/TEKFAC reset and refit their diagonal."""
        self.flush()
        for layer, stats in self._stats.items():
            if stats.empty:
                raise ValueError(
                    f"{type(self).__name__} has no statistics for module {layer!r}: call "
                    "update() or record() first."
                )
        if self.refits_diagonal and self._last is not None:
            for kept in self._last.inputs.values():  # the refit reads them: fail before changing
                kept.check_unmodified()
        names = self._factor_names()
        bounds = self._rank_bounds or {}
        bases: dict[str, Eigenbasis] = {}
        for group in self._input_groups:
            # The group's first input factor and its decomposition, for the layers whose input
            # factor is equal to it (bit for bit: the same rows' Gram, input_gram) to share.
            first: tuple[Tensor, int | None, tuple[Tensor, Tensor]] | None = None
            for layer in group:
                fac_in, fac_out, divisor = self._stats[layer].factors()
                rank_in, rank_out = bounds.get(layer, (None, None))
                rows = self._factor_rows(layer)
                if first is not None and first[1] == rank_in and torch.equal(first[0], fac_in):
                    values_in, basis_in = first[2]
                else:
                    values_in, basis_in = eigh_psd(
                        fac_in, f"factor {names[0]} of module {layer!r}", rank_in, rows.input)
                    first = first or (fac_in, rank_in, (values_in, basis_in))
                values_out, basis_out = eigh_psd(
                    fac_out, f"factor {names[1]} of module {layer!r}", rank_out, rows.output)
                bases[layer] = Eigenbasis(basis_in, values_in, basis_out, values_out, divisor)
        self._bases = {layer: bases[layer] for layer in self._stats}
        self._refreshed_version = self._version
        if self.refits_diagonal:
            self._diagonals = {layer: self._weights.running() for layer in self.layouts}
            self._refit_diagonal()

    # ------------------------------------------------------------------ internals: steps
    def _drop_kept_step(self) -> None:
        """Release the kept step (the refit's ``_last``, the first step's rows in ``_sole``)
        before the next step's forward, so that two steps' activations and gradients are never
        held at once. Both are caches: should the new step fail, the refit recomputes the step
        from its replay entry and refresh() decomposes the factors themselves."""
        self._last = None
        self._sole = None

    def _next_seed(self) -> int:
        self._steps += 1
        # Ranks draw independent MC targets for their shards.
        return (self._seed + self._steps * 0x9E3779B97F4A7C15 + self._rank * 0xD1B54A32D192ED03
                ) % (2**63)

    def _fingerprint(self) -> tuple[tuple[int, int, int], ...]:
        """Identity, storage and in-place version of every parameter: changes when they do."""
        return tuple((id(p), p.data_ptr(), p._version) for p in self.model.parameters())

    def _check_model(self) -> None:
        if self.refits_diagonal:
            # Per-example gradients are assumed; training-mode BatchNorm couples the examples.
            check_no_training_batchnorm(self.model)

    def _check_outputs(self, outputs: Any, targets: Any) -> Tensor:
        name = type(self).__name__
        if not isinstance(outputs, Tensor):
            raise ValueError(f"{name}: the model must return a tensor, got {type(outputs)}.")
        if not outputs.requires_grad:
            raise ValueError(
                f"{name}: the model output does not require grad (was the forward run under "
                "torch.no_grad()?); the statistics need a graph."
            )
        self.loss.check(outputs, targets)
        check_finite(outputs.detach(), f"{name}: the model output")
        return outputs

    def _forward_step(self, inputs: Any, targets: Any, seed: int) -> StepData:
        self._check_model()
        with LayerCapture(self.modules) as capture:
            outputs = self.model(*as_args(inputs))
        outputs = self._check_outputs(outputs, targets)
        return self._backward_step(capture, outputs, targets, seed, keep_graph=False)

    def _backward_step(
        self, capture: LayerCapture, outputs: Tensor, targets: Any, seed: int,
        keep_graph: bool = True,
    ) -> StepData:
        """The step's gradients backpropagated from ``outputs``; ``keep_graph``: the graph
        outlives them (record(): the training backward follows)."""
        generator = torch.Generator(device=outputs.device)
        generator.manual_seed(seed)
        vectors = backprop_vectors(
            self.loss, self.fisher, outputs.detach(), targets, self.mc_samples, generator,
            self.type2_columns,
        )
        c = self.loss.reduction_factor(outputs.detach(), targets)
        if self.refits_diagonal:
            # The step is kept for the diagonal refit, all K vectors' gradients in one chunk.
            grads: Iterable[dict[str, list[Tensor]]] = [
                capture.grad_outputs(outputs, vectors, keep_graph=keep_graph)]
        else:
            # Folded one backward pass at a time: one vector's gradients in memory, not K. One
            # vector is one pass either way: its step is read as a whole, which lets the fold
            # write it in place (_in_place_layers).
            grads = capture.grad_output_chunks(outputs, vectors, keep_graph=keep_graph)
        return step_data(self.layouts, capture.calls, grads, c, outputs.shape[0], self.dtype,
                         stream=not self.refits_diagonal and vectors.shape[0] > 1)

    def _grad_rows(self, grads: Tensor) -> Tensor:
        """g rows [K, *R, d_out] of g [K, N, T, d_out] with the M rows of the step's
        :class:`InputRows` over the axes R: g itself (expand; a convolution's gradient, stored
        per example with the positions innermost, has no [K, N·T, d_out] view), or the sum over
        positions (reduce)."""
        return grads if self.weight_sharing == "expand" else grads.sum(dim=2)

    def _fold(self, step: StepData, step_id: int | None = None) -> None:
        # Every layer's batch statistics (and EKFAC/TEKFAC squares) are checked before any is
        # added, so that a non-finite input or gradient row leaves every running statistic
        # untouched: those written in place from bounds checked first, the others through the
        # traces of their numerators (and the sums of their squares), which are added last.
        reduce = self.weight_sharing == "reduce"
        inputs = input_rows(step.inputs, reduce)
        groups: dict[int, list[str]] = {}
        for layer, rows in inputs.items():
            groups.setdefault(id(rows), []).append(layer)
        self._input_groups = list(groups.values())
        in_place = self._in_place_layers(step)
        others = {layer: stats for layer, stats in self._stats.items() if layer not in in_place}
        for layer, stats in others.items():
            stats.start(inputs[layer].num_rows, step.num_examples, step.scale)
        terms: dict[str, dict[str, Tensor]] = {}
        grad_rows = dict.fromkeys(self._stats, 0)  # K·M
        first = (self._rank_bounds is not None and self.process_group is None
                 and not any(any(b) for b in self._rank_bounds.values()))
        # The first step's gradient rows, per layer while few enough to decompose (see _sole).
        few: dict[str, list[Tensor]] = {layer: [] for layer in self._stats} if first else {}
        # A step that is not kept (only EKFAC/TEKFAC keep theirs) drops each layer's gradients
        # once folded, as a streamed one does.
        drop = isinstance(step.grads, list) and not self.refits_diagonal
        for chunk in step.grads if others else ():
            for layer, stats in others.items():
                grads = self._grad_rows(chunk.pop(layer) if drop else chunk[layer])
                terms[layer] = stats.output_terms(inputs[layer], grads, terms.get(layer))
                grad_rows[layer] += math.prod(grads.shape[:-1])
                if layer in few and decomposed_from_rows(grad_rows[layer],
                                                         self.layouts[layer].d_out):
                    few[layer].append(grads)
                else:
                    few.pop(layer, None)
            del chunk, grads  # a streamed step's next backward pass runs without them
        sole = None
        if first:  # before batch(), which may overwrite the terms
            sole = {layer: (step.inputs[layer], self._first_step_rows(
                        layer, inputs[layer], terms[layer], few.get(layer)))
                    for layer in self._stats}
        batches = {layer: stats.batch(inputs[layer], terms[layer])
                   for layer, stats in others.items()}
        rows = {layer: (inputs[layer].num_rows, grad_rows[layer]) for layer in others}
        if self.process_group is not None:
            batches, rows = self._reduce_statistics(batches, rows, step.num_examples)
        squares = self._diagonal_batch(step) if self.refits_diagonal and self._bases else None
        for layer in self._stats:
            # Every statistic is a sum of squares on its diagonal: a finite trace means finite
            # rows (one scalar check instead of a pass over the rows); the squares are all such.
            traces = [n if n.dim() == 0 else n.diagonal().sum()
                      for n, _ in batches.get(layer, {}).values()]
            if squares is not None and layer not in in_place:  # in place: bounded before
                traces.append(squares.numerators[layer].sum())
            if traces:
                check_finite(torch.stack(traces), f"The statistics of module {layer!r} (from "
                             "its inputs and backpropagated gradients)")
        for layer in in_place:
            stats = self._stats[layer]
            stats.start(inputs[layer].num_rows, step.num_examples, step.scale, in_place=True)
            for chunk in step.grads:  # a list: in-place steps are not streamed
                grads = self._grad_rows(chunk[layer])
                terms[layer] = stats.output_terms(inputs[layer], grads, terms.get(layer))
                grad_rows[layer] += math.prod(grads.shape[:-1])
            batches[layer] = stats.batch(inputs[layer], terms[layer])
            rows[layer] = (inputs[layer].num_rows, grad_rows[layer])
        for layer, stats in self._stats.items():
            stats.fold(batches[layer])
        if squares is not None:
            self._add_diagonal(squares)
        if self._rank_bounds is not None:
            self._rank_bounds = {
                layer: (r_in + rows[layer][0], r_out + rows[layer][1])
                for layer, (r_in, r_out) in self._rank_bounds.items()
            }
        self._sole = sole
        self._version += 1
        if self.refits_diagonal:
            self._last = step
            self._last_step = self._steps if step_id is None else step_id

    def _in_place_layers(self, step: StepData) -> set[str]:
        """The layers whose statistics this step writes straight into their running sums
        (:meth:`FactorStatistics.start` with ``in_place``), their bounds checked.

        Written into spare matrices instead, a batch's numerators are checked through their
        traces and then added: one more pass over each d × d matrix, and one more of each kept
        (W1's K-FAC: 6.6 MiB). In place, a non-finite batch could not be taken back out, so it is
        checked before anything is written. Each numerator is a Gram of rows, whose entries its
        trace bounds, and the traces are at most

            t_in = k Σ‖x‖² + N·T   (input rows ā: a convolution's input entry lies in at most k
                                    of its k-offset patches; N·T homogeneous 1s),
            t_out = T_r Σ‖g‖²       (T_r = T under reduce, whose rows sum T positions, else 1),

        c w_b t_out for G, or c w_b t_in t_out for TKFAC's Φ_raw, Ψ_raw and δ
        (:attr:`FactorStatistics.crosses_sides`) and for the EKFAC/TEKFAC squares, whose sum is
        c w_b Σ_{n,k} ‖Σ_t g_{n,t,k} ā_{n,t}ᵀ‖²_F; finite bounds in the statistics' dtype make
        every product finite, scaled or not (the products scale their sums). The bounds read each
        recorded input and gradient once, so a layer is written in place only where its factors
        are much larger than that (:meth:`_in_place_pays`: W2's linear head, not W1's layers,
        W2's convolutions or W3's). Only with running statistics to add to, in one process (the
        all-reduce needs the numerators apart) and with the step's gradients at hand (a
        streamed type-2 step's are read one backward pass at a time).
        """
        if self.process_group is not None or not isinstance(step.grads, list):
            return set()
        chosen = [layer for layer, stats in self._stats.items()
                  if not stats.empty and self._in_place_pays(layer, step)]
        if not chosen:
            return set()
        norms = []
        for layer in chosen:
            kept = step.inputs[layer].inputs if self.layouts[layer].has_weight else []
            norms.append(sum((torch.linalg.vector_norm(x, dtype=self.dtype).square() for x in kept),
                             torch.zeros((), dtype=self.dtype, device=step.inputs[layer].device)))
            norms.append(sum(torch.linalg.vector_norm(chunk[layer], dtype=self.dtype).square()
                             for chunk in step.grads))
        squared = torch.stack(norms).tolist()
        largest = torch.finfo(self.dtype).max
        scale = max(1.0, step.scale * self._weights.weight(step.num_examples))
        for i, layer in enumerate(chosen):
            layout, (n, t, _) = self.layouts[layer], step.inputs[layer].shape
            t_in = math.prod(layout.module.weight.shape[2:]) * squared[2 * i] + (
                n * t if layout.has_bias else 0)
            t_out = (t if self.weight_sharing == "reduce" else 1) * squared[2 * i + 1]
            crosses = self._stats[layer].crosses_sides or self.refits_diagonal
            crossed = t_in * t_out if crosses else 0.0
            bounds = [t_in, scale * t_out, scale * crossed]
            if not all(math.isfinite(b) and b <= largest for b in bounds):
                raise ValueError(
                    f"The statistics of module {layer!r} (from its inputs and backpropagated "
                    f"gradients) are not finite or may overflow {self.dtype}: the squared norms "
                    f"of its inputs and gradients are {squared[2 * i]:.3g} and "
                    f"{squared[2 * i + 1]:.3g}."
                )
        return set(chosen)

    def _first_step_rows(self, layer: str, inputs: InputRows, terms: dict[str, Tensor],
                         grads: list[Tensor] | None) -> FactorRows:
        """The rows of the first step's factors of a layer that refresh() would decompose
        (:func:`~curvlib.kron.eigen.decomposed_from_rows`), from the step's rows, output terms
        and, if few enough, gradient rows in chunks of the K vectors."""
        wanted = decomposed_from_rows(inputs.num_rows, self.layouts[layer].d_cols)
        return self._stats[layer].factor_rows(
            inputs if wanted else None, terms,
            None if not grads else grads[0] if len(grads) == 1 else torch.cat(grads))

    def _kept_step_support(self) -> dict[str, tuple[int, int]]:
        """Per layer whose factors hold the kept step alone (the first one), the number of
        trailing eigenvectors (input, output) that span that step's rows
        (:func:`~curvlib.kron.eigen.eigenbasis_squares`, ``support``); not under reduce with
        shared positions, whose factors see position means."""
        if self._sole is None or self._last is None or self._rank_bounds is None:
            return {}
        bounds, layouts = self._rank_bounds, self.layouts
        return {layer: bounds[layer] for layer, inputs in self._last.inputs.items()
                if (self.weight_sharing == "expand" or inputs.shape[1] == 1)
                and (bounds[layer][0] < layouts[layer].d_cols
                     or bounds[layer][1] < layouts[layer].d_out)}  # else nothing to leave out

    def _factor_rows(self, layer: str) -> FactorRows:
        """The rows a layer's factors are the Grams of, where kept (the factors hold the first
        statistics step alone): :func:`~curvlib.kron.eigen.eigh_psd` decomposes those rows
        instead of the factors. An input changed in place since is not used (K-FAC and TKFAC
        never needed it again; EKFAC and TEKFAC refuse to refresh from it)."""
        if self._sole is None:
            return FactorRows()
        inputs, rows = self._sole[layer]
        return rows if inputs.unmodified() else FactorRows(output=rows.output)

    def _in_place_pays(self, layer: str, step: StepData) -> bool:
        """Whether the layer's factors hold at least 4× the entries that the bounds of
        :meth:`_in_place_layers` read (its recorded inputs and gradients).

        Measured (CPU, 1 thread, steps alternated in one process): W2's linear head, 16×
        (2049² input factor from 128 × 2049 rows), the same step time in place, 16.8 MB less;
        W1's layers, 2.0–2.7×, 0.65 ms (4%) slower per step in place: the bounds' cold pass over
        the rows (0.35–0.41 ms) and products adding into the cold running sums cost more than
        the adds they replace (≈0.5 ms).
        """
        layout = self.layouts[layer]
        read = (sum(x.numel() for x in step.inputs[layer].inputs)
                + sum(chunk[layer].numel() for chunk in step.grads))
        return layout.d_cols ** 2 + layout.d_out ** 2 >= 4 * read

    def _diagonal_batch(self, step: StepData,
                        support: dict[str, tuple[int, int]] | None = None) -> _Squares:
        """A step's squares in the current bases, per layer (summed over the process group);
        ``support``: per layer, the trailing eigenvectors that span the step's rows (see
        :meth:`_kept_step_support`)."""
        weight = self._weights.weight(step.num_examples)
        squares: dict[str, Tensor] = {}
        buffers: dict[str, Tensor] = {}  # the padded tensors the squares are blocks of
        support = support or {}
        for chunk in step.grads:
            for layer, inputs in step.inputs.items():
                basis_in, basis_out = self._padded_bases(layer)
                accumulate = layer in buffers
                if not accumulate:
                    shape = (basis_out.shape[1], basis_in.shape[1])
                    spare = self._spare_squares.pop(layer, None)
                    buffers[layer] = (spare if spare is not None and spare.shape == shape
                                      else basis_in.new_empty(shape))
                squares[layer] = eigenbasis_squares(
                    inputs, chunk[layer], basis_in, basis_out, support=support.get(layer),
                    alpha=weight * step.scale, out=buffers[layer], accumulate=accumulate)
        if self.process_group is not None:
            reduced, (examples,) = self._all_reduce(list(squares.values()),
                                                    [float(step.num_examples)])
            squares = dict(zip(squares, reduced))
            weight = self._weights.weight(examples)
        return _Squares(squares, buffers, weight)

    def _add_diagonal(self, squares: _Squares) -> None:
        for layer, numerator in squares.numerators.items():
            running = self._diagonals[layer]
            running.add(numerator, squares.weight)
            buffer = squares.buffers[layer]
            if running.numerator.data_ptr() != buffer.data_ptr():  # not kept: reused next fold
                self._spare_squares[layer] = buffer

    def _fold_diagonal(self, step: StepData,
                       support: dict[str, tuple[int, int]] | None = None) -> None:
        """Add a step's squares in the current bases to the diagonals (the refit at a refresh)."""
        squares = self._diagonal_batch(step, support)
        for layer, numerator in squares.numerators.items():
            check_finite(numerator.sum(), f"The eigenbasis diagonal of module {layer!r}")
        self._add_diagonal(squares)

    def _padded_bases(self, layer: str) -> tuple[Tensor, Tensor]:
        """The layer's current bases with zero columns up to a fast width, made once per basis.

        The basis then holds views of its padded copies (the leading columns, laid out as
        before: LAPACK's column-major columns stay contiguous), so that one copy is kept —
        W2's bases are 18 MiB.
        """
        basis = self._bases[layer]
        cached = self._padded.get(layer)
        if cached is None or cached[0] is not basis:
            padded_in, padded_out = pad_columns(basis.basis_in), pad_columns(basis.basis_out)
            basis.basis_in = padded_in[:, : basis.basis_in.shape[1]]
            basis.basis_out = padded_out[:, : basis.basis_out.shape[1]]
            cached = (basis, padded_in, padded_out)
            self._padded[layer] = cached
        return cached[1], cached[2]

    def _reduce_statistics(
        self,
        batches: dict[str, dict[str, tuple[Tensor, float]]],
        rows: dict[str, tuple[int, int]],
        num_examples: int,
    ) -> tuple[dict[str, dict[str, tuple[Tensor, float]]], dict[str, tuple[int, int]]]:
        """The shards' batch statistics summed over the process group.

        Numerators are sums over rows, already weighted by each shard's w_b·c_b, so they add.
        Counts are recomputed for the whole batch: rows for row means, w of all N examples for
        curvature-scale statistics (Σ N_r for a mean loss; 1 for a sum, as the batch is one).
        """
        keys = [(layer, name) for layer, batch in batches.items() for name in batch]
        scalars = [float(num_examples)] + [float(r) for pair in rows.values() for r in pair]
        reduced, totals = self._all_reduce([batches[layer][name][0] for layer, name in keys],
                                           scalars)
        weight = self._weights.weight(totals[0])
        rows = {layer: (int(totals[1 + 2 * i]), int(totals[2 + 2 * i]))
                for i, layer in enumerate(rows)}
        out: dict[str, dict[str, tuple[Tensor, float]]] = {layer: {} for layer in batches}
        for (layer, name), numerator in zip(keys, reduced):
            row_mean = name in self._stats[layer].row_means
            out[layer][name] = (numerator, float(rows[layer][0]) if row_mean else weight)
        return out, rows

    def _all_reduce(self, tensors: list[Tensor], scalars: list[float]
                    ) -> tuple[list[Tensor], list[float]]:
        """Sum tensors (one flat buffer) and float64 scalars over the process group."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.process_group)
        totals = torch.tensor(scalars, dtype=torch.float64, device=flat.device)
        dist.all_reduce(totals, group=self.process_group)
        out, start = [], 0
        for t in tensors:
            out.append(flat[start : start + t.numel()].view_as(t))
            start += t.numel()
        return out, totals.tolist()

    def _refit_diagonal(self) -> None:
        if self._replay and self._fingerprint() == self._replay_fingerprint:
            for entry in self._replay:
                if entry.step == self._last_step and self._last is not None:
                    self._fold_diagonal(self._last, self._kept_step_support())
                else:
                    with torch.enable_grad():
                        self._fold_diagonal(self._forward_step(entry.inputs, entry.targets,
                                                               entry.seed))
        elif self._last is not None:
            self._fold_diagonal(self._last, self._kept_step_support())

    # ------------------------------------------------------------------ internals: reads
    def _ensure_current(self) -> None:
        self.flush()
        if not self._bases or (self.auto_refresh and self._version != self._refreshed_version):
            self.refresh()

    def _diagonal(self, layer: str) -> Tensor:
        """The block's eigenbasis diagonal D (d_out × d_in') as read now."""
        running = self._diagonals.get(layer)
        if running is not None and not running.empty:
            return running.value()
        return self._bases[layer].kronecker_diagonal()

    def _split(self, vectors: Sequence[Tensor]) -> Iterator[tuple[str, list[Tensor]]]:
        start = 0
        for layer, group in zip(self.layouts, self.partition.groups):
            yield layer, list(vectors[start : start + len(group)])
            start += len(group)

    def _apply(self, vectors: Sequence[Tensor], diagonals: dict[str, Tensor],
               invert: bool) -> Vector:
        out: Vector = []
        for layer, tensors in self._split(vectors):
            layout, basis = self.layouts[layer], self._bases[layer]
            rotated = basis.rotate(layout.to_matrix(tensors, self.dtype))
            rotated = rotated / diagonals[layer] if invert else rotated * diagonals[layer]
            out.extend(layout.from_matrix(basis.unrotate(rotated)))
        return out

    # ------------------------------------------------------------------ CurvatureEstimate
    def matmat(self, vectors: Sequence[Tensor]) -> Vector:
        """C applied to K vectors ([K, *p.shape] each), layer by layer in matrix form."""
        self.partition.check_batched_vector(vectors)
        self._ensure_current()
        return self._apply(vectors, {layer: self._diagonal(layer) for layer in self.layouts},
                           invert=False)

    def matvec(self, v: Sequence[Tensor]) -> Vector:
        v = self.partition.check_vector(v, "v")
        return [t[0] for t in self.matmat([x.unsqueeze(0) for x in v])]

    def solve(
        self, v: Sequence[Tensor], damping: float = 0.0, *, damping_mode: DampingMode = "tikhonov"
    ) -> Vector:
        """(C_λ)⁻¹ v through the eigendecompositions, where C_λ is the damped block.

        ``damping_mode="tikhonov"`` (default, every method) gives C_λ = C + λI exactly; the other
        modes each method offers are described in its class docstring.

        Raises:
            ValueError: unknown mode, negative damping, or C_λ singular (e.g. zero damping on a
                rank-deficient estimate), naming the module.
        """
        v = self.partition.check_vector(v, "v")
        check_damping(damping)
        if damping_mode not in self.damping_modes:
            raise ValueError(
                f"{type(self).__name__}.solve: damping_mode must be one of {self.damping_modes}, "
                f"got {damping_mode!r}."
            )
        self._ensure_current()
        diagonals = self._damped_diagonals(float(damping), damping_mode)
        for layer, diag in diagonals.items():
            # A positive damping keeps every damped eigenvalue away from zero however large the
            # others are; without damping, eigenvalues at rounding level of the largest are zero.
            eps = torch.finfo(diag.dtype).eps
            scale = max(float(diag.abs().max()), 1e-300)
            tol = 0.0 if damping > 0 else max(diag.shape) * eps * scale
            if bool((diag <= tol).any()):
                raise ValueError(
                    f"{type(self).__name__}.solve: the block of module {layer!r} plus "
                    f"damping={damping} ({damping_mode}) is singular (smallest eigenvalue "
                    f"{float(diag.min()):.3e}); use a positive damping."
                )
        return [x[0] for x in self._apply([t.unsqueeze(0) for t in v], diagonals, invert=True)]

    def to_dense(self) -> Tensor:
        """The block-diagonal P×P matrix in the dense order (user layout, not [W | b])."""
        self._ensure_current()
        part = self.partition
        dense = torch.zeros(part.numel, part.numel, dtype=part.dtype, device=part.device)
        for (layer, layout), sl in zip(self.layouts.items(), part.subset_slices):
            basis = self._bases[layer]
            # row-major [W | b] ↔ eigenbasis; torch.kron fails on operands of mixed memory
            # layouts (LAPACK's column-major eigenvectors next to a row-major basis).
            q = torch.kron(basis.basis_out.contiguous(), basis.basis_in.contiguous())
            block = (q * self._diagonal(layer).reshape(-1)) @ q.T
            index = layout.dense_index().to(block.device)
            dense[sl, sl] = (0.5 * (block + block.T))[index][:, index].to(part.dtype)
        return dense

    def diagonal(self) -> Vector:
        """diag(C): (U_out^{∘2}) D (U_in^{∘2})ᵀ per layer, in the user layout."""
        self._ensure_current()
        out: Vector = []
        for layer, layout in self.layouts.items():
            basis = self._bases[layer]
            diag = basis.basis_out.square() @ self._diagonal(layer) @ basis.basis_in.square().T
            out.extend(t[0] for t in layout.from_matrix(diag.unsqueeze(0)))
        return out

    def trace(self) -> Tensor:
        """tr C = Σ_layers Σ D (the trace is invariant under the orthogonal change of basis)."""
        self._ensure_current()
        total = sum(self._diagonal(layer).sum() for layer in self.layouts)
        return total.to(self.partition.dtype)

    def reduced(self, u: Sequence[Tensor]) -> Tensor:
        """S×S: diag(u_sᵀ C_ss u_s); the off-diagonal blocks of a block-diagonal estimate are 0."""
        u = self.partition.check_vector(u, "u")
        return torch.diag(self.partition.subset_dots(u, self.matvec(u)))

    # ------------------------------------------------------------------ inspection
    def factors(self) -> dict[str, dict[str, Tensor]]:
        """Per module: its statistics, the eigendecompositions, and the eigenbasis diagonal.

        Keys: the named statistics of the method (e.g. ``"A"``, ``"G"``; ``"delta"``, ``"Phi"``,
        ``"Psi"``, ``"Phi_raw"``, ``"Psi_raw"``), ``"eigvals_X"``/``"eigvecs_X"`` for both
        factors X (eigenvalues of the factor as named, eigenvectors in columns, at the last
        refresh) and ``"diagonal"``, the d_out × d_in' eigenbasis diagonal D of the block.
        """
        self._ensure_current()
        name_in, name_out = self._factor_names()
        out: dict[str, dict[str, Tensor]] = {}
        for layer, stats in self._stats.items():
            basis = self._bases[layer]
            # The bases decompose the undivided factors; TKFAC's named ones are Φ_raw/δ, Ψ_raw/δ.
            divisor = basis.safe_divisor()
            entry = stats.named()
            entry[f"eigvals_{name_in}"] = basis.values_in / divisor
            entry[f"eigvecs_{name_in}"] = basis.basis_in
            entry[f"eigvals_{name_out}"] = basis.values_out / divisor
            entry[f"eigvecs_{name_out}"] = basis.basis_out
            entry["diagonal"] = self._diagonal(layer)
            out[layer] = entry
        return out

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict[str, Any]:
        return {
            "method": type(self).__name__,
            "fisher": self.fisher,
            "mc_samples": self.mc_samples,
            "type2_columns": self.type2_columns,
            "weight_sharing": self.weight_sharing,
            "ema_decay": self.ema_decay,
            "reduction": self.loss.reduction,
            "layers": {layer: (lay.d_out, lay.d_cols) for layer, lay in self.layouts.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        """Statistics (sums with counts), bases, diagonals, kept batches and RNG position."""
        self.flush()
        last = None
        if self._last is not None:
            last = {
                "inputs": {k: ([t.clone() for t in x.inputs], x.positions)
                           for k, x in self._last.inputs.items()},
                "grads": [_clone_chunk(chunk) for chunk in self._last.grads],
                "scale": self._last.scale,
                "num_examples": self._last.num_examples,
                "step": self._last_step,
            }
        return {
            "config": self._config(),
            "statistics": {layer: s.state_dict() for layer, s in self._stats.items()},
            "bases": {layer: vars(b).copy() for layer, b in self._bases.items()},
            "diagonals": {layer: r.state_dict() for layer, r in self._diagonals.items()},
            "version": self._version,
            "refreshed_version": self._refreshed_version,
            "rank_bounds": self._rank_bounds,
            "seed": self._seed,
            "steps": self._steps,
            "replay": [vars(r).copy() for r in self._replay],
            "last": last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of the same method, configuration and layers.

        Kept batches are assumed to belong to the current parameter values.

        Raises:
            ValueError: the state was saved by another method, configuration or model.
        """
        if not isinstance(state, dict) or "config" not in state:
            raise ValueError(f"{type(self).__name__}.load_state_dict: not a Kronecker state.")
        mine, theirs = self._config(), state["config"]
        for key, value in mine.items():
            if theirs.get(key) != value:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the state has {key}="
                    f"{theirs.get(key)!r}, this estimate {value!r}."
                )
        self.flush()
        for layer, stats in self._stats.items():
            stats.load_state_dict(state["statistics"][layer])
        self._bases = {layer: Eigenbasis(**b) for layer, b in state["bases"].items()}
        self._diagonals = {}
        for layer, saved in state["diagonals"].items():
            running = self._weights.running()
            running.load_state_dict(saved)
            self._diagonals[layer] = running
        self._version = int(state["version"])
        self._refreshed_version = int(state["refreshed_version"])
        # A state without rank bounds (or from an unknown source) gets the full solver.
        self._rank_bounds = state.get("rank_bounds")
        self._seed = int(state["seed"])
        self._steps = int(state["steps"])
        self._replay = [_Replay(**r) for r in state["replay"]]
        self._replay_fingerprint = self._fingerprint()
        last = state["last"]
        self._last, self._last_step, self._sole = None, -1, None
        if last is not None:
            self._last = StepData(
                {k: LayerInputs(self.layouts[k], [x.clone() for x in inputs], list(positions),
                                self.dtype) for k, (inputs, positions) in last["inputs"].items()},
                [_clone_chunk(chunk) for chunk in last["grads"]],
                last["scale"], last["num_examples"],
            )
            self._last_step = int(last["step"])
