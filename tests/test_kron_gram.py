"""gram, squared_norms and their gradient-row forms: blocked, chunked and mirrored, or summed over
per-example blocks, or accumulated over chunks of rows or vectors, they equal the plain
products."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from itertools import pairwise

import pytest
import torch
from torch import Tensor, nn

from curvlib.capture import LayerCall, convolution_filters, layer_inputs, output_rows
from curvlib.kron import correlation, syrk
from curvlib.kron.collect import InputRows, LayerInputs, grad_rows
from curvlib.kron.layout import LayerLayout
from curvlib.kron.statistics import (
    CurvatureWeights,
    FactorStatistics,
    KFACStatistics,
    RunningSum,
    TKFACStatistics,
    example_blocks,
    gram,
    gram_bounds,
    input_gram,
    mirror_lower,
    output_gram,
    squared_norms,
)
from curvlib.testing import assert_close


@pytest.mark.parametrize("route", ["panels", "syrk"])
@pytest.mark.parametrize("feature_major", [False, True], ids=["row-major", "feature-major"])
@pytest.mark.parametrize("width,chunk", [(128, 1 << 20), (4, 1 << 20), (3, 7), (5, 1)])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("d", [11, 70])
def test_gram_equals_the_full_product(
    feature_major: bool, width: int, chunk: int, weighted: bool, d: int, route: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Either route of the unweighted products: panels, or BLAS syrk (forced here down to these
    sizes), which leaves the whole strict upper triangle alone in lower storage."""
    if route == "syrk":
        monkeypatch.setattr(syrk, "MIN_COLUMNS", 1)
        monkeypatch.setattr(syrk, "MIN_WORK", 0)
    gen = torch.Generator().manual_seed(width + chunk + d)
    m = 23
    rows = torch.randn(d, m, dtype=torch.float64, generator=gen).T if feature_major else (
        torch.randn(m, d, dtype=torch.float64, generator=gen))
    weights = torch.rand(m, dtype=torch.float64, generator=gen) if weighted else None
    expected = rows.T @ (rows if weights is None else weights[:, None] * rows)
    norms = torch.full((m,), float("nan"), dtype=torch.float64)
    got = gram(rows, weights, width=width, chunk=chunk, norms=norms)
    assert_close(got, expected, rtol=1e-12, what="gram")
    assert_close(norms, rows.square().sum(-1), rtol=1e-12, what="‖r‖² written with the gram")
    lower = gram(rows, weights, width=width, chunk=chunk, mirror=False)
    assert_close(lower.tril(), expected.tril(), rtol=1e-12, what="lower storage")
    upper = torch.zeros(d, d, dtype=torch.bool)  # what lower storage leaves alone
    if route == "syrk" and weights is None:
        upper = torch.ones(d, d, dtype=torch.bool).triu(1)
    else:  # above every diagonal block
        for lo, hi in pairwise(gram_bounds(d, width)):
            upper[lo:hi, hi:] = True
    for mirror, result in ((True, got), (False, lower)):  # written over whatever out held
        out = torch.full((d, d), float("nan"), dtype=torch.float64)
        assert gram(rows, weights, width=width, chunk=chunk, mirror=mirror, out=out) is out
        if mirror or weights is not None:
            assert torch.equal(out, result)
        else:  # lower storage written over a previous one: what lies above is left alone
            assert torch.equal(out[~upper], result[~upper])
            assert out[upper].isnan().all()
            out[upper] = 0.0
        # accumulate: the rows' result added to an earlier one of other rows
        more = torch.randn(m + 3, d, dtype=torch.float64, generator=gen)
        more_weights = None if weights is None else torch.rand(m + 3, dtype=torch.float64,
                                                               generator=gen)
        gram(more, more_weights, width=width, chunk=chunk, mirror=mirror, out=out,
             accumulate=True)
        both = result + more.T @ (more if more_weights is None else more_weights[:, None] * more)
        assert_close(out if mirror else out.tril(), both if mirror else both.tril(), rtol=1e-12,
                     what=f"accumulated, mirror={mirror}")
        if not mirror:
            assert not out.triu(width + 1).any()  # lower storage: upper blocks stay zero


