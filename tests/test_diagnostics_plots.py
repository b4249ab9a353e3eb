"""Plots render headless to PNG files and reject malformed input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from curvlib import KFAC, ExactGGN
from curvlib.diagnostics import (
    compare,
    plot_comparison,
    plot_learning_rates,
    plot_reduced_matrix,
    plot_spectrum,
    spectral_density,
    top_eigenvalues,
)
from tests.cases import make_case

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def save(figure, path: Path) -> None:
    figure.savefig(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 1000


def test_every_plot_renders_to_png(tmp_path: Path) -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=6)
    exact = ExactGGN(model, loss_fn)
    exact.update(x, y)
    kfac = KFAC(model, loss_fn, fisher="type2")
    kfac.update(x, y)
    part = kfac.partition
    g = list(torch.autograd.grad(loss_fn(model(x), y), part.parameters))
    exact_by_module = ExactGGN(model, loss_fn, part)
    exact_by_module.update(x, y)

    save(plot_reduced_matrix(exact_by_module.reduced(g), part.names), tmp_path / "hbar.png")
    save(plot_spectrum(top_eigenvalues(kfac, 5)), tmp_path / "eigenvalues.png")
    densities = {"GGN": spectral_density(exact, 2, 10), "K-FAC": spectral_density(kfac, 2, 10)}
    save(plot_spectrum(densities), tmp_path / "density.png")
    tables = [compare(kfac, exact, g), compare(exact_by_module, exact, g)]
    save(plot_comparison(tables), tmp_path / "compare.png")
    history = [torch.rand(len(part), dtype=torch.float64) for _ in range(5)]
    save(plot_learning_rates(history, part.names, log=True), tmp_path / "lr.png")


def test_plots_draw_into_given_axes(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure()
    left, right = figure.subplots(1, 2)
    assert plot_reduced_matrix(torch.eye(2), ["a", "b"], ax=left) is figure
    assert plot_learning_rates(torch.rand(4, 2), steps=[1, 2, 3, 4], ax=right) is figure
    save(figure, tmp_path / "both.png")


def test_bad_arguments() -> None:
    model, loss_fn, x, y = make_case("mlp", "cross_entropy", "mean", batch=3)
    exact = ExactGGN(model, loss_fn)
    exact.update(x, y)
    table = compare(exact, exact)
    with pytest.raises(ValueError, match="matrix must be S×S"):
        plot_reduced_matrix(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="names has 1 entries"):
        plot_reduced_matrix(torch.eye(2), ["a"])
    with pytest.raises(ValueError, match="not finite"):
        plot_reduced_matrix(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="empty mapping"):
        plot_spectrum({})
    with pytest.raises(ValueError, match="mixes eigenvalues and densities"):
        plot_spectrum({"a": torch.ones(2), "b": spectral_density(exact, 1, 3)})
    with pytest.raises(ValueError, match="1-D"):
        plot_spectrum(torch.ones(2, 2))
    with pytest.raises(ValueError, match="unknown column 'speed'"):
        plot_comparison(table, ["speed"])
    with pytest.raises(ValueError, match="was a gradient given"):
        plot_comparison(table, ["cosine"])
    kfac = KFAC(model, loss_fn, fisher="type2")
    kfac.update(x, y)
    with pytest.raises(ValueError, match="different blocks"):
        plot_comparison([table, compare(kfac, exact)])  # by tensor vs by module
    with pytest.raises(ValueError, match="different lengths"):
        plot_learning_rates([torch.ones(2), torch.ones(3)])
    with pytest.raises(ValueError, match="steps has 2 entries"):
        plot_learning_rates(torch.ones(3, 2), steps=[0, 1])

