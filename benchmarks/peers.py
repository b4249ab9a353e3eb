"""Adapters that compute peer libraries' Kronecker-factored curvature on a benchmark workload.

Every adapter turns (library, method, Fisher type, weight-sharing flavour, workload) into a
*runner*: one call ``run(lap)`` computes the curvature statistics of the batch, calls ``lap()``,
then computes the eigendecompositions of the Kronecker factors (plus the EKFAC diagonal for
EKFAC) — the work curvlib's estimates do for one ``update`` followed by ``refresh``. Where a
library does both in one call (NNGeometry's and ASDL's EKFAC), ``lap`` is not called. Set-up
that a user does once per model (``backpack.extend``, copying the model) happens in
:func:`prepare`, outside the runner; a runner leaves no state behind (gradients, attached
factors), so that every run starts alike. A case a library cannot express raises
:class:`Unsupported` with the reason; a case it should express but fails on at run time is caught
by the caller and recorded the same way.

Per library (written from each peer's documented public API):

* **curvlinops** — ``KFACLinearOperator`` / ``EKFACLinearOperator`` with ``fisher_type`` ∈
  {mc, type-2, empirical}, ``mc_samples=1``, ``kfac_approx`` ∈ {expand, reduce}, bias folded into
  the weight (``separate_weight_and_bias=False``, as in curvlib), no determinism check.
  ``compute_kronecker_factors()`` builds A and G. The eigendecompositions of K-FAC are forced
  through ``KFACInverseLinearOperator(..., use_exact_damping=True)`` applied to one vector;
  EKFAC's ``compute_eigenvalue_correction()`` does the eigendecompositions and the extra
  forward/backward pass for the diagonal.
* **BackPACK** — ``extend`` the model and loss, then one backward inside
  ``with backpack(KFAC())`` (MC, one sample) or ``KFLR()`` (type-2); the factors it stores on
  each parameter are then eigendecomposed with ``torch.linalg.eigh``. No empirical-Fisher K-FAC,
  no EKFAC, no reduce flavour, and only ``nn.Sequential`` of supported layers.
* **NNGeometry** — ``FIM`` (closed-form expectation over the classes: type-2) or
  ``FIM_MonteCarlo`` (``trials=1``: MC) with ``PMatKFAC`` followed by
  ``compute_eigendecomposition()``, or ``PMatEKFAC`` (eigendecomposes on construction) followed by
  ``update_diag`` for the EKFAC diagonal. No empirical Fisher, no reduce flavour.
* **ASDL** — ``get_fisher_maker`` with ``FisherConfig(fisher_type=mc|exact|emp,
  fisher_shapes=[SHAPE_KRON])``; the A/B factors it attaches to each module are then
  eigendecomposed. For EKFAC, ``SHAPE_KFE`` computes the eigenbases and the diagonal in the same
  pass (from the same batch). Models are fed as 2-D logits ([N·T, C] for W3) because ASDL takes
  the softmax over the last axis. Expand flavour only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from workloads import Workload, kron_modules

Lap = Callable[[], None]
Runner = Callable[[Lap], None]

PEERS: tuple[str, ...] = ("curvlinops", "backpack", "nngeometry", "asdl")
METHODS: tuple[str, ...] = ("KFAC", "EKFAC")
FISHERS: tuple[str, ...] = ("mc", "type2", "empirical")
DAMPING = 1e-3


class Unsupported(Exception):
    """The library cannot compute this case; the message says why (short, for a table cell)."""


def _eigh_all(factors: list[Tensor]) -> None:
    for factor in factors:
        torch.linalg.eigh(factor)


def _covered_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in kron_modules(model) for p in m.parameters()]


def _loss_terms(targets: Tensor) -> int:
    """Loss terms per example: 1 for classification, T for per-token targets [N, T]."""
    return targets[0].numel()


# ---------------------------------------------------------------------------------- curvlinops
def _curvlinops(method: str, fisher: str, weight_sharing: str, wl: Workload) -> Runner:
    from curvlinops import (
        EKFACLinearOperator,
        FisherType,
        KFACInverseLinearOperator,
        KFACLinearOperator,
        KFACType,
    )

    model, loss_fn, inputs, targets = wl
    fisher_type = {
        "mc": FisherType.MC,
        "type2": FisherType.TYPE2,
        "empirical": FisherType.EMPIRICAL,
    }
    approx = {"expand": KFACType.EXPAND, "reduce": KFACType.REDUCE}[weight_sharing]
    params = _covered_parameters(model)
    operator = EKFACLinearOperator if method == "EKFAC" else KFACLinearOperator

    def build() -> KFACLinearOperator:
        return operator(
            model,
            loss_fn,
            params,
            [(inputs, targets)],
            check_deterministic=False,
            fisher_type=fisher_type[fisher],
            mc_samples=1,
            kfac_approx=approx,
            num_per_example_loss_terms=_loss_terms(targets),
            separate_weight_and_bias=False,
            num_data=inputs.shape[0],
        )

    if method == "EKFAC":

        def run(lap: Lap) -> None:
            ekfac = build()
            ekfac.compute_kronecker_factors()
            lap()
            ekfac.compute_eigenvalue_correction()

        return run

    vector = [torch.randn_like(p) for p in params]

    def run_kfac(lap: Lap) -> None:
        kfac = build()
        kfac.compute_kronecker_factors()
        lap()
        _ = KFACInverseLinearOperator(kfac, damping=DAMPING, use_exact_damping=True) @ vector

    return run_kfac


# ------------------------------------------------------------------------------------ BackPACK
def _backpack(method: str, fisher: str, weight_sharing: str, wl: Workload) -> Runner:
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR

    if method != "KFAC":
        raise Unsupported("no EKFAC in BackPACK")
    if fisher == "empirical":
        raise Unsupported("no empirical-Fisher K-FAC")
    if weight_sharing != "expand":
        raise Unsupported("no K-FAC-reduce")
    model, loss_fn, inputs, targets = wl
    if not isinstance(model, nn.Sequential):
        raise Unsupported("custom modules (needs nn.Sequential of supported layers)")
    model = extend(copy.deepcopy(model))
    loss_fn = extend(copy.deepcopy(loss_fn))
    extension, field = (KFAC(mc_samples=1), "kfac") if fisher == "mc" else (KFLR(), "kflr")
    params = _covered_parameters(model)

    def run(lap: Lap) -> None:
        with backpack(extension):
            loss_fn(model(inputs), targets).backward()
        lap()
        _eigh_all([f for p in params for f in getattr(p, field)])
        for p in params:  # leave nothing behind: the next run starts from the same state
            p.grad = None
            delattr(p, field)

    return run


# ---------------------------------------------------------------------------------- NNGeometry
def _nngeometry(method: str, fisher: str, weight_sharing: str, wl: Workload) -> Runner:
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatEKFAC, PMatKFAC

    if fisher == "empirical":
        raise Unsupported("no empirical Fisher")
    if weight_sharing != "expand":
        raise Unsupported("no K-FAC-reduce")
    model, _, inputs, targets = wl
    if targets.dim() > 1:
        raise Unsupported("FIM takes [N, C] logits, not per-token [N, C, T]")
    layers = LayerCollection()
    for module in kron_modules(model):
        layers.add_layer_from_model(model, module)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=inputs.shape[0])
    device = str(inputs.device)
    representation = PMatEKFAC if method == "EKFAC" else PMatKFAC

    def fim() -> PMatKFAC | PMatEKFAC:
        if fisher == "mc":
            return FIM_MonteCarlo(
                model, loader, representation, trials=1, device=device, layer_collection=layers
            )
        return FIM(model, loader, representation, device=device, layer_collection=layers)

    def run(lap: Lap) -> None:
        matrix = fim()
        if method == "EKFAC":  # the eigendecompositions happen inside fim()
            matrix.update_diag(loader)
        else:
            lap()
            matrix.compute_eigendecomposition()

    return run


# ---------------------------------------------------------------------------------------- ASDL
class _Logits2d(nn.Module):
    """[N, C, T] per-token logits as [N·T, C] rows (ASDL's softmax is over the last axis)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out.movedim(1, -1).reshape(-1, out.shape[1]) if out.dim() > 2 else out


def _asdl(method: str, fisher: str, weight_sharing: str, wl: Workload) -> Runner:
    import asdl

    if weight_sharing != "expand":
        raise Unsupported("no K-FAC-reduce")
    model, _, inputs, targets = wl
    model = _Logits2d(copy.deepcopy(model))
    modules = kron_modules(model)
    ignored = [m for m in model.modules() if m not in modules and not list(m.children())]
    fisher_type = {"mc": asdl.FISHER_MC, "type2": asdl.FISHER_EXACT, "empirical": asdl.FISHER_EMP}
    shape = asdl.SHAPE_KFE if method == "EKFAC" else asdl.SHAPE_KRON
    config = asdl.FisherConfig(
        fisher_type=fisher_type[fisher],
        fisher_shapes=[shape],
        loss_type=asdl.LOSS_CROSS_ENTROPY,
        n_mc_samples=1,
        ignore_modules=ignored,
        data_size=inputs.shape[0],
    )
    maker = asdl.get_fisher_maker(model, config)
    flat_targets = targets.reshape(-1)
    loss = nn.CrossEntropyLoss(reduction="sum")  # ASDL scales by 1/data_size itself

    def run(lap: Lap) -> None:
        dummy = maker.setup_model_call(model, inputs)
        maker.setup_loss_call(loss, dummy, flat_targets)
        maker.forward_and_backward()  # SHAPE_KFE: eigenbases and diagonal in this same pass
        if method == "KFAC":
            lap()
            factors = [maker.get_fisher_tensor(m, "kron", k) for m in modules for k in ("A", "B")]
            _eigh_all([f for f in factors if f is not None])
        maker.zero_fisher()  # leave nothing behind: the next run starts from the same state
        model.zero_grad(set_to_none=True)

    return run


ADAPTERS: dict[str, Callable[[str, str, str, Workload], Runner]] = {
    "curvlinops": _curvlinops,
    "backpack": _backpack,
    "nngeometry": _nngeometry,
    "asdl": _asdl,
}


def prepare(library: str, method: str, fisher: str, weight_sharing: str, wl: Workload) -> Runner:
    """A runner computing ``library``'s ``method`` (KFAC/EKFAC) for one batch of ``wl``.

    Raises:
        Unsupported: the library has no way to express this case.
    """
    if method not in METHODS:
        raise Unsupported(f"no {method}")
    return ADAPTERS[library](method, fisher, weight_sharing, wl)
