"""A stride-1 convolution's input Gram from shifted cross-correlations of its input.

K-FAC's input factor of a convolution (expand, kfac_family.md §2.3) sums the outer products of
its unfolded receptive fields: with x̃ the zero-padded input, an output position p and kernel
offsets a, b (dilation included),

    Σ_{n,p} ā_{n,p} ā_{n,p}ᵀ,   block (a, b) = Σ_n Σ_{p ∈ O} x̃_n[p + a] x̃_n[p + b]ᵀ   (C × C).

At stride 1 the block depends on a and b through their difference d = b − a and through the
window the output grid O cuts from the input: with q = p + a running over the input positions,

    block (a, b) = Σ_n Σ_{q ∈ Wₐ} x_n[q] x_n[q + d]ᵀ,   Wₐ = (O + a) ∩ image,

as x̃ vanishes outside the image. The windows Wₐ are rectangles that differ only near the
image's border: their edges cut the image's rows into a few segments (three for a 3 × 3 kernel
with padding 1: the first row, the inner rows and the last row) and its columns likewise, so
every window is a union of cells (row segment × column segment). Hence every block is a sum of
the *cell correlations* F_cell(d) = Σ_n Σ_{q ∈ cell} x_n[q] x_n[q + d]ᵀ, and the blocks with
b − a = −d are the transposes of those with d. For a kh × kw kernel that is
kw + (kh − 1)(2kw − 1) shifts (13 for 3 × 3) of C² multiply-adds per input position and example,
against (kh·kw·C)²/2 for the lower triangle of the unfolded rows' Gram (40.5 C² for 3 × 3): about
3× fewer multiply-adds, and no unfolded rows.

This is the Gram as the unfolded rows give it — every entry is the same sum over the batch and the
positions, summed in another order — not an approximation: the border terms the shift structure
would blur are exactly what the cells keep apart. It needs stride 1 (the rows of a strided
convolution read the input on a coarser grid, where the shift structure only holds per phase);
TKFAC's Φ_raw weighs every row by its output position, which breaks the structure, and reduce rows
are each example's mean, already cheap, so both keep the unfolded rows.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn

from curvlib.capture import conv_padding

#: Entries of the shifted-copy buffer per product (a few MiB in float32): big enough for wide
#: products, small enough to stay in cache between being written and being multiplied.
BUFFER_ENTRIES = 1 << 21

#: Entries of the transposed input per chunk of examples, which bounds the temporaries of a large
#: batch of large images.
INPUT_ENTRIES = 1 << 24


def _geometry(module: nn.Conv1d | nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int],
                                                     list[tuple[int, int]]]:
    """(kernel, dilation, (before, after) padding per axis) as a 2-d convolution's: a 1-d one
    is a 2-d one on images of one row."""
    if isinstance(module, nn.Conv1d):
        return ((1, module.kernel_size[0]), (1, module.dilation[0]),
                [(0, 0), *conv_padding(module, 1)])
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    return (kh, kw), (dh, dw), conv_padding(module, 2)


def num_shifts(kernel: tuple[int, int]) -> int:
    """The shifts d = b − a of two kernel offsets, one of each ± pair: d = 0 and the d_w > 0 of
    the first kernel row, then every d_w for each further row."""
    kh, kw = kernel
    return kw + (kh - 1) * (2 * kw - 1)


def correlation_pays(module: nn.Module, x: Tensor) -> bool:
    """Whether :func:`add_correlation_gram` applies to this layer and input and does less work
    than the Gram of the unfolded rows: a convolution of stride 1 with a kernel of more than one
    offset whose shifted correlations over the input's positions take under 40% of the
    multiply-adds of the unfolded rows' lower triangle over the output positions."""
    if not isinstance(module, nn.Conv1d | nn.Conv2d) or any(s != 1 for s in module.stride):
        return False
    kernel, dilation, pads = _geometry(module)
    offsets = kernel[0] * kernel[1]
    if offsets == 1:
        return False
    image = x.shape[2:] if isinstance(module, nn.Conv2d) else (1, x.shape[2])
    positions = outputs = 1
    for size, k, dil, (before, after) in zip(image, kernel, dilation, pads):
        positions *= size
        outputs *= max(0, size + before + after - dil * (k - 1))
    return num_shifts(kernel) * positions < 0.4 * offsets * offsets * outputs / 2


def _segments(k: int, dilation: int, before: int, outputs: int, size: int
              ) -> tuple[list[tuple[int, int]], Tensor]:
    """Along one axis: the segments of the image's positions that the windows of the k kernel
    offsets cut, and the [k, segments] 0/1 matrix of which segments each window covers.

    Offset i reads input position o + i·dilation − before at output position o, so its window
    is [i·dilation − before, i·dilation − before + outputs) within [0, size).
    """
    windows = [(max(0, i * dilation - before), min(size, i * dilation - before + outputs))
               for i in range(k)]
    cuts = sorted({0, size} | {min(max(v, 0), size) for window in windows for v in window})
    segments = [(lo, hi) for lo, hi in pairwise(cuts) if hi > lo]
    covers = torch.tensor([[float(lo <= s0 and s1 <= hi) for s0, s1 in segments]
                           for lo, hi in windows])
    return segments, covers


