"""gram, squared_norms and their gradient-row forms: blocked, chunked and mirrored, or summed over
per-example blocks, they equal the plain products."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib.capture import LayerCall, output_rows
from curvlib.kron.collect import layer_data
from curvlib.kron.layout import LayerLayout
from curvlib.kron.statistics import (
    RunningSum,
    example_blocks,
    gram,
    mirror_lower,
    output_gram,
    output_squared_norms,
    squared_norms,
)
from curvlib.testing import assert_close


@pytest.mark.parametrize("feature_major", [False, True], ids=["row-major", "feature-major"])
@pytest.mark.parametrize("width,chunk", [(128, 1 << 20), (4, 1 << 20), (3, 7), (5, 1)])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_gram_equals_the_full_product(
    feature_major: bool, width: int, chunk: int, weighted: bool
) -> None:
    gen = torch.Generator().manual_seed(width + chunk)
    m, d = 23, 11
    rows = torch.randn(d, m, dtype=torch.float64, generator=gen).T if feature_major else (
        torch.randn(m, d, dtype=torch.float64, generator=gen))
    weights = torch.rand(m, dtype=torch.float64, generator=gen) if weighted else None
    expected = rows.T @ (rows if weights is None else weights[:, None] * rows)
    got = gram(rows, weights, width=width, chunk=chunk)
    assert_close(got, expected, rtol=1e-12, what="gram")
    lower = gram(rows, weights, width=width, chunk=chunk, mirror=False)
    assert_close(lower.tril(), expected.tril(), rtol=1e-12, what="lower storage")
    for mirror, result in ((True, got), (False, lower)):  # written over whatever out held
        out = torch.full((d, d), float("nan"), dtype=torch.float64)
        assert gram(rows, weights, width=width, chunk=chunk, mirror=mirror, out=out) is out
        assert torch.equal(out, result)


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
    assert_close(output_squared_norms(grads, chunk=chunk), rows.square().sum((0, 2)).view(n, t),
                 rtol=1e-12, what="Σ_k ‖g‖²")


@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_gradient_rows_stay_per_example_blocks(calls: int, dtype: torch.dtype) -> None:
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    layout = LayerLayout("conv", conv, [conv.weight, conv.bias])
    x = torch.randn(4, 2, 5, 5)
    recorded = [LayerCall(x, conv(x), 0) for _ in range(calls)]
    grads = [torch.randn(2, 4, 3, 5, 5) for _ in range(calls)]  # [K, *output.shape]
    data = layer_data(layout, recorded, grads, dtype)
    expected = torch.cat([output_rows(conv, g, batch_axes=1) for g in grads], dim=2)
    assert torch.equal(data.grads, expected.to(dtype))
    assert example_blocks(data.grads) is not None  # no transposing copy was made
    if calls == 1 and dtype == torch.float32:
        assert data.grads.data_ptr() == grads[0].data_ptr()  # a view of the backward's result
