"""From one forward (and the backward vectors) to per-layer rows ā_{n,t} and g_{n,t,k}.

A Kronecker estimate reads every covered layer as z_{n,t} = W ā_{n,t} at T shared positions
(kfac_family.md §1.1). One batch gives, per layer,

* ``inputs``: ā ∈ ℝ^{N × T × d_in'}, the layer-input rows with the homogeneous coordinate
  (:meth:`LayerLayout.homogeneous`); a module called several times in one forward (weight tying)
  contributes every call as further shared positions (pitfall P11);
* ``grads``: g ∈ ℝ^{K × N × T × d_out}, the gradients at the layer output of Σ ℓ (the
  *unreduced* loss) along K backpropagated vectors s_k (§1.3), so that the curvature of the
  user's loss is c · Σ_{n,k} u_{n,k} u_{n,k}ᵀ with u_{n,k} = vec(Σ_t g_{n,t,k} ā_{n,t}ᵀ).

The vectors s_k depend on the Fisher type (:func:`backprop_vectors`). For the type-2 Fisher the
C columns s_c of the loss-Hessian square root (``LossFunction.hessian_sqrt``, every term at once)
are backpropagated either

* ``"joint"`` (default; curvlinops, ASDL): K = C vectors, column c of *every* term in one vector.
  With J_{t,r} the Jacobian of term r's output w.r.t. position t of a layer output, the layer sees
  g_{t,c} = Σ_r J_{t,r}ᵀ s_{r,c} and Σ_c g_{t,c} g_{t',c}ᵀ = Σ_{r,r'} J_{t,r}ᵀ (Σ_c s_{r,c}
  s_{r',c}ᵀ) J_{t',r'}. The exact GGN keeps only r = r' (the loss Hessian is block-diagonal over
  terms); the cross terms r ≠ r' vanish whenever J_{t,r} = 0 for r ≠ t, i.e. when positions do
  not mix (per-token layers after the last mixing, the expand setting), and are the standard
  K-FAC-expand approximation otherwise; or
* ``"per_term"``: the square root split per term, K = R·C vectors, vector (r, c) holding column c
  of term r's square root and zeros on the other terms, so that Σ_k u_{n,k}u_{n,k}ᵀ is example n's
  exact GGN for any model (EKFAC/TEKFAC per-example gradients included), at R× the cost.

MC vectors need no split: their samples are independent across terms, so the cross products
vanish in expectation.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from curvlib.capture import (
    LayerCall,
    conv_padding,
    convolution_filters,
    convolved_rows,
    empty_grad_rows,
    empty_rows,
    layer_inputs,
    output_rows,
)
from curvlib.kron.correlation import add_correlation_gram, correlation_pays
from curvlib.kron.layout import LayerLayout
from curvlib.losses import FisherType, LossFunction

Type2Columns = Literal["joint", "per_term"]
TYPE2_COLUMNS: tuple[str, ...] = ("joint", "per_term")

GradChunk = dict[str, Tensor]
"""Per layer, the output-gradient rows g [K_j, N, T, d_out] of a chunk of K_j of the K vectors."""


@dataclass
class StepData:
    """One statistics step: every layer's input rows ā [N, T, d_in'] (formed when read), its
    gradient rows in chunks of the K vectors, the reduction factor c and the batch size N.

    ``grads`` is a list of chunks, or an iterator that runs each chunk's backward pass as it is
    read (:func:`step_data` with ``stream=True``), which can be read once: the statistics then
    hold one chunk of gradients at a time instead of all K.
    """

    inputs: dict[str, LayerInputs]
    grads: Iterable[GradChunk]
    scale: float
    num_examples: int


def term_shape(loss: LossFunction, outputs: Tensor) -> tuple[int, ...]:
    """The shape of the loss-term axes of one example (empty: one term per example)."""
    if loss.kind == "cross_entropy":
        return tuple(outputs.shape[2:])
    if outputs.dim() <= 2:
        return ()
    return tuple(outputs.shape[1:-1])


def type2_vectors(loss: LossFunction, outputs: Tensor, targets: Tensor | None) -> Tensor:
    """[R·C, *outputs.shape]: the loss Hessian square root split per loss term (``"per_term"``)."""
    columns = loss.hessian_sqrt(outputs, targets)  # [C, *outputs.shape], all terms at once
    terms = term_shape(loss, outputs)
    num_terms = math.prod(terms)
    if num_terms == 1:
        return columns
    eye = torch.eye(num_terms, dtype=columns.dtype, device=columns.device)
    if loss.kind == "cross_entropy":  # outputs [N, C, *terms]
        selector = eye.view(num_terms, 1, 1, 1, *terms)
    else:  # outputs [N, *terms, C]
        selector = eye.view(num_terms, 1, 1, *terms, 1)
    split = selector * columns.unsqueeze(0)  # [R, C, *outputs.shape]
    return split.reshape(-1, *outputs.shape)


def backprop_vectors(
    loss: LossFunction,
    fisher: FisherType,
    outputs: Tensor,
    targets: Tensor | None,
    mc_samples: int,
    generator: torch.Generator,
    type2_columns: Type2Columns = "joint",
) -> Tensor:
    """The K vectors s_k of a Fisher type ([K, *outputs.shape]) for the unreduced loss Σ ℓ."""
    if fisher == "type2" and type2_columns == "per_term":
        return type2_vectors(loss, outputs, targets)
    return loss.backprop_vectors(fisher, outputs, targets, mc_samples, generator)


def sum_of_squares(x: Tensor, dim: int) -> Tensor:
    """Σ x² along ``dim``, kept as an axis of size 1.

    A norm reduction where ``dim`` is contiguous (no temporary of x's size, about 1.8× faster on
    CPU), else the squares summed (``vector_norm`` across a strided axis, such as a
    convolution's channels, is many times slower).
    """
    if x.stride(dim) == 1:
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True).square_()
    return x.square().sum(dim, keepdim=True)


class LayerInputs:
    """The input rows ā [N, T, d_in'] of one layer in one step, formed from the layer's recorded
    inputs when they are read, a chunk of examples at a time.

    Nothing of the rows' size is kept: a convolution's rows (its unfolded receptive fields, k× its
    input for a kernel of k offsets) exist one chunk at a time, in the buffer of whoever reads
    them. The recorded inputs are detached references to the forward's own tensors, checked for
    in-place changes whenever rows are formed. The rows of every call are laid out along T (a
    module called several times in one forward contributes every call as further positions, pitfall
    P11) with the trailing 1 of the homogeneous coordinate.
    """

    def __init__(self, layout: LayerLayout, inputs: list[Tensor], positions: list[int],
                 dtype: torch.dtype) -> None:
        self.layout = layout
        self.dtype = dtype
        self.inputs = inputs
        self.positions = positions
        self._versions = [x._version for x in inputs]
        self.shape = (inputs[0].shape[0], sum(positions), layout.d_cols)
        self.device = inputs[0].device

    @classmethod
    def recorded(cls, layout: LayerLayout, calls: list[LayerCall], dtype: torch.dtype
                 ) -> LayerInputs:
        """The rows of the recorded calls of a layer."""
        if not calls:
            raise ValueError(
                f"Module {layout.name!r} was not called during the forward pass, so it has no "
                "statistics; leave it out with include=."
            )
        positions = [output_rows(layout.module, call.output.detach()).shape[1] for call in calls]
        return cls(layout, [call.input for call in calls], positions, dtype)

    def unmodified(self) -> bool:
        """Whether no recorded input was changed in place since it was recorded."""
        return all(x._version == v for x, v in zip(self.inputs, self._versions))

    def check_unmodified(self) -> None:
        """Raise a ValueError naming the layer if a recorded input was changed in place."""
        if not self.unmodified():
            raise ValueError(
                f"The input of module {self.layout.name!r} was modified in place after the "
                "forward pass that recorded it; its statistics cannot be formed from it."
            )

    def rows_key(self) -> Hashable:
        """A key that the inputs of two layers in one step share exactly when their rows are
        the same: the same recorded tensors (memory, shape, strides, dtype, version at recording)
        at the same positions, read into the statistics' dtype by layers that form rows alike
        (weight and bias coordinates; a convolution's geometry).

        Attention's query, key and value projections read one input, as do the gate and up
        projections of a gated MLP or the branches of an Inception block.
        """
        layout, module = self.layout, self.layout.module
        geometry: Hashable = "linear"
        if not isinstance(module, nn.Linear):
            spatial = len(module.kernel_size)
            geometry = (spatial, module.kernel_size, module.stride, module.dilation,
                        tuple(conv_padding(module, spatial)))
        tensors = tuple((x.data_ptr(), x.device, x.dtype, tuple(x.shape), x.stride(), version)
                        for x, version in zip(self.inputs, self._versions))
        return (geometry, layout.has_weight, layout.has_bias, self.dtype, tuple(self.positions),
                tensors)

    def empty(self, examples: int) -> Tensor:
        """An uninitialised [examples, T, d_in'] buffer in the layout :meth:`rows` fills fastest
        (:func:`~curvlib.capture.empty_rows`)."""
        return empty_rows(self.layout.module, (examples, *self.shape[1:]), self.dtype,
                          self.device)

    def rows(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """ā of examples start … stop − 1, [m, T, d_in'], written into ``out`` if given (e.g. a
        slice of :meth:`empty`)."""
        self.check_unmodified()
        out = self.empty(stop - start) if out is None else out
        layout, d = self.layout, self.layout.d_in
        begin = 0
        for x, t in zip(self.inputs, self.positions):
            if layout.has_weight:
                layer_inputs(layout.module, x[start:stop], out=out[:, begin : begin + t, :d])
            begin += t
        if layout.has_bias:
            out[..., d:].fill_(1.0)
        return out

    def features(self) -> Tensor | None:
        """The rows' first d_in columns, [N, T, d_in], where they are the recorded input itself
        (one call of an ``nn.Linear``, in the statistics' dtype), else None.

        A reader that supplies the homogeneous coordinate itself (a Gram's last row is the
        column sums; a rotation adds the basis' last row) then reads the forward's tensor instead
        of a copy of it beside a column of ones, written and read again every step (W1's K-FAC
        step: 0.4 ms of copies, and a 785-wide Gram instead of the aligned 784-wide one).
        """
        layout = self.layout
        if (len(self.inputs) != 1 or not isinstance(layout.module, nn.Linear)
                or not layout.has_weight or self.inputs[0].dtype != self.dtype):
            return None
        self.check_unmodified()
        return layer_inputs(layout.module, self.inputs[0])

    def convolved_chunks(self, weight_rows: Tensor, bias: Tensor | None, chunk: int
                         ) -> Iterator[tuple[int, Tensor]] | None:
        """(first example, ā U [m, T, w]) for chunks of ``chunk`` examples and a basis
        U [d_in', w] given as its first d_in rows and, with a bias, its last row (None without),
        computed as the layer's own convolution (:func:`~curvlib.capture.convolved_rows`; the
        last row is the filters' bias) where the rows are one call of a convolution with a
        weight, on CPU; else None (form the rows and multiply).

        No rows are unfolded, and the convolution runs faster than the product of the formed
        rows: W2's third convolution (64 → 128 channels, 8 × 8, a column-major U 577 × 592,
        chunks of 4 examples, 1 thread, 21 rounds) rotates the batch in 51–70 ms (median 59)
        against 67–91 ms (median 75). Not on CUDA, where it was not measured and cuDNN
        convolutions may run in TF32 (``torch.backends.cudnn.allow_tf32``, on by default), below
        the precision of the products it replaces.
        """
        layout, module = self.layout, self.layout.module
        if (len(self.inputs) != 1 or isinstance(module, nn.Linear) or not layout.has_weight
                or weight_rows.device.type != "cpu"):
            return None
        self.check_unmodified()
        x, filters = self.inputs[0], convolution_filters(module, weight_rows)
        return ((start, convolved_rows(module, x[start : start + chunk].to(self.dtype),
                                       filters, bias))
                for start in range(0, self.shape[0], chunk))

    def correlation_gram(self) -> Tensor | None:
        """Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ [d_in', d_in'] without forming the rows, where the layer is
        a convolution with a weight whose every recorded call has stride 1 and a kernel for which
        the shifted correlations of its input do less work
        (:mod:`~curvlib.kron.correlation`); else None.

        The homogeneous coordinate's row is the column sums of the rows, the unfolded rows of the
        batch's summed input summed over positions, and its corner the number of rows. On W2's
        second and third convolutions (CPU, 1 thread) the whole Gram takes 25 and 21 ms against
        55 and 52 ms for the blocked Gram of the unfolded rows.
        """
        layout, module = self.layout, self.layout.module
        if not layout.has_weight or not all(correlation_pays(module, x) for x in self.inputs):
            return None
        self.check_unmodified()
        d, (n, t, d_cols) = layout.d_in, self.shape
        out = torch.zeros(d_cols, d_cols, dtype=self.dtype, device=self.device)
        for x in self.inputs:
            add_correlation_gram(module, x, out[:d, :d])
        if layout.has_bias:
            sums = out[d, :d]
            for x in self.inputs:
                sums.add_(layer_inputs(module, x.sum(0, keepdim=True, dtype=self.dtype))[0].sum(0))
            out[:d, d] = sums
            out[d, d] = n * t
        return out

    def chunks(self, max_entries: int = 1 << 20) -> Iterator[tuple[int, Tensor]]:
        """(first example, its rows [m, T, d_in']) for consecutive chunks of about
        ``max_entries`` entries, formed one after the other in one buffer."""
        n, t, d = self.shape
        step = max(1, min(n, max_entries // max(t * d, 1)))
        buffer = self.empty(step)
        for start in range(0, n, step):
            stop = min(n, start + step)
            yield start, self.rows(start, stop, out=buffer[: stop - start])

    def squared_norms(self) -> Tensor:
        """‖ā_{n,t}‖², [N, T], without forming the rows: the unfolded rows of the input's
        squares summed over its channels (features) are the rows' squares summed by offset."""
        self.check_unmodified()
        layout, module = self.layout, self.layout.module
        norms = torch.zeros(self.shape[:2], dtype=self.dtype, device=self.device)
        if layout.has_weight:
            begin = 0
            channel = -1 if isinstance(module, nn.Linear) else 1
            for x, t in zip(self.inputs, self.positions):
                squares = sum_of_squares(x.to(self.dtype), channel)
                norms[:, begin : begin + t] = layer_inputs(module, squares).sum(-1)
                begin += t
        return norms.add_(1.0) if layout.has_bias else norms


@dataclass
class InputRows:
    """The rows ā_m [M, d_in'] a layer's statistics read, under a weight-sharing flavour
    (kfac_family.md §2.3): every (example, position) is a row (expand, M = N·T), formed a chunk
    at a time, or each example's mean over its positions is (reduce, M = N), formed once.

    One object serves every layer whose rows are the same (:func:`input_rows`); ``readers``
    counts them, and ``gram`` keeps Σ_m ā_m ā_mᵀ (its lower triangle at least) once one of them
    has formed it for the others (:func:`~curvlib.kron.statistics.input_gram`).
    """

    inputs: LayerInputs
    reduce: bool
    readers: int = 1
    gram: Tensor | None = field(default=None, init=False, repr=False)
    _means: Tensor | None = field(default=None, init=False, repr=False)

    @property
    def num_rows(self) -> int:
        n, t, _ = self.inputs.shape
        return n if self.reduce else n * t

    def means(self) -> Tensor:
        """The reduce rows, each example's mean over its positions, [N, d_in'].

        Formed from the positions' rows a chunk of examples at a time on the first call and
        kept (N rows, not N·T): TKFAC reads them twice a step, for ‖ā‖² and for Φ_raw, and a
        convolution's unfolded rows are what forming them costs.
        """
        if self._means is None:
            n, _, d = self.inputs.shape
            means = torch.empty(n, d, dtype=self.inputs.dtype, device=self.inputs.device)
            for start, rows in self.inputs.chunks():
                torch.mean(rows, dim=1, out=means[start : start + rows.shape[0]])
            self._means = means
        return self._means

    def chunks(self, max_entries: int = 1 << 20) -> Iterator[tuple[int, Tensor]]:
        """(first row, rows [m, d_in']) for consecutive chunks of rows (each valid until the
        next is read; under reduce one chunk, the kept :meth:`means`, not to be written to)."""
        if self.reduce:
            yield 0, self.means()
            return
        t, d = self.inputs.shape[1:]
        for start, rows in self.inputs.chunks(max_entries):
            yield start * t, rows.reshape(-1, d)

    def features(self) -> Tensor | None:
        """The rows' first d_in columns, [M, d_in], where they are the recorded input itself
        (:meth:`LayerInputs.features`; under reduce, only with one position), else None."""
        n, t, _ = self.inputs.shape
        x = None if self.reduce and t > 1 else self.inputs.features()
        return None if x is None else x.reshape(n * t, -1)

    def matrix(self) -> Tensor:
        """All rows in one new tensor, [M, d_in']."""
        if self.reduce:
            return self.means().clone()
        out = torch.empty(self.num_rows, self.inputs.shape[2], dtype=self.inputs.dtype,
                          device=self.inputs.device)
        for start, rows in self.chunks():
            out[start : start + rows.shape[0]] = rows
        return out

    def squared_norms(self) -> Tensor:
        """‖ā_m‖² of every row, [M]."""
        if not self.reduce:
            return self.inputs.squared_norms().reshape(-1)
        return sum_of_squares(self.means(), -1).view(-1)


def input_rows(inputs: Mapping[str, LayerInputs], reduce: bool) -> dict[str, InputRows]:
    """Every layer's :class:`InputRows` of one step, one object for the layers whose rows are
    the same (:meth:`LayerInputs.rows_key`), so that what the statistics form from them — the
    unweighted Gram, the reduce means — is formed once.

    The refresh then decomposes their equal input factors once. On W3, whose query, key and
    value projections read one input (CPU, 1 thread, 25 interleaved rounds), the statistics and
    refresh of K-FAC take 69.0 ms instead of 74.1 (empirical) and 58.5 instead of 62.8 (mc),
    EKFAC's (empirical) 89.4 instead of 93.1.
    """
    shared: dict[Hashable, InputRows] = {}
    out = {}
    for layer, x in inputs.items():
        key = x.rows_key()
        rows = shared.get(key)
        if rows is None:
            rows = shared[key] = InputRows(x, reduce)
        else:
            rows.readers += 1
        out[layer] = rows
    return out


def grad_rows(layout: LayerLayout, grads: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The gradient rows g [K, N, T_total, d_out] of one layer from the [K, *output.shape]
    gradients of its calls.

    The gradients of a single call stay a view of the backward's result ([K, N, d_out, T]
    transposed for a convolution); several calls, or another dtype, are copied into one
    :func:`~curvlib.capture.empty_grad_rows` tensor of that layout. Finiteness is checked on the
    (much smaller) statistics.
    """
    module = layout.module
    outputs = [output_rows(module, g, batch_axes=1) for g in grads]  # views [K, N, T, d_out]
    # Either layout suits the statistics: rows that merge into a matrix, or per-example blocks.
    if len(outputs) == 1 and outputs[0].dtype == dtype and (
            outputs[0].is_contiguous() or outputs[0].transpose(-1, -2).is_contiguous()):
        return outputs[0]
    k, n, _, d_out = outputs[0].shape
    total = sum(g.shape[2] for g in outputs)
    rows = empty_grad_rows(module, (k, n, total, d_out), dtype, outputs[0].device)
    start = 0
    for g in outputs:
        rows[:, :, start : start + g.shape[2]].copy_(g)
        start += g.shape[2]
    return rows


def step_data(
    layouts: Mapping[str, LayerLayout],
    calls: Mapping[str, list[LayerCall]],
    grads: Iterable[Mapping[str, list[Tensor]]],
    scale: float,
    num_examples: int,
    dtype: torch.dtype,
    stream: bool = False,
) -> StepData:
    """Assemble a :class:`StepData` for every covered layer from its recorded calls and chunks
    of their [K_j, *output.shape] gradients (e.g. :meth:`LayerCapture.grad_output_chunks`).

    ``stream``: convert each chunk only when the step's ``grads`` are read (once), instead of all
    of them now.
    """
    inputs = {name: LayerInputs.recorded(layout, calls[name], dtype)
              for name, layout in layouts.items()}

    def rows() -> Iterator[GradChunk]:
        for chunk in grads:
            yield {name: grad_rows(layout, chunk[name], dtype) for name, layout in layouts.items()}
            del chunk  # not held while the next chunk's backward pass runs

    return StepData(inputs, rows() if stream else list(rows()), scale, num_examples)
