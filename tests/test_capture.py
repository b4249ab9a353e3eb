"""Capture: unfolded inputs and output gradients rebuild every layer's weight gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib.capture import (
    LayerCapture,
    empty_rows,
    layer_inputs,
    output_rows,
    supported_layers,
)
from curvlib.testing import assert_close
from tests.cases import make_case

CONVS = [
    nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1),
    nn.Conv2d(2, 3, kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
    nn.Conv2d(2, 3, kernel_size=2, padding="same"),  # asymmetric padding
    nn.Conv2d(2, 3, kernel_size=3, padding="valid", bias=False),
    nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=2, dilation=2),
    nn.Conv1d(2, 3, kernel_size=4, padding="same"),
    nn.Linear(4, 3),
]
INPUTS = [(2, 7, 6), (2, 7, 6), (2, 5, 5), (2, 5, 5), (2, 9), (2, 9), (3, 2, 4)]


@pytest.mark.parametrize("layer,shape", list(zip(CONVS, INPUTS)), ids=[str(c) for c in CONVS])
def test_rows_rebuild_weight_and_bias_gradients(layer: nn.Module, shape: tuple) -> None:
    layer = layer.double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    with LayerCapture({"layer": layer}) as capture:
        out = layer(x)
    upstream = torch.randn_like(out)
    (call,) = capture.calls["layer"]
    grads = capture.grad_outputs(out, upstream[None])
    (out * upstream).sum().backward()
    a = layer_inputs(layer, call.input)  # [N, T, d_in]
    g = output_rows(layer, grads["layer"][0], batch_axes=1)[0]  # [N, T, d_out]
    weight_grad = torch.einsum("nto,nti->oi", g, a)
    assert_close(weight_grad, layer.weight.grad.reshape(layer.weight.shape[0], -1), what="W")
    if layer.bias is not None:
        assert_close(g.sum(dim=(0, 1)), layer.bias.grad, what="bias")


@pytest.mark.parametrize("layer,shape", list(zip(CONVS, INPUTS)), ids=[str(c) for c in CONVS])
def test_rows_written_into_a_larger_tensor_and_flattened_as_a_view(
    layer: nn.Module, shape: tuple
) -> None:
    x = torch.randn(4, *shape, dtype=torch.float64)
    rows = layer_inputs(layer, x)
    n, t, d = rows.shape
    assert rows.reshape(-1, d).data_ptr() == rows.data_ptr()  # flattening needs no copy
    wider = empty_rows(layer, (n, t + 2, d + 1), torch.float64, x.device)
    layer_inputs(layer, x, out=wider[:, 1:t + 1, :d])
    assert torch.equal(wider[:, 1:t + 1, :d], rows)


def test_weight_tying_records_every_call_and_hooks_are_removed() -> None:
    model, loss_fn, x, y = make_case("shared", "mse", "sum", batch=3)
    layers = supported_layers(model)
    with LayerCapture(layers, record_grad_outputs=True) as capture:
        out = model(x)
        loss_fn(out, y).backward()
    assert len(capture.calls["shared"]) == 2
    assert all(call.grad_output is not None for call in capture.calls["shared"])
    shared = model.shared
    weight_grad = sum(
        torch.einsum("nto,nti->oi", output_rows(shared, c.grad_output),
                     layer_inputs(shared, c.input))
        for c in capture.calls["shared"]
    )
    assert_close(weight_grad, shared.weight.grad, what="tied weight")
    assert not shared._forward_hooks
    with torch.no_grad():
        model(x)
    assert len(capture.calls["shared"]) == 2  # nothing recorded outside the context


def test_batched_and_looped_backprop_agree() -> None:
    model, _, x, _ = make_case("cnn", "cross_entropy", "mean", batch=2)
    with LayerCapture(supported_layers(model)) as capture:
        out = model(x)
    vectors = torch.randn(5, *out.shape, dtype=out.dtype)
    batched = capture.grad_outputs(out, vectors, batched=True)
    for choice in (False, None):  # None: looped on CPU
        looped = capture.grad_outputs(out, vectors, batched=choice)
        for name in batched:
            assert looped[name][0].shape == (5, *capture.calls[name][0].output.shape)
            assert_close(batched[name][0], looped[name][0], what=name)
    single = capture.grad_outputs(out, vectors[:1])
    for name in batched:
        assert_close(single[name][0], batched[name][0][:1], what=f"{name}, K = 1")
    chunks = list(capture.grad_output_chunks(out, vectors, batched=False))
    assert len(chunks) == 5 and len(list(capture.grad_output_chunks(out, vectors, True))) == 1
    for i, chunk in enumerate(chunks):  # one vector per plain backward pass, in order
        for name in batched:
            assert_close(chunk[name][0], batched[name][0][i : i + 1], what=f"{name}, chunk {i}")


@pytest.mark.parametrize("batched", [True, False])
def test_graph_is_freed_by_the_last_pass_unless_kept(batched: bool) -> None:
    """keep_graph=False: every pass but the last keeps the graph, the last frees it (a backward
    through it again fails); the default keeps it for the training backward."""
    model, _, x, _ = make_case("cnn", "cross_entropy", "mean", batch=2)
    vectors = torch.randn(3, *model(x).shape, dtype=x.dtype)
    for keep_graph in (True, False):
        with LayerCapture(supported_layers(model)) as capture:
            out = model(x)
        chunks = list(capture.grad_output_chunks(out, vectors, batched, keep_graph=keep_graph))
        assert len(chunks) == (1 if batched else 3)
        if keep_graph:
            out.sum().backward()
        else:
            with pytest.raises(RuntimeError, match="second time"):
                out.sum().backward()
    model.zero_grad()


def test_in_place_modified_output_is_rejected() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    with LayerCapture(supported_layers(model)) as capture:
        out = model(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"output of module '0' was modified in place"):
        capture.grad_outputs(out, torch.ones(1, *out.shape))


def test_unbatched_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="not batched"):
        layer_inputs(nn.Conv2d(2, 3, 3), torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="no batch axis"):
        layer_inputs(nn.Linear(2, 3), torch.randn(2))