def test_gram_blocks() -> None:
    """⌈d / width⌉ nearly equal blocks, at least two from d = 64 (one would be the full
    product)."""
    assert gram_bounds(11, 128) == [0, 11]
    assert gram_bounds(128, 128) == [0, 64, 128]
    assert gram_bounds(129, 128) == [0, 64, 129]
    assert gram_bounds(785, 128) == [785 * i // 7 for i in range(8)]


@pytest.mark.parametrize("ema_decay", [None, 0.6])
@pytest.mark.parametrize("total", [False, True])
def test_running_sum_of_lower_storage_reads_the_symmetric_matrix(
    ema_decay: float | None, total: bool
) -> None:
    """Numerators accumulated in lower storage (upper blocks garbage or zero) read as the full
    symmetric statistic, exactly as full numerators would."""
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randn(9, 6, dtype=torch.float64, generator=gen) for _ in range(3)]
    lower = RunningSum(ema_decay, total=total, symmetric=True)
    full = RunningSum(ema_decay, total=total)
    for rows in batches:
        numerator = gram(rows, width=2, mirror=False)
        numerator += torch.randn(6, 6, dtype=torch.float64, generator=gen).triu(2)  # ignored
        lower.add(numerator, 9.0)
        full.add(rows.T @ rows, 9.0)
    assert_close(lower.value(), full.value(), rtol=1e-12, what="read")
    assert torch.equal(lower.value(), lower.value().T)
    saved = lower.state_dict()["numerator"]
    assert_close(saved, full.state_dict()["numerator"], rtol=1e-12, what="state dict")
    assert torch.equal(saved, saved.T)


@pytest.mark.parametrize("width", [1, 2, 3, 128])
def test_mirror_lower_overwrites_the_upper_triangle(width: int) -> None:
    """Panels and diagonal blocks alike: whatever the strict upper triangle held (NaN here), it
    becomes the transpose of the strict lower one."""
    lower = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    expected = lower.tril() + lower.tril(-1).T
    garbage = lower.clone()
    garbage[torch.ones(7, 7, dtype=torch.bool).triu(1)] = float("nan")
    assert torch.equal(mirror_lower(garbage, width), expected)


@pytest.mark.parametrize("feature_major", [False, True], ids=["row-major", "feature-major"])
@pytest.mark.parametrize("chunk", [1, 20, 1 << 18])
def test_squared_norms_in_chunks(feature_major: bool, chunk: int) -> None:
    gen = torch.Generator().manual_seed(chunk)
    rows = torch.randn(6, 17, dtype=torch.float64, generator=gen)
    rows = rows.T if feature_major else rows.reshape(17, 6)
    assert_close(squared_norms(rows, chunk), rows.square().sum(-1), rtol=1e-12, what="‖r‖²")


