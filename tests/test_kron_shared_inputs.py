"""Layers that read one input (attention's query, key and value projections; convolutions on one
feature map): their input rows are formed, and their equal input factors decomposed, once — and
the estimate is the one of the same layers reading copies of that input. Float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from curvlib import KFAC
from curvlib.kron import KroneckerEstimate, statistics
from curvlib.kron.collect import LayerInputs
from curvlib.kron.layout import LayerLayout
from curvlib.testing import assert_close
from tests.test_kron_exact import METHODS

GROUPS = [["conv_a", "conv_b"], ["conv_c"], ["q", "k", "v"], ["plain"], ["head"]]


class SharedInputs(nn.Module):
    """Two alike 3×3 convolutions and a 1×1 one on the image, then, on the feature map's tokens,
    query/key/value projections and one without a bias; ``copies``: every layer reads a copy of
    its input instead (the same rows in other memory)."""

    def __init__(self, copies: bool) -> None:
        super().__init__()
        self.copies = copies
        self.conv_a = nn.Conv2d(2, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(2, 3, 3, padding=1)
        self.conv_c = nn.Conv2d(2, 3, 1)
        self.q, self.k, self.v = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 4)
        self.plain = nn.Linear(3, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def _read(self, x: Tensor) -> Tensor:
        return x.clone() if self.copies else x

    def forward(self, x: Tensor) -> Tensor:
        image = torch.tanh(self.conv_a(self._read(x)) + self.conv_b(self._read(x))
                           + self.conv_c(self._read(x)))
        tokens = image.flatten(2).transpose(1, 2)  # [N, 16, 3]
        q, k = self.q(self._read(tokens)), self.k(self._read(tokens))
        mixed = q * k + self.v(self._read(tokens)) + self.plain(self._read(tokens))
        return self.head(torch.tanh(mixed).mean(1))


def pair() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    shared = SharedInputs(copies=False).double()
    copies = SharedInputs(copies=True).double()
    copies.load_state_dict(shared.state_dict())
    gen = torch.Generator().manual_seed(1)
    # 12 examples a step: the reduce input factors (of rank ≤ the examples seen, 19 columns)
    # reach full rank, so their eigenbases — and EKFAC's diagonal — do not depend on how a
    # degenerate null space was decomposed (bit-level differences of in-place sums choose it).
    x = torch.randn(24, 2, 4, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (24,), generator=gen)
    return shared, copies, x, y


def fit(method: type[KroneckerEstimate], model: nn.Module, x: Tensor, y: Tensor,
        in_place: bool = False, **kwargs: object) -> KroneckerEstimate:
    """Two steps; ``in_place``: every layer folds its second step into its running sums."""
    estimate = method(model, nn.CrossEntropyLoss(), seed=5, **kwargs)
    estimate._in_place_pays = lambda layer, step: in_place  # type: ignore[method-assign]
    for batch in (slice(0, 12), slice(12, 24)):
        estimate.update(x[batch], y[batch])
    return estimate


@pytest.mark.parametrize("in_place", [False, True], ids=["added", "in-place"])
@pytest.mark.parametrize("ema_decay", [None, 0.7])
@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize("method", METHODS)
def test_layers_reading_one_input_equal_layers_reading_copies(
    method: type[KroneckerEstimate], fisher: str, weight_sharing: str, ema_decay: float | None,
    in_place: bool,
) -> None:
    shared, copies, x, y = pair()
    kwargs = {"fisher": fisher, "weight_sharing": weight_sharing, "ema_decay": ema_decay,
              "in_place": in_place}
    one, apart = fit(method, shared, x, y, **kwargs), fit(method, copies, x, y, **kwargs)
    assert one._input_groups == GROUPS
    assert apart._input_groups == [[layer] for group in GROUPS for layer in group]
    assert_close(one.to_dense(), apart.to_dense(), rtol=1e-12, what="estimate")
    factors_one, factors_apart = one.factors(), apart.factors()
    for layer, named in factors_apart.items():
        for name, value in named.items():
            if not name.startswith("eigvecs"):  # bases agree up to signs (compared as to_dense)
                assert_close(factors_one[layer][name], value, rtol=1e-12, what=f"{layer} {name}")


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_input_rows_read_by_several_layers_are_summed_and_decomposed_once(
    weight_sharing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared, _, x, y = pair()
    formed: list[str] = []
    form = statistics._input_gram

    def spy(rows: statistics.InputRows, weights: Tensor | None, *args: object,
            **kwargs: object) -> Tensor:
        if weights is None:
            formed.append(rows.inputs.layout.name)
        return form(rows, weights, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(statistics, "_input_gram", spy)
    estimate = fit(KFAC, shared, x, y, fisher="mc", weight_sharing=weight_sharing)
    assert formed == [group[0] for group in GROUPS] * 2  # per step, once per group
    factors = estimate.factors()
    for group in GROUPS:
        bases = {id(factors[layer]["eigvecs_A"]) for layer in group}
        assert len(bases) == 1, f"{group} decomposed their equal input factor more than once"
        assert all(torch.equal(factors[layer]["A"], factors[group[0]]["A"]) for layer in group)


def test_rows_key_tells_rows_apart() -> None:
    """Layers share rows only for the same memory, strides, version, dtype and row geometry."""
    x = torch.randn(2, 3, 5, 5)
    conv = nn.Conv2d(3, 4, 3)

    def key(module: nn.Module, tensor: Tensor, dtype: torch.dtype = torch.float32) -> object:
        layout = LayerLayout("layer", module, [p for p in module.parameters()])
        return LayerInputs(layout, [tensor], [1], dtype).rows_key()

    same = key(conv, x)
    assert key(nn.Conv2d(3, 7, 3), x) == same  # output width does not change the rows
    assert key(nn.Conv2d(3, 4, 3, bias=False), x) != same
    assert key(nn.Conv2d(3, 4, 3, padding=1), x) != same
    assert key(nn.Conv2d(3, 4, 3, stride=2), x) != same
    assert key(nn.Conv2d(3, 4, 3, dilation=2), x) != same
    assert key(conv, x, torch.float64) != same
    assert key(conv, x.clone()) != same
    assert key(conv, x.transpose(2, 3)) != same
    x.mul_(2.0)
    assert key(conv, x) != same
    tokens = torch.randn(2, 5, 3)
    assert key(nn.Linear(3, 4), tokens) == key(nn.Linear(3, 9), tokens)
    assert key(nn.Linear(3, 4), tokens) != key(nn.Linear(3, 4, bias=False), tokens)
