"""What the demo writes: the results table, the loss curves and the per-layer rates.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot, so they render
with the non-interactive Agg canvas on machines without a display and leave pyplot's global state
(and the user's backend) alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from curvlib.demo.curvature import CurvatureReport
from curvlib.demo.methods import LayerRates
from curvlib.demo.train import Run
from curvlib.diagnostics import plot_comparison, plot_learning_rates, plot_reduced_matrix

HEADER = ["model", "method", "steps", "final train loss", "test accuracy", "wall time (s)",
          "time/step (ms)"]


def results_rows(runs: Sequence[Run]) -> list[list[str]]:
    """One row of formatted cells per run, in the columns of :data:`HEADER`."""
    return [
        [run.model, run.method.label, str(run.num_steps), f"{run.final_train_loss:.4f}",
         f"{run.test_accuracy:.3f}", f"{run.wall_time:.2f}", f"{1e3 * run.time_per_step:.1f}"]
        for run in runs
    ]


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """An aligned plain-text table with :data:`HEADER` (numbers right-aligned)."""
    table = [HEADER, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]

    def line(row: Sequence[str]) -> str:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells)

    return "\n".join([line(HEADER), "  ".join("-" * w for w in widths), *map(line, rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(runs: Sequence[Run], title: str, path: Path) -> Path:
    """Training loss against steps and against seconds, one line per run."""
    fig = Figure(figsize=(11, 4))
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for run in runs:
        by_step.plot(run.steps, run.train_loss, label=run.method.label)
        by_time.plot(run.seconds, run.train_loss, label=run.method.label)
    by_step.set_xlabel("training step")
    by_time.set_xlabel("training time (s)")
    by_step.set_ylabel("training loss (whole training set)")
    by_step.set_yscale("log")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_layer_rates(rates: LayerRates, title: str, path: Path) -> Path:
    """Each layer's learning rate at every evaluation
    (:func:`curvlib.diagnostics.plot_learning_rates`)."""
    plot_learning_rates(rates.rates, rates.names, rates.steps, title=title).savefig(path, dpi=110)
    return path


def curvature_section(report: CurvatureReport, out: Path, prefix: str, title: str) -> str:
    """Write the H̄ heatmap (and the comparison bars) as PNGs under ``out``; return the markdown
    section that shows them with the per-layer table."""
    heatmap = out / f"{prefix}-reduced-hessian.png"
    plot_reduced_matrix(report.H, report.names, title=f"H̄ ({prefix})").savefig(heatmap, dpi=110)
    rates = report.newton_rates
    rows = [
        [name, str(size), f"{float(report.g[s]):.3e}", f"{float(report.H[s, s]):.3e}",
         f"{float(report.D[s]):.3e}", "n/a" if rates is None else f"{float(rates[s]):.4g}",
         f"{float(report.cubic_rates[s]):.4g}"]
        for s, (name, size) in enumerate(zip(report.names, report.sizes))
    ]
    header = ["layer", "parameters", "ḡ_s", "H̄_ss", "D̄_sss",
              f"η Newton (λ={report.damping:g})", "η cubic"]
    lines = [
        f"### Curvature: {title}", "",
        "Per-layer quantities along the gradient u = ∇L (Wolinski's partitioned derivatives); "
        "η are the per-layer learning rates of the second-order (Newton) and cubic models.", "",
        markdown_table(header, rows), "",
        f"![H̄ heatmap]({heatmap.name})", "",
        "Largest eigenvalues of the exact GGN: "
        + ", ".join(f"{float(v):.4g}" for v in report.ggn_eigenvalues), "",
    ]
    if report.comparisons:
        bars = out / f"{prefix}-kronecker-vs-ggn.png"
        plot_comparison(report.comparisons).savefig(bars, dpi=110)
        lines += ["Kronecker estimates against the exact GGN (type-2 Fisher, same batch):", "",
                  "```text", *(str(table) for table in report.comparisons), "```", "",
                  f"![Kronecker vs GGN]({bars.name})", ""]
    lines += [f"*{note}*" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def demo_report(
    runs: Sequence[Run], settings: Sequence[str], figures: Sequence[str],
    rate_sections: Sequence[str], curvature_sections: Sequence[str],
) -> str:
    """The markdown of ``report.md``: settings, results table, figures, per-layer rates,
    curvature sections and the hyper-parameters of every method."""
    methods = {run.method.name: run.method for run in runs}
    lines = [
        "# curvlib demo: optimizers on 8×8 digits", "",
        *(f"- {item}" for item in settings), "",
        "## Results", "",
        markdown_table(HEADER, results_rows(runs)), "",
        "*final train loss*: mean cross-entropy on the whole training set after the last step; "
        "*wall time*: seconds inside the training steps (evaluations excluded).", "",
        "## Training curves", "",
        *(f"![{name}]({name})\n" for name in figures),
        "## Per-layer learning rates", "",
        *rate_sections,
        "## Curvature at initialisation", "",
        *curvature_sections,
        "## Methods", "",
        *(f"- **{m.label}** (`{m.name}`): {m.settings}" for m in methods.values()),
    ]
    return "\n".join(lines).rstrip() + "\n"


def rates_section(rates: LayerRates, title: str, figure: Path | None) -> str:
    """A markdown section with the last per-layer rates and their plot; ``figure`` is None when
    the run computed no rates (it ended during PartitionedNewton's warm-up)."""
    if figure is None:
        return f"### {title}\n\nNo learning rates yet: the run ended during the warm-up.\n"
    header = ["layer", f"rate at step {rates.steps[-1]}"]
    rows = [[name, f"{value:.4g}"] for name, value in zip(rates.names, rates.rates[-1])]
    return f"### {title}\n\n{markdown_table(header, rows)}\n\n![{title}]({figure.name})\n"
