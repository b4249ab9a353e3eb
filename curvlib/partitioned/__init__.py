"""Wolinski's partitioned derivative tensors and the steps built on them (arXiv 2312.03885).

* :func:`partitioned_derivatives` → :class:`PartitionedDerivatives`: the exact ḡ (S), H̄ (S×S)
  and D̄ (diagonal or full S×S×S) of a loss along a direction on a partition of the parameters;
* :meth:`PartitionedDerivatives.learning_rates` (the Newton step on the partition) and
  :meth:`PartitionedDerivatives.cubic_step` (the anisotropic cubic step, by
  :func:`solve_cubic_step`).
"""

from curvlib.partitioned.cubic import CubicStepResult, solve_cubic_step
from curvlib.partitioned.derivatives import PartitionedDerivatives, partitioned_derivatives

__all__ = [
    "CubicStepResult",
    "PartitionedDerivatives",
    "partitioned_derivatives",
    "solve_cubic_step",
]