def _shift_index(kernel: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """For every pair of kernel offsets (a, b) in weight order: the earlier one, min(a, b), the
    shift from it to the later one (its index in :func:`num_shifts`' order), and whether a comes
    after b (the block is then the transpose)."""
    kh, kw = kernel
    a = torch.arange(kh * kw)
    first, last = torch.minimum(a[:, None], a[None, :]), torch.maximum(a[:, None], a[None, :])
    rows, cols = last // kw - first // kw, last % kw - first % kw
    shift = torch.where(rows == 0, cols, kw + (rows - 1) * (2 * kw - 1) + cols + kw - 1)
    return first.reshape(-1), shift.reshape(-1), (a[:, None] > a[None, :]).reshape(-1)


def add_correlation_gram(module: nn.Conv1d | nn.Conv2d, x: Tensor, out: Tensor) -> Tensor:
    """Add Σ_{n,p} a_{n,p} a_{n,p}ᵀ of the unfolded rows of one call's input x (no homogeneous
    coordinate) to ``out`` [d_in, d_in] (any strides; its dtype is the computation's) and return
    it, from the cell correlations of x (module docstring); needs :func:`correlation_pays`.

    Layout: the input transposed to [C, rows, columns, N] — examples innermost, so that a range
    of image rows of one column segment is one contiguous range of (row, column, example) — with
    zeros around it for the shifts that leave the image. A buffer holds the 2kw − 1 column
    shifts of a band of rows side by side; a row shift is then an offset within it, so that one
    product per kernel row, [C, K] × [K, (2kw − 1)·C], gives a cell's correlations for all its
    column shifts.
    """
    (kh, kw), (dh, dw), ((top, bottom), (before, after)) = _geometry(module)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
    n, c, h, w = x.shape
    dtype, device = out.dtype, out.device
    row_segments, row_covers = _segments(kh, dh, top, h + top + bottom - dh * (kh - 1), h)
    col_segments, col_covers = _segments(kw, dw, before, w + before + after - dw * (kw - 1), w)
    shifts = num_shifts((kh, kw))
    below, beside = (kh - 1) * dh, (kw - 1) * dw
    cells = torch.zeros(len(row_segments), len(col_segments), c, shifts * c, dtype=dtype,
                        device=device)
    step = max(1, min(n, INPUT_ENTRIES // (c * (h + below) * (w + 2 * beside))))
    for start in range(0, n, step):
        m = min(step, n - start)
        image = x.new_zeros(c, h + below, w + 2 * beside, m, dtype=dtype)
        # one plain 2-d transpose: ~2× faster than a 4-d permuting copy into the padded tensor
        image[:, :h, beside : beside + w] = (
            x[start : start + m].reshape(m, -1).T.contiguous().view(c, h, w, m))
        _add_cells(image, cells, row_segments, col_segments, (kh, kw), (dh, dw), h)
    covers = (row_covers[:, None, :, None] * col_covers[None, :, None, :]).reshape(kh * kw, -1)
    windows = covers.to(dtype=dtype, device=device) @ cells.view(covers.shape[1], -1)
    first, shift, after = (t.to(device) for t in _shift_index((kh, kw)))
    blocks = windows.view(kh * kw, c, shifts, c).transpose(1, 2)[first, shift]
    blocks = torch.where(after[:, None, None], blocks.transpose(1, 2), blocks)
    k = kh * kw
    target = out.view(c, k, c, k).permute(1, 3, 0, 2)  # block (a, b) of channels (c, c')
    target.add_(blocks.view(k, k, c, c))
    return out


def _add_cells(image: Tensor, cells: Tensor, row_segments: list[tuple[int, int]],
               col_segments: list[tuple[int, int]], kernel: tuple[int, int],
               dilation: tuple[int, int], h: int) -> None:
    """Add the cell correlations of one chunk of examples, ``image`` [C, rows, columns, m]
    (padded below and beside), to ``cells`` [row segments, column segments, C, shifts·C]."""
    (kh, kw), (dh, dw) = kernel, dilation
    c, _, _, m = image.shape
    col_shifts, below = 2 * kw - 1, (kh - 1) * dh
    stride = image.stride()
    bands = [max(1, BUFFER_ENTRIES // (col_shifts * c * (c1 - c0) * m)) for c0, c1 in col_segments]
    storage = image.new_empty(max(col_shifts * c * (min(band, h) + below) * (c1 - c0) * m
                                  for band, (c0, c1) in zip(bands, col_segments)))
    for si, ((c0, c1), band) in enumerate(zip(col_segments, bands)):
        width = c1 - c0
        row = width * m  # entries of one image row of the segment, per channel and shift
        for h0 in range(0, h, band):
            h1 = min(h, h0 + band)
            rows = h1 - h0 + below
            # buffer[j, ch, (r, col, n)] = image[ch, h0 + r, c0 + col + j·dw, n]: column shift
            # (j − kw + 1)·dw of the segment, rows h0 … h1 and the rows a row shift reaches
            buffer = storage[: col_shifts * c * rows * row].view(col_shifts, c, rows * row)
            buffer.view(col_shifts, c, rows, width, m).copy_(image.as_strided(
                (col_shifts, c, rows, width, m), (dw * stride[2], *stride),
                h0 * stride[1] + c0 * stride[2]))
            for ri, (r0, r1) in enumerate(row_segments):
                lo, hi = max(r0, h0) - h0, min(r1, h1) - h0
                if hi <= lo:
                    continue
                left = buffer[kw - 1, :, lo * row : hi * row]
                for i in range(kh):
                    # row shift i·dh: from column shift 0 on in the first kernel row (the
                    # negative ones are the transposes), every column shift after it
                    first = kw - 1 if i == 0 else 0
                    column = 0 if i == 0 else kw + (i - 1) * col_shifts
                    count = col_shifts - first
                    right = buffer[first:, :, (lo + i * dh) * row : (hi + i * dh) * row]
                    cells[ri, si, :, column * c : (column + count) * c].addmm_(
                        left, right.reshape(count * c, -1).T)
