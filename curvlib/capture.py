"""Capture of layer inputs and output gradients with module hooks, scoped to one use.

Every supported layer is read as one linear map applied at T ≥ 1 shared positions
(kfac_family.md §1.1): z_{n,t} = W ā_{n,t}, with W = ``weight.view(d_out, -1)``. This module turns
what hooks see into that form:

* :func:`layer_inputs` gives the rows a_{n,t} ∈ ℝ^{d_in} as an [N, T, d_in] tensor: the input
  itself for ``nn.Linear`` (every leading axis after the first is a shared position), the unfolded
  receptive-field patches for ``nn.Conv1d/Conv2d`` in (C_in, k...) order so that they multiply
  ``weight.view(C_out, -1)``, honouring stride, padding (also ``"same"``) and dilation;
* :func:`convolved_rows` gives those rows times a matrix without forming them (its columns
  as the filters of :func:`convolution_filters`);
* :func:`output_rows` reshapes a gradient w.r.t. the layer output to [..., N, T, d_out];
* :func:`empty_rows` allocates rows in the layout each layer fills without transposing
  (feature-major for convolutions, whose positions are innermost), :func:`empty_grad_rows`
  gradient rows in the layout of the layer's output gradient (per example [d_out, T] for
  convolutions).

Then Σ_t g_{n,t} a_{n,t}ᵀ is example n's weight gradient (and Σ_t g_{n,t} its bias gradient).

:class:`LayerCapture` is a context manager that installs forward hooks on the given modules,
records every call (a module called twice contributes two calls: weight sharing) and removes the
hooks on exit, so no state leaks into the model. The output tensors are kept attached so that
gradients w.r.t. them can be taken with ``torch.autograd.grad`` — batched over several
backpropagated vectors at once — and, optionally, tensor hooks record the gradients that flow
through them during an ordinary ``loss.backward()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def check_layer(name: str, module: nn.Module) -> None:
    """Raise a ValueError if ``module`` is not a layer the Kronecker rules cover."""
    if not isinstance(module, SUPPORTED_LAYERS):
        raise ValueError(
            f"Module {name!r} ({type(module).__name__}) has parameters but is not supported; "
            "supported layers are nn.Linear, nn.Conv1d and nn.Conv2d."
        )
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.groups != 1:
            raise ValueError(
                f"Module {name!r}: convolutions with groups={module.groups} > 1 are not supported "
                "(one Kronecker product cannot represent a grouped convolution's block)."
            )
        if module.padding_mode != "zeros":
            raise ValueError(
                f"Module {name!r}: padding_mode={module.padding_mode!r} is not supported "
                "(only zero padding)."
            )


def supported_layers(
    model: nn.Module, include: Iterable[nn.Module] | None = None
) -> dict[str, nn.Module]:
    """The named layers an estimate covers, in the model's order.

    Without ``include`` every module that directly owns trainable parameters must be a supported
    layer; otherwise a ValueError names the first one that is not. With ``include``, exactly those
    modules are used (each must be supported and in the model).
    """
    wanted = None if include is None else {id(m) for m in include}
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        owns = any(p.requires_grad for p in module.parameters(recurse=False))
        if wanted is not None:
            if id(module) not in wanted:
                continue
        elif not owns:
            continue
        check_layer(name or type(module).__name__, module)
        layers[name or type(module).__name__] = module
    if wanted is not None and len(layers) != len(wanted):
        raise ValueError("Some of the modules passed to include are not part of the model.")
    if not layers:
        raise ValueError(f"{type(model).__name__} has no supported layer with parameters.")
    return layers


def conv_padding(module: nn.Conv1d | nn.Conv2d, spatial: int) -> list[tuple[int, int]]:
    """(left, right) zero padding per spatial axis, resolving 'same' and 'valid'."""
    if module.padding == "valid":
        return [(0, 0)] * spatial
    if module.padding == "same":
        pads = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(int(p), int(p)) for p in module.padding]


def empty_rows(
    module: nn.Module, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """An uninitialised [*B, N, T, d] tensor laid out for this layer's rows.

    The layout follows the order in which the layer holds its rows, so that filling it copies
    contiguous runs instead of transposing: an ``nn.Linear`` input or output gradient keeps its d
    features innermost, so the tensor is row-major; a convolution's image and output gradient keep
    the positions innermost, so the tensor is stored feature-major ([d, *B, N, T], permuted). In
    both layouts the leading axes still merge into one, so [*B·N·T, d] rows are a view.
    """
    if isinstance(module, nn.Linear):
        return torch.empty(*shape, dtype=dtype, device=device)
    storage = torch.empty(shape[-1], *shape[:-1], dtype=dtype, device=device)
    return storage.permute(*range(1, len(shape)), 0)


def empty_grad_rows(
    module: nn.Module, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """An uninitialised [*B, N, T, d_out] tensor laid out like this layer's output gradient.

    A convolution's gradient holds each example's [d_out, T] block with the positions innermost,
    so the tensor is stored [*B, N, d_out, T] (transposed); filling it from :func:`output_rows`
    copies contiguous runs, and the statistics work on those blocks without a transposing copy.
    """
    if isinstance(module, nn.Linear):
        return torch.empty(*shape, dtype=dtype, device=device)
    *lead, t, d = shape
    return torch.empty(*lead, d, t, dtype=dtype, device=device).transpose(-1, -2)


def layer_inputs(module: nn.Module, x: Tensor, out: Tensor | None = None) -> Tensor:
    """The rows a_{n,t} of a layer input as an [N, T, d_in] tensor (no bias coordinate).

    For ``nn.Linear`` a view of the input. For a convolution, position t = (o_1, …) reads the
    padded input at s·o + δ·κ for every kernel offset κ (stride s, dilation δ); these windows are
    taken as a strided view of the padded input and copied once into :func:`empty_rows` storage.
    With ``out`` (an [N, T, d_in] tensor of any strides, e.g. part of a larger one), the rows are
    written there instead and ``out`` is returned.
    """
    if isinstance(module, nn.Linear):
        if x.dim() < 2:
            raise ValueError(f"nn.Linear input of shape {tuple(x.shape)} has no batch axis.")
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        return rows if out is None else out.copy_(rows)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        if x.dim() != spatial + 2:
            raise ValueError(
                f"{type(module).__name__} input of shape {tuple(x.shape)} is not batched "
                f"([N, C, {'L' if spatial == 1 else 'H, W'}] expected)."
            )
        pads = conv_padding(module, spatial)
        flat_pad = [p for pair in reversed(pads) for p in pair]
        if any(flat_pad):
            x = F.pad(x, flat_pad)
        windows = x
        for axis, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride,
                                               module.dilation)):
            windows = windows.unfold(2 + axis, dil * (k - 1) + 1, s)
        windows = windows[(..., *(slice(None, None, dil) for dil in module.dilation))]
        # [N, C, *positions, *kernel] → [N, *positions, C, *kernel]: the columns in the order of
        # weight.view(C_out, -1)
        windows = windows.permute(0, *range(2, 2 + spatial), 1,
                                  *range(2 + spatial, 2 + 2 * spatial))
        shape = (x.shape[0], math.prod(windows.shape[1:1 + spatial]),
                 math.prod(windows.shape[1 + spatial:]))
        rows = empty_rows(module, shape, x.dtype, x.device) if out is None else out
        rows.view(windows.shape).copy_(windows)
        return rows
    raise ValueError(f"{type(module).__name__} is not a supported layer.")


def convolution_filters(module: nn.Conv1d | nn.Conv2d, matrix: Tensor) -> Tensor:
    """The columns of M [d_in, w] as w contiguous filters shaped like the layer's weight,
    [w, C_in, *k], for :func:`convolved_rows`.

    Contiguous once, here: given strided filters (the columns of a column-major eigenbasis, as
    LAPACK returns it), the convolution copies them on every call and runs slower. W2's third
    convolution rotated by a 577 × 592 basis in chunks of 4 examples (1 thread, 21 rounds):
    98–132 ms with strided filters, 63–83 ms copied per call, 50–63 ms made contiguous once.
    """
    return matrix.T.reshape(matrix.shape[1], *module.weight.shape[1:]).contiguous()


def convolved_rows(module: nn.Conv1d | nn.Conv2d, x: Tensor, filters: Tensor,
                   bias: Tensor | None = None) -> Tensor:
    """a_{n,t}ᵀ M (+ b) for every row of a convolution's input x, as an [N, T, w] tensor (a
    transposed view), for M [d_in, w] given as ``filters = convolution_filters(module, M)``
    and b [w]: the layer's own convolution of x, with the columns of M as its w filters and b as
    their bias, so that the rows are never unfolded.
    """
    convolve = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    out = convolve(x, filters, bias, module.stride, module.padding, module.dilation)
    return out.flatten(2).transpose(1, 2)


def output_rows(module: nn.Module, grad: Tensor, batch_axes: int = 0) -> Tensor:
    """A gradient w.r.t. a layer output, [*B, *out.shape], as [*B, N, T, d_out] rows.

    ``batch_axes`` leading axes (e.g. the K backpropagated vectors) are kept as they are.
    """
    lead = grad.shape[:batch_axes]
    out = grad.shape[batch_axes:]
    if isinstance(module, nn.Linear):
        return grad.reshape(*lead, out[0], -1, out[-1])
    # convolutions: [N, C_out, *spatial] → [N, T, C_out]
    return grad.reshape(*lead, out[0], out[1], -1).transpose(-1, -2)


@dataclass
class LayerCall:
    """One call of a captured layer: its input, its (attached) output, the output's gradient."""

    input: Tensor
    output: Tensor
    output_version: int
    grad_output: Tensor | None = None

    def check_unmodified(self, name: str) -> None:
        if self.output._version != self.output_version:
            raise ValueError(
                f"The output of module {name!r} was modified in place after the layer ran "
                "(e.g. by an activation with inplace=True); its gradient cannot be recovered. "
                "Use inplace=False."
            )


