"""Partitions of a model's parameters into S subsets, and parameter-aligned vectors.

A *partition* splits the trainable parameters θ ∈ ℝ^P into S disjoint subsets T_1..T_S, each a
list of whole tensors (Wolinski, arXiv 2312.03885, §1.1). Every curvature estimate in curvlib is
defined over one partition:

* vectors over the parameters are Python lists of tensors aligned with ``partition.parameters``
  (the tensors of all subsets, subset by subset, each subset in its own order);
* the *dense order* of a P-vector or a P×P matrix is
  ``torch.cat([p.flatten() for p in partition.parameters])`` (row-major flatten of each tensor).

The helpers here (``flatten``, ``unflatten``, ``add``, ``scale``, ``dot``, ``subset_dots``,
``restrict``) validate their arguments so that a vector built for another partition, in another
order or with another shape raises a ``ValueError`` naming the offending tensor instead of producing
a silently wrong answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

Vector = list[Tensor]


class Partition:
    """A partition of parameter tensors into named subsets.

    Args:
        groups: one list of parameter tensors per subset. A tensor may appear only once.
        names: one name per subset; defaults to ``"group0"``, ``"group1"``, ...

    Attributes:
        groups: the subsets, as lists of tensors.
        names: the subset names.
        parameters: all tensors, subset by subset (the order of every parameter-aligned vector).
        parameter_names: a name per tensor, ``"<subset name>[i]"`` unless built from a model.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[Tensor]],
        names: Sequence[str] | None = None,
        parameter_names: Sequence[str] | None = None,
    ) -> None:
        groups = [list(group) for group in groups]
        if not groups:
            raise ValueError("Partition needs at least one subset; got an empty list of groups.")
        if names is None:
            names = [f"group{s}" for s in range(len(groups))]
        names = list(names)
        if len(names) != len(groups):
            raise ValueError(f"Partition got {len(groups)} groups but {len(names)} names.")
        if len(set(names)) != len(names):
            raise ValueError(f"Partition names must be unique; got {names}.")
        seen: set[int] = set()
        for name, group in zip(names, groups):
            if not group:
                raise ValueError(f"Partition subset {name!r} is empty.")
            for tensor in group:
                if not isinstance(tensor, Tensor):
                    raise ValueError(
                        f"Partition subset {name!r} holds a {type(tensor).__name__}, not a tensor."
                    )
                if id(tensor) in seen:
                    raise ValueError(
                        f"A parameter of shape {tuple(tensor.shape)} appears twice in the "
                        f"partition (again in subset {name!r}); subsets must be disjoint."
                    )
                seen.add(id(tensor))
        self.groups: list[list[Tensor]] = groups
        self.names: list[str] = names
        self.parameters: list[Tensor] = [p for group in groups for p in group]
        if parameter_names is None:
            parameter_names = [f"{n}[{i}]" for n, g in zip(names, groups) for i in range(len(g))]
        parameter_names = list(parameter_names)
        if len(parameter_names) != len(self.parameters):
            raise ValueError(
                f"Partition got {len(parameter_names)} parameter names for "
                f"{len(self.parameters)} parameters."
            )
        self.parameter_names: list[str] = parameter_names
        self.subset_of: list[int] = [s for s, group in enumerate(groups) for _ in group]
        """For each tensor of ``parameters``, the index of its subset."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def by_module(
        cls, model: nn.Module, modules: Iterable[nn.Module] | None = None
    ) -> Partition:
        """One subset per module that directly owns trainable parameters (weight and bias together).

        Args:
            model: the model.
            modules: restrict to these modules (in the model's order); every one must own
                trainable parameters.
        """
        wanted = None if modules is None else {id(m) for m in modules}
        groups, names, pnames = [], [], []
        seen: set[int] = set()
        found: set[int] = set()
        for name, module in model.named_modules():
            if wanted is not None and id(module) not in wanted:
                continue
            own = [
                (pname, p)
                for pname, p in module.named_parameters(recurse=False)
                if p.requires_grad and id(p) not in seen
            ]
            if wanted is not None:
                found.add(id(module))
            if not own:
                if wanted is not None:
                    raise ValueError(
                        f"Module {name or type(module).__name__!r} owns no trainable parameters "
                        "and cannot be a subset."
                    )
                continue
            seen.update(id(p) for _, p in own)
            groups.append([p for _, p in own])
            names.append(name or type(module).__name__)
            pnames.extend(f"{name}.{pname}" if name else pname for pname, _ in own)
        if wanted is not None and found != wanted:
            raise ValueError("Partition.by_module: some of the given modules are not in the model.")
        if not groups:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to partition.")
        return cls(groups, names, pnames)

    @classmethod
    def by_tensor(cls, model: nn.Module) -> Partition:
        """One subset per trainable parameter tensor (Wolinski's canonical partition)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to partition.")
        return cls([[p] for _, p in named], [n for n, _ in named], [n for n, _ in named])

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        return f"Partition(S={len(self)}, P={self.numel}, names={self.names})"

    @property
    def sizes(self) -> list[int]:
        """Number of scalar parameters in each subset."""
        return [sum(p.numel() for p in group) for group in self.groups]

    @property
    def numel(self) -> int:
        """P, the total number of scalar parameters."""
        return sum(p.numel() for p in self.parameters)

    @property
    def subset_slices(self) -> list[slice]:
        """For each subset, its slice in the dense order."""
        slices, start = [], 0
        for size in self.sizes:
            slices.append(slice(start, start + size))
            start += size
        return slices

    @property
    def device(self) -> torch.device:
        return self.parameters[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.parameters[0].dtype

    # ------------------------------------------------------------------ vectors
    def check_vector(self, vector: Sequence[Tensor], name: str = "vector") -> Vector:
        """Return ``vector`` as a list after checking it is aligned with ``parameters``.

        Raises:
            ValueError: wrong number of tensors, or a tensor whose shape differs from its parameter.
        """
        if isinstance(vector, Tensor) or not isinstance(vector, Sequence):
            raise ValueError(
                f"{name} must be a list of tensors aligned with partition.parameters, "
                f"got {type(vector).__name__}."
            )
        if len(vector) != len(self.parameters):
            raise ValueError(
                f"{name} has {len(vector)} tensors but the partition has "
                f"{len(self.parameters)} parameters ({len(self)} subsets)."
            )
        for i, (v, p) in enumerate(zip(vector, self.parameters)):
            if not isinstance(v, Tensor):
                raise ValueError(f"{name}[{i}] is a {type(v).__name__}, not a tensor.")
            if v.shape != p.shape:
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(v.shape)} but parameter "
                    f"{self.parameter_names[i]!r} has shape {tuple(p.shape)}: the vector does not "
                    "match the partition (shape or order)."
                )
        return list(vector)

    def check_batched_vector(self, vectors: Sequence[Tensor], name: str = "vectors") -> int:
        """Check a batch of K vectors stored as tensors of shape [K, *p.shape]; return K."""
        if len(vectors) != len(self.parameters):
            raise ValueError(
                f"{name} has {len(vectors)} tensors but the partition has "
                f"{len(self.parameters)} parameters."
            )
        k = vectors[0].shape[0]
        for i, (v, p) in enumerate(zip(vectors, self.parameters)):
            if v.shape != (k, *p.shape):
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(v.shape)}, expected {(k, *p.shape)} for "
                    f"parameter {self.parameter_names[i]!r}."
                )
        return k

    def flatten(self, vector: Sequence[Tensor]) -> Tensor:
        """Concatenate a parameter-aligned vector into a P-vector in the dense order."""
        vector = self.check_vector(vector)
        return torch.cat([v.reshape(-1) for v in vector])

    def flatten_batched(self, vectors: Sequence[Tensor]) -> Tensor:
        """[K, *p.shape] tensors → a K×P matrix in the dense order."""
        k = self.check_batched_vector(vectors)
        return torch.cat([v.reshape(k, -1) for v in vectors], dim=1)

    def unflatten(self, flat: Tensor) -> Vector:
        """Split a P-vector in the dense order into a parameter-aligned vector."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(
                f"unflatten expects a 1-D tensor of {self.numel} entries, got shape "
                f"{tuple(flat.shape)}."
            )
        out, start = [], 0
        for p in self.parameters:
            out.append(flat[start : start + p.numel()].view_as(p))
            start += p.numel()
        return out

    def unflatten_batched(self, flat: Tensor) -> Vector:
        """A K×P matrix in the dense order → [K, *p.shape] tensors."""
        if flat.dim() != 2 or flat.shape[1] != self.numel:
            raise ValueError(
                f"unflatten_batched expects a K×{self.numel} matrix, got {tuple(flat.shape)}."
            )
        out, start = [], 0
        for p in self.parameters:
            out.append(flat[:, start : start + p.numel()].reshape(flat.shape[0], *p.shape))
            start += p.numel()
        return out

    def zeros(self) -> Vector:
        """The zero vector, on the parameters' devices and dtypes."""
        return [torch.zeros_like(p) for p in self.parameters]

    def add(self, a: Sequence[Tensor], b: Sequence[Tensor], alpha: float = 1.0) -> Vector:
        """a + alpha·b."""
        a, b = self.check_vector(a, "a"), self.check_vector(b, "b")
        return [x + alpha * y for x, y in zip(a, b)]

    def scale(self, a: Sequence[Tensor], factor: float | Tensor) -> Vector:
        """factor·a, where factor is a scalar or an S-vector (one factor per subset)."""
        a = self.check_vector(a, "a")
        if isinstance(factor, Tensor) and factor.dim() == 1:
            if factor.numel() != len(self):
                raise ValueError(
                    f"scale got {factor.numel()} per-subset factors for {len(self)} subsets."
                )
            return [x * factor[s].to(x.dtype) for x, s in zip(a, self.subset_of)]
        return [x * factor for x in a]

    def dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        """⟨a, b⟩ over all parameters."""
        a, b = self.check_vector(a, "a"), self.check_vector(b, "b")
        return sum((torch.sum(x * y) for x, y in zip(a, b)), torch.zeros((), dtype=a[0].dtype))

    def subset_dots(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        """The S-vector of per-subset inner products ⟨a_s, b_s⟩."""
        a, b = self.check_vector(a, "a"), self.check_vector(b, "b")
        out = torch.zeros(len(self), dtype=a[0].dtype, device=a[0].device)
        for x, y, s in zip(a, b, self.subset_of):
            out[s] = out[s] + torch.sum(x * y)
        return out

    def restrict(self, vector: Sequence[Tensor], subset: int) -> Vector:
        """u^{(s)}: the vector with every tensor outside subset ``subset`` set to zero."""
        vector = self.check_vector(vector)
        if not 0 <= subset < len(self):
            raise ValueError(f"subset index {subset} out of range for {len(self)} subsets.")
        return [v if s == subset else torch.zeros_like(v) for v, s in zip(vector, self.subset_of)]

    def block_directions(self, vector: Sequence[Tensor]) -> Tensor:
        """The S×P matrix V whose row s is u^{(s)} in the dense order (V = I_{S:P}·Diag(u))."""
        flat = self.flatten(vector)
        rows = torch.zeros(len(self), self.numel, dtype=flat.dtype, device=flat.device)
        for s, sl in enumerate(self.subset_slices):
            rows[s, sl] = flat[sl]
        return rows

    def parameters_of(self, subset: int) -> list[Tensor]:
        return self.groups[subset]