@pytest.mark.parametrize("blocked", [False, True], ids=["rows", "per-example-blocks"])
@pytest.mark.parametrize("chunk", [1, 50, 1 << 18])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_output_gram_and_norms_in_either_layout(blocked: bool, chunk: int, weighted: bool) -> None:
    gen = torch.Generator().manual_seed(chunk + weighted)
    k, n, t, d = 3, 5, 7, 4
    # a convolution's gradient [K, N, d, T] seen as rows [K, N, T, d], or row-major rows
    grads = torch.randn(k, n, d, t, dtype=torch.float64, generator=gen).transpose(2, 3) if (
        blocked) else torch.randn(k, n, t, d, dtype=torch.float64, generator=gen)
    assert (example_blocks(grads) is not None) == blocked
    weights = torch.rand(n, t, dtype=torch.float64, generator=gen) if weighted else None
    rows = grads.reshape(k, n * t, d)
    scale = torch.ones(n * t, dtype=torch.float64) if weights is None else weights.reshape(-1)
    expected = torch.einsum("kmi,m,kmj->ij", rows, scale, rows)
    assert_close(output_gram(grads, weights, chunk=chunk), expected, rtol=1e-12, what="G")
    out = torch.full((d, d), float("nan"), dtype=torch.float64)
    lower = output_gram(grads, weights, chunk=chunk, mirror=False, out=out)
    assert lower is out
    assert_close(lower.tril(), expected.tril(), rtol=1e-12, what="G, lower storage in out")
    expected_norms = rows.square().sum((0, 2)).view(n, t)
    norms = torch.ones(n, t, dtype=torch.float64)  # added to
    output_gram(grads, weights, chunk=chunk, norms=norms)
    assert_close(norms, 1.0 + expected_norms, rtol=1e-12, what="Σ_k ‖g‖² added to norms")
    # the K vectors one at a time, each added to the result of the ones before
    norms = torch.zeros(n, t, dtype=torch.float64)
    out = output_gram(grads[:1], weights, chunk=chunk, mirror=False, norms=norms)
    for kk in range(1, k):
        assert output_gram(grads[kk : kk + 1], weights, chunk=chunk, mirror=False, out=out,
                           accumulate=True, norms=norms) is out
    assert_close(out.tril(), expected.tril(), rtol=1e-12, what="G accumulated over vectors")
    assert_close(norms, expected_norms, rtol=1e-12, what="Σ_k ‖g‖² accumulated over vectors")


def test_accumulate_needs_a_result_to_add_to() -> None:
    rows = torch.randn(5, 3)
    with pytest.raises(ValueError, match="accumulate=True needs the result"):
        gram(rows, accumulate=True)
    with pytest.raises(ValueError, match="accumulate=True needs the result"):
        output_gram(torch.randn(2, 4, 3, 1).expand(2, 4, 3, 6).contiguous().transpose(2, 3),
                    accumulate=True)


