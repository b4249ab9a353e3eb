"""Figures of the diagnostics, drawn with matplotlib (the optional ``plot`` extra).

Every function returns a ``matplotlib.figure.Figure``. Figures are built with the object-oriented
API (``Figure`` directly, never ``pyplot``), so nothing needs a display, no global figure state is
touched, and ``fig.savefig("out.png")`` renders with Agg anywhere (CI, headless servers). Each
function takes an optional ``ax`` to draw into an existing axes instead (its figure is returned);
:func:`plot_comparison` makes one panel per column and takes no ``ax``.

* :func:`plot_reduced_matrix` — the S×S matrix H̄ (``estimate.reduced(u)``, Wolinski's projected
  Hessian) as a heatmap with the subset names, on a colour scale centred at zero;
* :func:`plot_spectrum` — top eigenvalues (:func:`~curvlib.diagnostics.top_eigenvalues`) as
  stems, or SLQ densities (:func:`~curvlib.diagnostics.spectral_density`) as curves, several
  overlaid when given as a mapping label → spectrum;
* :func:`plot_comparison` — the columns of one or several
  :class:`~curvlib.diagnostics.compare.ComparisonTable` as grouped bars per block;
* :func:`plot_learning_rates` — per-block learning rates η over training steps.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlib.diagnostics.compare import COLUMNS, ComparisonTable
from curvlib.diagnostics.density import SpectralDensity

Spectrum = Tensor | SpectralDensity
LOG_DENSITY_RANGE = 1e-8
"""On a log axis, densities are shown down to this fraction of their peak."""


def _matplotlib_figure() -> Any:
    """``matplotlib.figure.Figure``, or an ImportError saying how to install matplotlib."""
    try:
        return importlib.import_module("matplotlib.figure").Figure
    except ImportError as error:
        raise ImportError("curvlib's plots need matplotlib: pip install matplotlib "
                          "(or pip install curvlib[plot]).") from error


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """(figure, axes): a new figure with one axes, or ``ax`` and its figure."""
    if ax is not None:
        return ax.figure, ax
    figure = _matplotlib_figure()(figsize=figsize, layout="constrained")
    return figure, figure.add_subplot()


def _as_cpu(values: Any, argument: str) -> Tensor:
    tensor = torch.as_tensor(values.detach() if isinstance(values, Tensor) else values)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    tensor = tensor.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{argument} is not finite (contains NaN or inf).")
    return tensor


def plot_reduced_matrix(
    matrix: Tensor,
    names: Sequence[str] | None = None,
    *,
    title: str | None = "reduced matrix H̄",
    annotate: bool | None = None,
    ax: Any = None,
) -> Any:
    """Heatmap of an S×S reduced matrix (e.g. ``estimate.reduced(u)``), centred at zero.

    Args:
        matrix: the S×S matrix.
        names: the subset names for the axes (default 0..S−1), e.g. ``partition.names``.
        title: the axes title.
        annotate: write the values in the cells (default: when S ≤ 12).
        ax: draw into this axes.

    Raises:
        ValueError: a matrix that is not square and finite, or names of the wrong length.
    """
    data = _as_cpu(matrix, "matrix")
    if data.dim() != 2 or data.shape[0] != data.shape[1]:
        raise ValueError(f"matrix must be S×S, got shape {tuple(data.shape)}.")
    size = data.shape[0]
    labels = [str(i) for i in range(size)] if names is None else [str(n) for n in names]
    if len(labels) != size:
        raise ValueError(f"names has {len(labels)} entries for an {size}×{size} matrix.")
    figure, axes = _axes(ax, (1.2 + 0.55 * size, 0.8 + 0.5 * size))
    bound = float(data.abs().max()) or 1.0
    image = axes.imshow(data.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
    axes.set_xticks(range(size), labels, rotation=45, ha="right")
    axes.set_yticks(range(size), labels)
    if annotate or (annotate is None and size <= 12):
        for i in range(size):
            for j in range(size):
                value = float(data[i, j])
                # light text on the saturated cells, where dark text would vanish
                color = "white" if abs(value) > 0.6 * bound else "black"
                axes.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7,
                          color=color)
    figure.colorbar(image, ax=axes)
    if title:
        axes.set_title(title)
    return figure


def plot_spectrum(
    spectrum: Spectrum | Mapping[str, Spectrum],
    *,
    log: bool = True,
    title: str | None = "spectrum",
    ax: Any = None,
) -> Any:
    """Eigenvalues as stems, or SLQ densities as curves (several overlaid from a mapping).

    Args:
        spectrum: a tensor of eigenvalues (e.g. from ``top_eigenvalues``), a
            :class:`~curvlib.diagnostics.density.SpectralDensity`, or a mapping label → either.
        log: a logarithmic y-axis for densities (their tails span orders of magnitude).
        title: the axes title.
        ax: draw into this axes.

    Raises:
        ValueError: an empty mapping, a non-finite or non-1-D eigenvalue tensor, or a mapping
            mixing eigenvalues and densities.
    """
    entries = dict(spectrum) if isinstance(spectrum, Mapping) else {"": spectrum}
    if not entries:
        raise ValueError("spectrum is an empty mapping.")
    densities = [isinstance(v, SpectralDensity) for v in entries.values()]
    if any(densities) and not all(densities):
        raise ValueError("spectrum mixes eigenvalues and densities; plot them separately.")
    figure, axes = _axes(ax, (6.0, 3.5))
    peak = 0.0
    for label, value in entries.items():
        if isinstance(value, SpectralDensity):
            peak = max(peak, float(value.density.max()))
            axes.plot(value.grid.numpy(), value.density.numpy(), label=label or None)
        else:
            values = _as_cpu(value, f"spectrum[{label!r}]" if label else "spectrum")
            if values.dim() != 1:
                raise ValueError(f"eigenvalues must be a 1-D tensor, got shape "
                                 f"{tuple(values.shape)}.")
            axes.stem(range(1, values.numel() + 1), values.numpy(), label=label or None)
    if all(densities):
        axes.set_xlabel("eigenvalue")
        axes.set_ylabel("density")
        if log and peak > 0:
            axes.set_yscale("log")
            # Gaussian tails fall to 1e-300; eight decades below the peak show the structure
            axes.set_ylim(peak * LOG_DENSITY_RANGE, peak * 3)
    else:
        axes.set_xlabel("index")
        axes.set_ylabel("eigenvalue")
    if any(entries):
        axes.legend()
    if title:
        axes.set_title(title)
    return figure


def plot_comparison(
    tables: ComparisonTable | Sequence[ComparisonTable],
    columns: Sequence[str] = ("relative_error", "trace_ratio", "top_eigenvalue_ratio", "cosine"),
    *,
    include_overall: bool = True,
) -> Any:
    """Grouped bars of comparison columns per block, one panel per column.

    Args:
        tables: one :class:`ComparisonTable` or several over the same blocks (e.g. K-FAC and EKFAC
            against the same exact GGN); each becomes one bar per block.
        columns: which columns (attribute names of :class:`ComparisonRow`).
        include_overall: also draw the ``overall`` row.

    Raises:
        ValueError: no tables, an unknown column, tables over different blocks, or a column with
            no values (e.g. ``cosine`` without a gradient).
    """
    tables = [tables] if isinstance(tables, ComparisonTable) else list(tables)
    if not tables:
        raise ValueError("tables is empty.")
    known = [name for name, _ in COLUMNS]
    for column in columns:
        if column not in known:
            raise ValueError(f"unknown column {column!r}; columns are {known}.")
    if not columns:
        raise ValueError("columns is empty.")
    rows = [t.rows if include_overall else t.blocks for t in tables]
    blocks = [row.block for row in rows[0]]
    if any([row.block for row in r] != blocks for r in rows):
        raise ValueError("the tables compare different blocks; plot them separately.")
    titles = dict(COLUMNS)
    figure = _matplotlib_figure()(figsize=(3.2 * len(columns), 3.4), layout="constrained")
    panels = figure.subplots(1, len(columns), squeeze=False)[0]
    width = 0.8 / len(tables)
    for axes, column in zip(panels, columns):
        for i, (table, table_rows) in enumerate(zip(tables, rows)):
            values = [getattr(row, column) for row in table_rows]
            if any(v is None for v in values):
                raise ValueError(f"column {column!r} of {table.approx} vs {table.exact} has no "
                                 "values for some blocks (was a gradient given?).")
            positions = [b + (i - (len(tables) - 1) / 2) * width for b in range(len(blocks))]
            axes.bar(positions, values, width, label=f"{table.approx} vs {table.exact}")
        axes.set_xticks(range(len(blocks)), blocks, rotation=45, ha="right")
        axes.set_title(titles[column])
        if column.endswith("ratio") or column == "cosine":
            axes.axhline(1.0, color="gray", linewidth=0.8)
    panels[0].legend(fontsize=7)
    return figure


def plot_learning_rates(
    history: Tensor | Sequence[Tensor],
    names: Sequence[str] | None = None,
    steps: Sequence[int] | Tensor | None = None,
    *,
    log: bool = False,
    title: str | None = "per-block learning rates η",
    ax: Any = None,
) -> Any:
    """Per-block learning rates over training: one line per block.

    Args:
        history: a [T, S] tensor, or T S-vectors (e.g. ``pd.learning_rates()`` at every step).
        names: the S block names (default 0..S−1).
        steps: the T x-values (default 0..T−1).
        log: a logarithmic y-axis (|η|, for rates spanning orders of magnitude).
        title: the axes title.
        ax: draw into this axes.

    Raises:
        ValueError: an empty or non-finite history, rows of different lengths, or names/steps of
            the wrong length.
    """
    if isinstance(history, Tensor):
        data = _as_cpu(history, "history")
    else:
        if len(history) == 0:
            raise ValueError("history is empty.")
        rows = [_as_cpu(h, f"history[{i}]").reshape(-1) for i, h in enumerate(history)]
        if len({r.numel() for r in rows}) != 1:
            raise ValueError("history rows have different lengths (S must stay fixed).")
        data = torch.stack(rows)
    if data.dim() != 2 or data.numel() == 0:
        raise ValueError(f"history must be T×S, got shape {tuple(data.shape)}.")
    count, size = data.shape
    labels = [str(i) for i in range(size)] if names is None else [str(n) for n in names]
    if len(labels) != size:
        raise ValueError(f"names has {len(labels)} entries for {size} blocks.")
    xs = torch.arange(count) if steps is None else _as_cpu(steps, "steps").reshape(-1)
    if xs.numel() != count:
        raise ValueError(f"steps has {xs.numel()} entries for {count} rows of history.")
    figure, axes = _axes(ax, (6.0, 3.5))
    for s, label in enumerate(labels):
        values = data[:, s].abs() if log else data[:, s]
        axes.plot(xs.numpy(), values.numpy(), label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("|η|" if log else "η")
    if log:
        axes.set_yscale("log")
    axes.legend(fontsize=7)
    if title:
        axes.set_title(title)
    return figure
