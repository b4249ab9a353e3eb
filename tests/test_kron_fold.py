"""How a statistics step is folded into the running statistics: into spare numerators checked
through their traces and then added, or — where a layer's factors are much larger than its rows —
straight into the running sums, after bounds on the traces are checked. Both give the same
estimate, and a step that fails either check leaves every statistic as it was. Float64."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from curvlib import EKFAC
from curvlib.kron import KroneckerEstimate
from curvlib.kron.collect import StepData
from curvlib.testing import assert_close
from tests.cases import make_case
from tests.test_kron_exact import METHODS


def forced(method: type[KroneckerEstimate], model: nn.Module, loss_fn: nn.Module,
           in_place: Callable[[str], bool], **kwargs: object
           ) -> tuple[KroneckerEstimate, list[set[str]]]:
    """An estimate whose layers go in place where ``in_place(layer)`` says (wherever the fold
    allows it), and the list of the layers each step wrote in place."""
    estimate = method(model, loss_fn, **kwargs)
    chosen: list[set[str]] = []
    choose = estimate._in_place_layers

    def spy(step: StepData) -> set[str]:
        layers = choose(step)
        chosen.append(layers)
        return layers

    estimate._in_place_pays = lambda layer, step: in_place(layer)  # type: ignore[method-assign]
    estimate._in_place_layers = spy  # type: ignore[method-assign]
    return estimate, chosen


def snapshot(estimate: KroneckerEstimate) -> dict[str, Tensor | float]:
    """Every running statistic of the estimate, flattened to name → value."""
    out: dict[str, Tensor | float] = {}
    for layer, stats in estimate._stats.items():
        for name, running in stats.running_sums().items():
            state = running.state_dict()
            out[f"{layer}.{name}.numerator"] = state["numerator"]
            out[f"{layer}.{name}.count"] = state["count"]
    for layer, running in estimate._diagonals.items():
        state = running.state_dict()
        out[f"{layer}.diagonal.numerator"] = state["numerator"]
        out[f"{layer}.diagonal.count"] = state["count"]
    return out


def assert_same_state(before: dict[str, Tensor | float], after: dict[str, Tensor | float]
                      ) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        assert (torch.equal(value, other) if isinstance(value, Tensor) else value == other), key


SETTINGS = [("mlp", "expand"), ("cnn", "expand"), ("cnn", "reduce"), ("sequence", "expand"),
            ("shared", "expand")]


@pytest.mark.parametrize("reduction,ema_decay", [("mean", None), ("sum", 0.7)])
@pytest.mark.parametrize("fisher", ["mc", "empirical", "type2"])
@pytest.mark.parametrize("case,sharing", SETTINGS)
@pytest.mark.parametrize("method", METHODS)
def test_in_place_steps_equal_added_ones(
    method: type[KroneckerEstimate], case: str, sharing: str, fisher: str, reduction: str,
    ema_decay: float | None,
) -> None:
    model, loss_fn, x, y = make_case(case, "cross_entropy", reduction, batch=6)
    batches = [(x[:2], y[:2]), (x[2:5], y[2:5]), (x[5:], y[5:])]
    kwargs = {"fisher": fisher, "weight_sharing": sharing, "ema_decay": ema_decay, "seed": 5}
    estimates = []
    for in_place in (True, False):
        estimate, chosen = forced(method, model, loss_fn, lambda layer, v=in_place: v, **kwargs)
        for bx, by in batches:
            estimate.update(bx, by)
        estimates.append(estimate)
        streamed = fisher == "type2" and not method.refits_diagonal  # K = C passes, one by one
        written = set() if streamed or not in_place else set(estimate.layouts)
        assert chosen == [set(), written, written]
    direct, added = snapshot(estimates[0]), snapshot(estimates[1])
    for key, value in direct.items():
        if isinstance(value, Tensor):
            assert_close(value, added[key], rtol=1e-12, what=key)
        else:
            assert value == pytest.approx(added[key], rel=1e-14), key
    if not (method.refits_diagonal and sharing == "reduce"):
        # (Under reduce the few means leave the factors rank-deficient while the per-example
        # gradients are not in their span: the diagonal then depends on the basis chosen in the
        # null space, which rounding-level differences turn.)
        assert_close(estimates[0].to_dense(), estimates[1].to_dense(), rtol=1e-10,
                     what="the estimate")


@pytest.mark.parametrize("method", METHODS)
def test_a_failed_step_leaves_in_place_statistics_untouched(
    method: type[KroneckerEstimate],
) -> None:
    """A NaN input (refused with the model's outputs), or finite inputs whose products would
    overflow (refused by the bounds), leaves the statistics written in place untouched."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=6)
    estimate, chosen = forced(method, model, loss_fn, lambda layer: True, fisher="mc")
    estimate.update(x[:3], y[:3])
    estimate.refresh()
    estimate.update(x[3:], y[3:])
    assert chosen[-1] == set(estimate.layouts)
    before = snapshot(estimate)
    for value, match in ((float("nan"), "not finite"), (1e200, "may overflow")):
        bad = x[:3].clone()
        bad[0, 0] = value
        with pytest.raises(ValueError, match=match):
            estimate.update(bad, y[:3])
        assert_same_state(before, snapshot(estimate))


@pytest.mark.parametrize("method", METHODS)
def test_a_layer_failing_its_trace_check_leaves_in_place_layers_untouched(
    method: type[KroneckerEstimate],
) -> None:
    """The first layer goes through spare numerators, the second in place; only the first one's
    statistics overflow (an input column its weight ignores), and the second's stay as they
    were: layers are written in place only once every other layer has passed its check."""
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=6)
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0
    estimate, chosen = forced(method, model, loss_fn, lambda layer: layer == "2", fisher="mc")
    estimate.update(x[:3], y[:3])
    estimate.update(x[3:], y[3:])
    assert chosen[-1] == {"2"}
    before = snapshot(estimate)
    bad = x[:3].clone()
    bad[:, 0] = 1e200  # (1e200)² overflows in the first layer's input factor alone
    with pytest.raises(ValueError, match="module '0'"):
        estimate.update(bad, y[:3])
    assert_same_state(before, snapshot(estimate))


