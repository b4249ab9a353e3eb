"""The lower triangle of a Gram RᵀR on CPU through BLAS ``?syrk``.

A Gram is symmetric, so half its entries suffice; PyTorch has no symmetric rank-k update, and
:func:`~curvlib.kron.statistics.gram` gets close to half by cutting the columns into panels, each
a wide matrix product down to the diagonal (2/3 of the full product's multiply-adds in three
panels, 3/5 in five), narrower panels losing more to the products' lower rate than they save.
BLAS ``ssyrk``/``dsyrk`` computes one triangle at nearly the rate of a full product; SciPy ships
it (``scipy.linalg.blas``) over the BLAS it was built with.

Measured (AMD EPYC, 1 thread, SciPy 1.17's OpenBLAS against PyTorch 2.13's MKL, float32): for
d ≥ 128 columns ``ssyrk`` takes 0.61–0.98 of the panels' time (d = 289, the rows of W2's second
convolution: 0.62–0.83; d = 2049: 0.66–0.74), for d ≤ 96 up to 1.6× as long at 2048 rows and more;
so it runs from 128 columns and 2²³ multiply-adds up.

The BLAS runs with PyTorch's thread count (``torch.get_num_threads()``, set through
``threadpoolctl`` for the call and restored after), not its own default of every core.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController
from torch import Tensor

MIN_COLUMNS = 128
MIN_WORK = 1 << 23  # multiply-adds of the full product m·d²
_SYRK = {torch.float32: blas.ssyrk, torch.float64: blas.dsyrk}
_libraries: list[Any] | None = None  # threadpoolctl's controllers of the loaded BLAS libraries


@contextmanager
def _blas_threads(threads: int) -> Iterator[None]:
    """Run the block with the BLAS libraries at ``threads`` threads, each restored after (a
    library already there is left alone: two calls into it, ≈ 1 µs, instead of the ≈ 12 µs of a
    ``threadpoolctl`` limit)."""
    global _libraries
    if _libraries is None:  # scanned once; SciPy's BLAS is loaded by the import above
        _libraries = ThreadpoolController().select(user_api="blas").lib_controllers
    changed = [(lib, lib.get_num_threads()) for lib in _libraries
               if lib.get_num_threads() != threads]
    for lib, _ in changed:
        lib.set_num_threads(threads)
    try:
        yield
    finally:
        for lib, held in changed:
            lib.set_num_threads(held)


def syrk_pays(rows: Tensor) -> bool:
    """Whether :func:`lower_gram` takes rows [M, d]: on CPU, float32 or float64, stored row-major
    or feature-major (one of their axes contiguous), from :data:`MIN_COLUMNS` columns and
    :data:`MIN_WORK` multiply-adds."""
    m, d = rows.shape
    return (rows.device.type == "cpu" and rows.dtype in _SYRK and not rows.requires_grad
            and rows.stride() in ((d, 1), (1, m)) and d >= MIN_COLUMNS and m * d * d >= MIN_WORK)


def lower_gram(rows: Tensor, out: Tensor, accumulate: bool = False, alpha: float = 1.0) -> Tensor:
    """α RᵀR for rows R [M, d] written (or, with ``accumulate``, added) into the lower triangle
    of ``out`` (d × d, row-major, the rows' dtype); the strict upper triangle is left as it was.
    The rows must pass :func:`syrk_pays`.

    ``out``'s row-major lower triangle is the column-major upper one that ``?syrk`` writes, with
    R as the column-major Rᵀ (row-major rows, ``trans=0``) or R (feature-major rows, ``trans=1``):
    no copy either way.
    """
    d = rows.shape[1]
    if out.shape != (d, d) or not out.is_contiguous() or out.dtype != rows.dtype:
        raise ValueError(f"lower_gram: out must be a contiguous {d} × {d} {rows.dtype} matrix, "
                         f"got {tuple(out.shape)} {out.dtype}.")
    row_major = rows.stride() == (d, 1)
    matrix = rows.detach().numpy()
    target = out.detach().numpy().T  # column-major view of the same memory
    with _blas_threads(torch.get_num_threads()):
        written = _SYRK[rows.dtype](alpha, matrix.T if row_major else matrix,
                                    beta=1.0 if accumulate else 0.0, c=target,
                                    trans=0 if row_major else 1, lower=0, overwrite_c=1)
    if written.ctypes.data != target.ctypes.data:  # a wrapper that copied: write back
        target[...] = written
    return out
