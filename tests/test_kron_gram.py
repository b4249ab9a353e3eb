"""gram and squared_norms: blocked, chunked and mirrored, they equal the plain products."""

from __future__ import annotations

import pytest
import torch

from curvlib.kron.statistics import gram, squared_norms
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


@pytest.mark.parametrize("feature_major", [False, True], ids=["row-major", "feature-major"])
@pytest.mark.parametrize("chunk", [1, 20, 1 << 18])
def test_squared_norms_in_chunks(feature_major: bool, chunk: int) -> None:
    gen = torch.Generator().manual_seed(chunk)
    rows = torch.randn(6, 17, dtype=torch.float64, generator=gen)
    rows = rows.T if feature_major else rows.reshape(17, 6)
    assert_close(squared_norms(rows, chunk), rows.square().sum(-1), rtol=1e-12, what="‖r‖²")