@pytest.mark.parametrize("batch,expected", [(2, {"0", "2"}), (64, set())])
def test_in_place_where_the_factors_dwarf_the_rows(batch: int, expected: set[str]) -> None:
    """Wide layers with a small batch go in place; the same layers with many rows do not (the
    bounds would read more than the adds save)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.Tanh(), nn.Linear(40, 3)).double()
    x, y = torch.randn(batch, 8, dtype=torch.float64), torch.randint(0, 3, (batch,))
    estimate = METHODS[0](model, nn.CrossEntropyLoss(), fisher="mc")
    chosen: list[set[str]] = []
    choose = estimate._in_place_layers
    estimate._in_place_layers = lambda step: chosen.append(choose(step)) or chosen[-1]  # type: ignore[method-assign]
    estimate.update(x, y)
    estimate.update(x, y)
    assert chosen == [set(), expected]


@pytest.mark.parametrize("in_place", [False, True], ids=["added", "in-place"])
def test_an_overflowing_diagonal_is_refused_before_anything_is_added(in_place: bool) -> None:
    """EKFAC's squares multiply a layer's input and gradient norms: here ‖ā‖² ≈ 1e200 and
    ‖g‖² ≈ 1e120 are finite in both factors, but not their product in the diagonal; the step is
    refused and neither the factors nor the diagonal change."""
    model, loss_fn, x, y = make_case("mlp", "mse", "mean", batch=6)
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0
    estimate, chosen = forced(EKFAC, model, loss_fn, lambda layer: in_place, fisher="empirical")
    estimate.update(x[:3], y[:3])
    estimate.refresh()
    estimate.update(x[3:], y[3:])
    before = snapshot(estimate)
    bad_x, bad_y = x[:3].clone(), y[:3] + 1e60
    bad_x[:, 0] = 1e100
    with pytest.raises(ValueError, match=r"module '0'.*not finite"):
        estimate.update(bad_x, bad_y)
    assert chosen[-1] == (set(estimate.layouts) if in_place else set())
    assert_same_state(before, snapshot(estimate))
    assert all(value.isfinite().all() for value in before.values() if isinstance(value, Tensor))