@dataclass
class LayerCapture:
    """Context manager recording every call of the given layers during forward passes.

    Args:
        layers: the named modules to watch.
        record_grad_outputs: also record, with tensor hooks, the gradient w.r.t. each output
            that flows during a backward pass (used to reuse the training backward).
    """

    layers: Mapping[str, nn.Module]
    record_grad_outputs: bool = False
    calls: dict[str, list[LayerCall]] = field(default_factory=dict)
    _handles: list[RemovableHandle] = field(default_factory=list)

    def __enter__(self) -> LayerCapture:
        self.calls = {name: [] for name in self.layers}
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            call = LayerCall(args[0].detach(), output, output._version)
            self.calls[name].append(call)
            if self.record_grad_outputs and output.requires_grad:
                def store(grad: Tensor, call: LayerCall = call) -> None:
                    call.grad_output = grad.detach()
                self._handles.append(output.register_hook(store))

        return hook

    def clear(self) -> None:
        """Forget the recorded calls (the hooks stay installed)."""
        self.calls = {name: [] for name in self.layers}

    def outputs(self) -> list[tuple[str, LayerCall]]:
        """Every recorded call, layer by layer, after checking none was modified in place."""
        items = []
        for name, calls in self.calls.items():
            for call in calls:
                call.check_unmodified(name)
                items.append((name, call))
        return items

    def grad_output_chunks(
        self, model_output: Tensor, vectors: Tensor, batched: bool | None = None,
        keep_graph: bool = True,
    ) -> Iterator[dict[str, list[Tensor]]]:
        """Backpropagate K vectors from ``model_output`` to every recorded layer output, in chunks
        of the vectors: one backward pass per chunk, run as the chunk is read.

        Only the layer outputs are differentiated (no parameter gradients). A consumer that folds
        each chunk before reading the next holds one chunk's gradients at a time instead of all K.

        Args:
            model_output: the model output the layers fed.
            vectors: [K, *model_output.shape] vectors to backpropagate.
            batched: one chunk of all K vectors from one vmapped backward
                (``is_grads_batched``), or K chunks of one vector from plain backward passes.
                None: plain passes on CPU, where they are faster — the vmapped backward of
                max-pooling and attention runs vector by vector anyway (K-FAC type-2
                statistics, 1 thread: CNN 6.1× → 5.3× a forward+backward, transformer block
                8.3× → 7.2×, MLP 5.1× → 5.3×) — and one vmapped pass on accelerators. K = 1 is
                one plain pass either way.
            keep_graph: keep the graph after the last pass, for a training backward through it.
                Without, the last pass frees the forward's saved tensors as it goes, like any
                backward: they and the gradients it returns are never all held at once (W2: a
                step's peak 26 MiB lower).

        Yields:
            For each layer, one [K_j, *output.shape] gradient per recorded call, for the chunk's
            K_j vectors (in order). A call whose output does not influence ``model_output`` gets
            zeros.
        """
        items = self.outputs()
        targets = [call.output for _, call in items]
        if batched is None:
            batched = model_output.device.type != "cpu"
        if batched and vectors.shape[0] > 1:
            grads = torch.autograd.grad(
                model_output, targets, grad_outputs=vectors, retain_graph=keep_graph,
                is_grads_batched=True, allow_unused=True, materialize_grads=True,
            )
            yield self._by_layer(items, grads)
            return
        last = vectors.shape[0] - 1
        for k, vector in enumerate(vectors):
            column = torch.autograd.grad(
                model_output, targets, grad_outputs=vector, retain_graph=keep_graph or k < last,
                allow_unused=True, materialize_grads=True,
            )
            yield self._by_layer(items, [g.unsqueeze(0) for g in column])
            del column  # the consumer is done with it: not held during the next pass

    def grad_outputs(
        self, model_output: Tensor, vectors: Tensor, batched: bool | None = None,
        keep_graph: bool = True,
    ) -> dict[str, list[Tensor]]:
        """The chunks of :meth:`grad_output_chunks` written into one [K, *output.shape] gradient
        per recorded call (a single chunk is returned as it is)."""
        k = vectors.shape[0]
        stacked: dict[str, list[Tensor]] = {}
        start = 0
        for chunk in self.grad_output_chunks(model_output, vectors, batched, keep_graph):
            size = next((g.shape[0] for grads in chunk.values() for g in grads), 0)
            if size == k:
                return chunk
            for name, grads in chunk.items():
                outs = stacked.setdefault(name, [g.new_empty(k, *g.shape[1:]) for g in grads])
                for out, g in zip(outs, grads):
                    out[start : start + size].copy_(g)
            start += size
        return stacked

    def _by_layer(self, items: list[tuple[str, LayerCall]], grads: Sequence[Tensor]
                  ) -> dict[str, list[Tensor]]:
        result: dict[str, list[Tensor]] = {name: [] for name in self.calls}
        for (name, _), grad in zip(items, grads):
            result[name].append(grad.detach())
        return result