@pytest.mark.parametrize("statistics", [KFACStatistics, TKFACStatistics])
@pytest.mark.parametrize("blocked", [False, True], ids=["rows", "per-example-blocks"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_statistics_from_chunks_of_vectors_equal_those_of_all(
    statistics: type[FactorStatistics], blocked: bool, reduction: str
) -> None:
    """Folded one backpropagated vector at a time (CPU training steps), a batch's statistics
    equal those of all K vectors at once."""
    gen = torch.Generator().manual_seed(int(blocked))
    k, n, t, d_in, d_out = 4, 5, 3, 6, 4
    layer = nn.Linear(d_in, d_out)
    x = torch.randn(n, t, d_in, dtype=torch.float64, generator=gen)
    inputs = InputRows(LayerInputs(LayerLayout("layer", layer, [layer.weight, layer.bias]), [x],
                                   [t], torch.float64), reduce=False)
    grads = torch.randn(k, n, d_out, t, dtype=torch.float64, generator=gen).transpose(2, 3) if (
        blocked) else torch.randn(k, n, t, d_out, dtype=torch.float64, generator=gen)
    weights = CurvatureWeights(reduction, None)
    whole, chunked = statistics(weights), statistics(weights)
    whole.start(inputs.num_rows, n, 0.5)
    chunked.start(inputs.num_rows, n, 0.5)
    expected = whole.batch(inputs, whole.output_terms(inputs, grads))
    terms = None
    for kk in range(k):
        terms = chunked.output_terms(inputs, grads[kk : kk + 1], terms)
    got = chunked.batch(inputs, terms)
    assert got.keys() == expected.keys()
    for name, (numerator, count) in expected.items():
        assert got[name][1] == count
        lower = torch.tril if numerator.dim() == 2 else torch.clone  # δ is a scalar
        assert_close(lower(got[name][0]), lower(numerator), rtol=1e-12, what=name)


@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_gradient_rows_stay_per_example_blocks(calls: int, dtype: torch.dtype) -> None:
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    layout = LayerLayout("conv", conv, [conv.weight, conv.bias])
    grads = [torch.randn(2, 4, 3, 5, 5) for _ in range(calls)]  # [K, *output.shape]
    rows = grad_rows(layout, grads, dtype)
    expected = torch.cat([output_rows(conv, g, batch_axes=1) for g in grads], dim=2)
    assert torch.equal(rows, expected.to(dtype))
    assert example_blocks(rows) is not None  # no transposing copy was made
    if calls == 1 and dtype == torch.float32:
        assert rows.data_ptr() == grads[0].data_ptr()  # a view of the backward's result


ROW_LAYERS = [
    (nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1, dilation=1), (3, 7, 6)),
    (nn.Conv2d(3, 4, kernel_size=(2, 3), padding="same", dilation=2, bias=False), (3, 6, 7)),
    (nn.Conv1d(2, 3, kernel_size=3, stride=2), (2, 9)),
    (nn.Linear(5, 3), (4, 5)),
    (nn.Linear(5, 3, bias=False), (5,)),
]


@pytest.mark.parametrize("layer,shape", ROW_LAYERS, ids=[str(m) for m, _ in ROW_LAYERS])
@pytest.mark.parametrize("calls", [1, 2])
def test_layer_inputs_form_the_rows_in_chunks(layer: nn.Module, shape: tuple, calls: int) -> None:
    """Rows formed a chunk of examples at a time, their squared norms (without forming them) and
    their flavours (expand: every position; reduce: each example's mean) equal those of the
    whole batch unfolded at once, with every call's positions side by side."""
    layer = layer.double()
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    layout = LayerLayout("layer", layer, params)
    xs = [torch.randn(5, *shape, dtype=torch.float64) for _ in range(calls)]
    recorded = [LayerCall(x, layer(x), 0) for x in xs]
    inputs = LayerInputs.recorded(layout, recorded, torch.float64)
    expected = layout.homogeneous(torch.cat([layer_inputs(layer, x) for x in xs], dim=1))
    assert inputs.shape == expected.shape
    n, t, d = expected.shape
    for max_entries in (1, 2 * t * d, 1 << 20):  # one example per chunk, two, all
        chunks = list(inputs.chunks(max_entries))
        assert [start for start, _ in chunks] == list(range(0, n, chunks[0][1].shape[0]))
        formed = torch.cat([rows.clone() for _, rows in inputs.chunks(max_entries)])
        assert torch.equal(formed, expected)
    assert_close(inputs.squared_norms(), expected.square().sum(-1), rtol=1e-12, what="‖ā‖²")
    for reduce, rows in ((False, expected.reshape(-1, d)), (True, expected.mean(1))):
        flavour = InputRows(inputs, reduce)
        assert flavour.num_rows == rows.shape[0]
        got = torch.cat([chunk.clone() for _, chunk in flavour.chunks(2 * t * d)])
        assert_close(got, rows, rtol=1e-12, what=f"rows, reduce={reduce}")
        assert_close(flavour.squared_norms(), rows.square().sum(-1), rtol=1e-12, what="norms")
        weights = torch.rand(rows.shape[0], dtype=torch.float64)
        assert_close(input_gram(flavour, weights), rows.T @ (weights[:, None] * rows),
                     rtol=1e-12, what=f"weighted gram, reduce={reduce}")
        lower = input_gram(flavour, mirror=False, out=torch.ones(d, d, dtype=torch.float64))
        assert_close(lower.tril(), (rows.T @ rows).tril(), rtol=1e-12,
                     what=f"gram, reduce={reduce}")
    # One call of a linear layer: its Gram reads the recorded input, not a copy beside ones.
    features = inputs.features()
    if calls == 1 and isinstance(layer, nn.Linear):
        assert features is not None and features.data_ptr() == xs[0].data_ptr()
        assert torch.equal(features, expected[..., : layout.d_in])
        assert (InputRows(inputs, True).features() is None) == (t > 1)  # reduce: means
    else:
        assert features is None


CONV_LAYERS = [(layer, shape) for layer, shape in ROW_LAYERS if not isinstance(layer, nn.Linear)]


@pytest.mark.parametrize("layer,shape", CONV_LAYERS, ids=[str(m) for m, _ in CONV_LAYERS])
@pytest.mark.parametrize("bias", [False, True], ids=["weight", "weight+bias"])
def test_convolved_chunks_are_the_rows_times_the_basis(layer: nn.Module, shape: tuple,
                                                       bias: bool) -> None:
    """A convolution's rows times a basis, computed as a convolution with the basis columns as
    filters (the homogeneous coordinate's row as their bias), equal the formed rows times the
    basis, chunk by chunk; inputs of another dtype are converted first."""
    layer = layer.double()
    params = [layer.weight] + ([layer.bias] if bias and layer.bias is not None else [])
    layout = LayerLayout("layer", layer, params)
    x = torch.randn(5, *shape)  # float32, read in float64
    inputs = LayerInputs.recorded(layout, [LayerCall(x, layer(x.double()), 0)], torch.float64)
    rows = inputs.rows(0, 5)
    basis = torch.randn(7, layout.d_cols, dtype=torch.float64).T  # column-major, as from LAPACK
    last = basis[layout.d_in] if layout.has_bias else None
    chunks = inputs.convolved_chunks(basis[: layout.d_in], last, 2)
    assert chunks is not None
    got = list(chunks)
    assert [start for start, _ in got] == [0, 2, 4]
    assert_close(torch.cat([a for _, a in got]), rows @ basis, rtol=1e-12, what="ā U")
    # made contiguous once: a convolution copies strided filters on every call, slowly
    assert convolution_filters(layer, basis[: layout.d_in]).is_contiguous()


CORRELATED_LAYERS = [  # stride 1, a kernel of several offsets, and images large enough
    (nn.Conv2d(3, 4, kernel_size=3, padding=1), (3, 7, 6)),
    (nn.Conv2d(2, 3, kernel_size=5, padding="same"), (2, 6, 7)),
    (nn.Conv2d(2, 3, kernel_size=(2, 3), padding=(1, 2)), (2, 5, 6)),
    (nn.Conv2d(2, 2, kernel_size=3, padding=(2, 1), dilation=(2, 1)), (2, 6, 5)),
    (nn.Conv2d(2, 3, kernel_size=(1, 7), padding=(0, 3), bias=False), (2, 3, 8)),
    (nn.Conv1d(2, 3, kernel_size=7, padding="same"), (2, 9)),
]


@pytest.mark.parametrize("layer,shape", CORRELATED_LAYERS,
                         ids=[str(m) for m, _ in CORRELATED_LAYERS])
@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("budget", [(1 << 21, 1 << 24), (40, 300)], ids=["whole", "chunked"])
def test_correlation_gram_is_the_gram_of_the_rows(
    layer: nn.Module, shape: tuple, calls: int, budget: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stride-1 convolution's input Gram from the cell correlations of its input equals the
    Gram of its unfolded rows — with the homogeneous coordinate, over every call, and in bands
    of rows and chunks of examples as small as one (float32 inputs read in float64)."""
    monkeypatch.setattr(correlation, "BUFFER_ENTRIES", budget[0])
    monkeypatch.setattr(correlation, "INPUT_ENTRIES", budget[1])
    layer = layer.double()
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    layout = LayerLayout("layer", layer, params)
    xs = [torch.randn(5, *shape) for _ in range(calls)]
    assert all(correlation.correlation_pays(layer, x) for x in xs)
    recorded = [LayerCall(x, layer(x.double()), 0) for x in xs]
    inputs = LayerInputs.recorded(layout, recorded, torch.float64)
    rows = inputs.rows(0, 5).reshape(-1, layout.d_cols)
    got = inputs.correlation_gram()
    assert got is not None
    assert_close(got, rows.T @ rows, rtol=1e-12, what="Σ ā āᵀ")


PAYS = [  # (layer, input shape, whether the correlations apply and do less work)
    (nn.Conv2d(2, 3, kernel_size=3, padding=1), (2, 8, 8), True),
    (nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2), (2, 8, 8), False),  # strided
    (nn.Conv2d(2, 3, kernel_size=1), (2, 8, 8), False),  # one offset: the rows are the input
    (nn.Conv2d(2, 3, kernel_size=3), (2, 5, 5), False),  # 9 outputs for 25 inputs
    (nn.Conv1d(2, 3, kernel_size=3, padding=1), (2, 9), False),  # 3 shifts against 9 / 2
    (nn.Conv1d(2, 3, kernel_size=7, padding=3), (2, 9), True),
    (nn.Linear(4, 3), (5, 4), False),
]


@pytest.mark.parametrize("layer,shape,pays", PAYS, ids=[str(m) for m, _, _ in PAYS])
def test_correlations_only_where_they_pay(layer: nn.Module, shape: tuple, pays: bool) -> None:
    """The correlations serve stride-1 convolutions whose shifts over the input's positions
    cost well under the unfolded rows' lower triangle; every other layer forms its rows."""
    x = torch.randn(3, *shape)
    assert correlation.correlation_pays(layer, x) is pays
    layout = LayerLayout("layer", layer, [layer.weight, layer.bias])
    inputs = LayerInputs.recorded(layout, [LayerCall(x, layer(x), 0)], torch.float32)
    assert (inputs.correlation_gram() is not None) is pays


def test_convolved_chunks_only_for_one_convolution_call() -> None:
    """Rows that are not one call of a convolution's input are formed instead: a linear layer's,
    two calls' (weight tying) and a bias-only layer's."""
    conv, linear = nn.Conv1d(2, 3, kernel_size=3), nn.Linear(4, 3)
    x, z = torch.randn(2, 2, 6), torch.randn(2, 4)
    basis = torch.eye(7)

    def inputs(layer: nn.Module, params: list[Tensor], xs: list[Tensor]) -> LayerInputs:
        layout = LayerLayout("layer", layer, params)
        return LayerInputs.recorded(layout, [LayerCall(v, layer(v), 0) for v in xs],
                                    torch.float32)

    params = [conv.weight, conv.bias]
    assert inputs(conv, params, [x]).convolved_chunks(basis[:6], basis[6], 1) is not None
    assert inputs(conv, params, [x, x]).convolved_chunks(basis[:6], basis[6], 1) is None
    assert inputs(conv, [conv.bias], [x]).convolved_chunks(basis[:0], basis[0], 1) is None
    assert inputs(linear, [linear.weight], [z]).convolved_chunks(basis[:4], None, 1) is None


def test_reduce_rows_are_formed_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under reduce, the norms, the (weighted) Gram and the matrix all read the per-example
    means formed once, not the positions' rows again."""
    layer = nn.Conv2d(2, 3, kernel_size=3, padding=1).double()
    layout = LayerLayout("conv", layer, [layer.weight, layer.bias])
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    inputs = LayerInputs.recorded(layout, [LayerCall(x, layer(x), 0)], torch.float64)
    means = layout.homogeneous(layer_inputs(layer, x)).mean(1)
    formed = []
    rows = LayerInputs.rows
    monkeypatch.setattr(LayerInputs, "rows", lambda self, *a, **k: formed.append(a) or rows(
        self, *a, **k))
    flavour = InputRows(inputs, reduce=True)
    weights = torch.rand(4, dtype=torch.float64)
    assert_close(flavour.squared_norms(), means.square().sum(-1), rtol=1e-12, what="norms")
    assert_close(input_gram(flavour, weights), means.T @ (weights[:, None] * means), rtol=1e-12,
                 what="weighted gram")
    assert_close(input_gram(flavour), means.T @ means, rtol=1e-12, what="gram")
    matrix = flavour.matrix()
    matrix.mul_(2.0)  # a new tensor: the kept means stay
    assert_close(flavour.matrix(), means, rtol=1e-12, what="matrix")
    assert len(formed) == 1


def test_layer_inputs_refuse_an_input_changed_in_place() -> None:
    layer = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    x = torch.randn(4, 2, 5, 5)
    inputs = LayerInputs.recorded(LayerLayout("conv", layer, [layer.weight, layer.bias]),
                                  [LayerCall(x, layer(x), 0)], torch.float32)
    x.add_(1.0)
    with pytest.raises(ValueError, match="input of module 'conv' was modified in place"):
        inputs.rows(0, 4)
    with pytest.raises(ValueError, match="input of module 'conv' was modified in place"):
        inputs.squared_norms()
    with pytest.raises(ValueError, match="input of module 'conv' was modified in place"):
        inputs.correlation_gram()


def _input_rows(kind: str, gen: torch.Generator) -> InputRows:
    """Rows read as a linear layer's input (with a bias), a convolution's patches, or (reduce)
    a sequence's position means."""
    if kind == "conv":
        conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        x = torch.randn(4, 2, 5, 5, dtype=torch.float64, generator=gen)
        layout = LayerLayout("conv", conv, [conv.weight, conv.bias])
        return InputRows(LayerInputs(layout, [x], [25], torch.float64), reduce=False)
    layer = nn.Linear(6, 3)
    x = torch.randn(5, 4, 6, dtype=torch.float64, generator=gen)
    layout = LayerLayout("layer", layer, [layer.weight, layer.bias])
    return InputRows(LayerInputs(layout, [x], [4], torch.float64), reduce=kind == "reduce")


@pytest.mark.parametrize("accumulate", [False, True], ids=["written", "added"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_products_scale_by_alpha(accumulate: bool, weighted: bool) -> None:
    """Every route of gram, output_gram and input_gram scales its products by α: written over
    whatever ``out`` held (NaN here) or added to an earlier result."""
    gen = torch.Generator().manual_seed(2 * accumulate + weighted)
    alpha = 0.3

    def check(compute: Callable[..., Tensor], expected: Tensor, what: str) -> None:
        d = expected.shape[0]
        start = torch.randn(d, d, dtype=torch.float64, generator=gen) if accumulate else (
            torch.full((d, d), float("nan"), dtype=torch.float64))
        out = compute(out=start.clone(), accumulate=accumulate, alpha=alpha)
        base = start.tril() if accumulate else torch.zeros_like(start)
        assert_close(out.tril(), base + alpha * expected.tril(), rtol=1e-12, what=what)

    rows = torch.randn(23, 11, dtype=torch.float64, generator=gen)
    w = torch.rand(23, dtype=torch.float64, generator=gen) if weighted else None
    check(partial(gram, rows, w, width=4, mirror=False),
          rows.T @ (rows if w is None else w[:, None] * rows), "gram")
    grads = torch.randn(2, 5, 4, 7, dtype=torch.float64, generator=gen).transpose(2, 3)
    gw = torch.rand(5, 7, dtype=torch.float64, generator=gen) if weighted else None
    flat = grads.reshape(2, 35, 4)
    scale = torch.ones(35, dtype=torch.float64) if gw is None else gw.reshape(-1)
    check(partial(output_gram, grads, gw, chunk=50, mirror=False),
          torch.einsum("kmi,m,kmj->ij", flat, scale, flat), "output_gram, per-example blocks")
    for kind in ("linear", "conv", "reduce"):
        inputs = _input_rows(kind, gen)
        matrix = inputs.matrix()
        rw = torch.rand(matrix.shape[0], dtype=torch.float64, generator=gen) if weighted else None
        check(partial(input_gram, inputs, rw, mirror=False),
              matrix.T @ (matrix if rw is None else rw[:, None] * matrix), f"input_gram, {kind}")


@pytest.mark.parametrize("ema_decay", [None, 0.6])
@pytest.mark.parametrize("total", [False, True])
def test_running_sum_accumulator_equals_add(ema_decay: float | None, total: bool) -> None:
    """Batches added in place through accumulator() — the numerator decayed, α returned — read
    as those given to add()."""
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(5, 5, dtype=torch.float64, generator=gen) for _ in range(3)]
    added, in_place = RunningSum(ema_decay, total=total), RunningSum(ema_decay, total=total)
    with pytest.raises(ValueError, match="no numerator to add to"):
        in_place.accumulator(2.0)
    for i, batch in enumerate(batches):
        added.add(batch.clone(), 2.0 + i)
        if i == 0:
            in_place.add(batch.clone(), 2.0)
        else:
            numerator, alpha = in_place.accumulator(2.0 + i)
            numerator.add_(batch, alpha=alpha)
    assert in_place.count == pytest.approx(added.count, rel=1e-15)
    assert_close(in_place.value(), added.value(), rtol=1e-13, what="read")


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("feature_major", [False, True], ids=["row-major", "feature-major"])
def test_lower_gram_writes_the_lower_triangle(feature_major: bool, dtype: torch.dtype,
                                              accumulate: bool) -> None:
    """BLAS syrk: α RᵀR (+ what out held) on and below the diagonal, the rest left alone, with
    PyTorch's thread count for the BLAS during the call and the BLAS's own restored after."""
    from threadpoolctl import threadpool_info

    gen = torch.Generator().manual_seed(int(feature_major) + 2 * int(accumulate))
    m, d = 600, 130
    rows = (torch.randn(d, m, dtype=dtype, generator=gen).T if feature_major
            else torch.randn(m, d, dtype=dtype, generator=gen))
    assert syrk.syrk_pays(rows)
    held = torch.randn(d, d, dtype=dtype, generator=gen)
    out = held.clone()
    before = threadpool_info()
    assert syrk.lower_gram(rows, out, accumulate=accumulate, alpha=0.5) is out
    assert threadpool_info() == before
    expected = 0.5 * rows.double().T @ rows.double() + (held.double() if accumulate else 0.0)
    lower = torch.ones(d, d, dtype=torch.bool).tril()
    rtol = 1e-5 if dtype == torch.float32 else 1e-12  # sums of 600 products
    assert_close(out[lower].double(), expected[lower], rtol=rtol, what="lower triangle")
    assert torch.equal(out[~lower], held[~lower])
    with pytest.raises(ValueError, match="out must be a contiguous 130 × 130"):
        syrk.lower_gram(rows, torch.zeros(d + 1, d + 1, dtype=dtype)[:d, :d])


@pytest.mark.parametrize("rows,pays", [
    (torch.zeros(600, 128), True),
    (torch.zeros(128, 600).T, True),  # feature-major
    (torch.zeros(600, 128, dtype=torch.float64), True),
    (torch.zeros(600, 127), False),  # too few columns: the panels are faster
    (torch.zeros(500, 128), False),  # too little work for the call
    (torch.zeros(600, 256)[:, :128], False),  # neither layout contiguous
    (torch.zeros(600, 128, dtype=torch.float16), False),
    (torch.zeros(600, 128, requires_grad=True), False),
], ids=["row-major", "feature-major", "float64", "narrow", "small", "strided", "float16",
        "requires-grad"])
def test_syrk_only_where_it_pays(rows: Tensor, pays: bool) -> None:
    assert syrk.syrk_pays(rows) is pays
