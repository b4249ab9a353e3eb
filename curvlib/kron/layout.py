"""The homogeneous-coordinate layout of one layer: user vectors ↔ d_out × d_in' matrices.

Every Kronecker estimate works with a layer's parameters as one matrix
``[W | b] ∈ ℝ^{d_out × d_in'}`` (kfac_family.md §1.1): W = ``weight.view(d_out, -1)`` and, when the
bias is trainable, a last column b, so that d_in' = d_in + 1 and the layer input gets a trailing 1
(the homogeneous coordinate). A trainable bias with a frozen weight gives the one-column matrix
[b] (d_in' = 1, every input row is the constant 1); a frozen bias is not folded in.

Users never see this layout: vectors stay lists of tensors aligned with ``partition.parameters``
(weight flattened row-major, then bias) and dense matrices keep the dense order. The helpers here
convert between the two; the curvature blocks act on the matrix form ``V ↦ G V A``, which is the
row-major reading of ``(G ⊗ A) vec_r(V)`` (kfac_family.md §1.4, pitfall P1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class LayerLayout:
    """Where a covered layer's trainable tensors sit in the [W | b] matrix and in user vectors.

    Args:
        name: the module's name (the partition subset's name).
        module: an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``.
        params: the subset's tensors in partition order (the module's trainable weight and/or
            bias).

    Raises:
        ValueError: a tensor of the subset is neither the module's weight nor its bias.
    """

    def __init__(self, name: str, module: nn.Module, params: Sequence[Tensor]) -> None:
        self.name = name
        self.module = module
        self.params = list(params)
        weight = module.weight
        bias = module.bias
        self.has_weight = any(p is weight for p in self.params)
        self.has_bias = bias is not None and any(p is bias for p in self.params)
        for p in self.params:
            if p is not weight and p is not bias:
                raise ValueError(
                    f"Module {name!r}: parameter of shape {tuple(p.shape)} is neither its weight "
                    "nor its bias; Kronecker estimates cover only those two."
                )
        self.d_out: int = weight.shape[0]
        self.d_in: int = weight[0].numel() if self.has_weight else 0
        self.d_cols: int = self.d_in + int(self.has_bias)
        self.numel: int = self.d_out * self.d_cols

    def __repr__(self) -> str:
        return (f"LayerLayout({self.name!r}, d_out={self.d_out}, d_in={self.d_in}, "
                f"bias={self.has_bias})")

    def homogeneous(self, rows: Tensor) -> Tensor:
        """[N, T, d_in] input rows → [N, T, d_in'] (weight columns kept, a trailing 1 for b)."""
        parts = [rows] if self.has_weight else []
        if self.has_bias:
            parts.append(torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype, device=rows.device))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def to_matrix(self, tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """The subset's K vectors ([K, *p.shape] each, partition order) → [K, d_out, d_in']."""
        k = tensors[0].shape[0]
        columns = []
        for p, t in zip(self.params, tensors):
            if p is self.module.weight:
                columns.insert(0, t.reshape(k, self.d_out, self.d_in))
            else:
                columns.append(t.reshape(k, self.d_out, 1))
        return torch.cat(columns, dim=-1).to(dtype)

    def from_matrix(self, matrix: Tensor) -> list[Tensor]:
        """[K, d_out, d_in'] → the subset's tensors ([K, *p.shape], partition order, p's dtype)."""
        k = matrix.shape[0]
        out = []
        for p in self.params:
            weight = p is self.module.weight
            block = matrix[..., : self.d_in] if weight else matrix[..., self.d_in :]
            out.append(block.reshape(k, *p.shape).to(p.dtype))
        return out

    def dense_index(self) -> Tensor:
        """For every entry of the subset in dense order, its index in the row-major [W | b].

        ``M_user = M_matrix[index][:, index]`` turns a d_out·d_in' square matrix in the row-major
        layout into the dense order of the partition.
        """
        grid = torch.arange(self.numel).view(self.d_out, self.d_cols)
        pieces = []
        for p in self.params:
            if p is self.module.weight:
                pieces.append(grid[:, : self.d_in].reshape(-1))
            else:
                pieces.append(grid[:, self.d_in :].reshape(-1))
        return torch.cat(pieces)
