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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from curvlib.capture import LayerCall, empty_grad_rows, empty_rows, layer_inputs, output_rows
from curvlib.kron.layout import LayerLayout
from curvlib.losses import FisherType, LossFunction

Type2Columns = Literal["joint", "per_term"]
TYPE2_COLUMNS: tuple[str, ...] = ("joint", "per_term")

GradChunk = dict[str, Tensor]
"""Per layer, the output-gradient rows g [K_j, N, T, d_out] of a chunk of K_j of the K vectors."""


@dataclass
class StepData:
    """One statistics step: every layer's input rows ā [N, T, d_in'], its gradient rows in chunks
    of the K vectors, the reduction factor c and the batch size N.

    ``grads`` is a list of chunks, or an iterator that runs each chunk's backward pass as it is
    read (:func:`step_data` with ``stream=True``), which can be read once: the statistics then
    hold one chunk of gradients at a time instead of all K.
    """

    inputs: dict[str, Tensor]
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


def input_rows(
    layout: LayerLayout, calls: list[LayerCall], dtype: torch.dtype, reuse: Tensor | None = None
) -> Tensor:
    """The input rows ā [N, T_total, d_in'] of one layer from its recorded calls.

    The rows of every call are written into one tensor laid out by
    :func:`~curvlib.capture.empty_rows` (a single copy, the trailing 1 filled in place); a module
    called several times in one forward contributes every call as further positions.

    ``reuse``, input rows of an earlier step of this layer that nothing holds any more, is
    overwritten instead of allocating when its shape and dtype fit: a fresh allocation of tens of
    MB comes straight from the operating system, and first touching its pages costs several times
    the copy itself.

    Raises:
        ValueError: the layer was not called.
    """
    if not calls:
        raise ValueError(
            f"Module {layout.name!r} was not called during the forward pass, so it has no "
            "statistics; leave it out with include=."
        )
    module, d = layout.module, layout.d_in
    positions = [output_rows(module, call.output.detach()).shape[1] for call in calls]
    shape = (calls[0].input.shape[0], sum(positions), layout.d_cols)
    device = calls[0].input.device
    fits = reuse is not None and (reuse.shape, reuse.dtype, reuse.device) == (shape, dtype, device)
    inputs = reuse if fits else empty_rows(module, shape, dtype, device)
    start = 0
    for call, t in zip(calls, positions):
        stop = start + t
        if layout.has_weight:
            layer_inputs(module, call.input, out=inputs[:, start:stop, :d])
        start = stop
    if layout.has_bias:
        inputs[..., d:].fill_(1.0)
    return inputs


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
    workspace: dict[str, Tensor] | None = None,
    stream: bool = False,
) -> StepData:
    """Assemble a :class:`StepData` for every covered layer from its recorded calls and chunks
    of their [K_j, *output.shape] gradients (e.g. :meth:`LayerCapture.grad_output_chunks`).

    ``stream``: convert each chunk only when the step's ``grads`` are read (once), instead of all
    of them now.

    With a ``workspace`` (layer name → input rows), each layer's input rows are written over the
    ones it holds (see ``reuse`` of :func:`input_rows`), and it then holds the new ones: pass it
    only when no earlier :class:`StepData` from it is still in use.
    """
    inputs = {}
    for name, layout in layouts.items():
        reuse = None if workspace is None else workspace.get(name)
        inputs[name] = input_rows(layout, calls[name], dtype, reuse)
        if workspace is not None:
            workspace[name] = inputs[name]
    chunks = ({name: grad_rows(layout, chunk[name], dtype) for name, layout in layouts.items()}
              for chunk in grads)
    return StepData(inputs, chunks if stream else list(chunks), scale, num_examples)
