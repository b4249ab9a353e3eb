"""The whole ``curvlib demo`` job: train every method on every model, then write the outputs.

For each model (``mlp``, ``cnn``): the digits split, one seeded run per method
(:func:`curvlib.demo.train.train`), the loss curves, the per-layer learning rates of the methods
that compute them, and the curvature report of the model at its (seeded) initialisation on the
first training mini-batch. Then the results table is printed and ``report.md`` written.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from curvlib.demo.curvature import curvature_report
from curvlib.demo.data import digits
from curvlib.demo.methods import METHODS
from curvlib.demo.models import MODELS
from curvlib.demo.report import (
    curvature_section,
    demo_report,
    plot_curves,
    plot_layer_rates,
    rates_section,
    results_rows,
    text_table,
)
from curvlib.demo.train import Run, train

QUICK_TRAIN_SIZE = 128
"""Training examples kept by ``--quick`` (with ``QUICK_EPOCHS`` epochs: a smoke test)."""
QUICK_EPOCHS = 2


@dataclass(frozen=True)
class DemoConfig:
    """The demo's options (the command line's, validated there).

    Attributes:
        methods, models: names from :data:`~curvlib.demo.methods.METHODS` and
            :data:`~curvlib.demo.models.MODELS`, in the order to run.
        epochs: passes over the training set.
        batch_size: examples per mini-batch.
        seed: seeds the split, the initial weights, the batch order and the methods.
        device: where to train (``"cpu"``, ``"cuda"``, ...).
        out: the output folder.
        quick: keep only ``QUICK_TRAIN_SIZE`` training examples (a smoke test).
        threads: torch's intra-op threads during the demo (restored afterwards). The demo's
            models are so small that one thread is fastest; more threads on a busy machine can
            make every step tens of times slower.
        progress: tqdm bars (None: only on a terminal).
    """

    methods: Sequence[str]
    models: Sequence[str]
    epochs: int
    batch_size: int
    seed: int
    device: str
    out: Path
    quick: bool = False
    threads: int = 1
    progress: bool | None = None


@dataclass(frozen=True)
class DemoResult:
    """The runs in table order, the printed results table and the path of ``report.md``."""

    runs: list[Run]
    table: str
    report: Path


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the demo (module docstring); ``echo`` receives one line per finished run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, echo)
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, echo: Callable[[str], None]) -> DemoResult:
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    figures, rate_sections, curvature_sections = [], [], []
    for model_name in config.models:
        data = digits(config.seed, images=model_name == "cnn",
                      train_size=QUICK_TRAIN_SIZE if config.quick else None).to(config.device)
        model_runs = []
        for name in config.methods:
            run = train(model_name, METHODS[name], data, epochs=config.epochs,
                        batch_size=config.batch_size, seed=config.seed, progress=config.progress)
            echo(f"{model_name:>4} {run.method.label:<18} train loss {run.final_train_loss:.4f}  "
                 f"test acc {run.test_accuracy:.3f}  {run.wall_time:6.2f} s")
            model_runs.append(run)
            if run.layer_rates is not None:
                title = f"{model_name}: {run.method.label}"
                figure = None
                if run.layer_rates.rates:  # none while PartitionedNewton is still warming up
                    figure = plot_layer_rates(run.layer_rates, title,
                                              out / f"{model_name}-{name}-rates.png")
                rate_sections.append(rates_section(run.layer_rates, title, figure))
        runs += model_runs
        figure = plot_curves(model_runs, f"digits, {model_name}", out / f"{model_name}-loss.png")
        figures.append(figure.name)
        torch.manual_seed(config.seed)  # the initial weights every run of this model started from
        model = MODELS[model_name]().to(config.device)
        batch = data.x_train[: config.batch_size], data.y_train[: config.batch_size]
        report = curvature_report(model, nn.CrossEntropyLoss(), *batch)
        curvature_sections.append(
            curvature_section(report, out, model_name, f"{model_name} at initialisation"))
    table = text_table(results_rows(runs))
    settings = [
        f"seed {config.seed}, {config.epochs} epochs, batch size {config.batch_size}"
        + (f", quick run ({QUICK_TRAIN_SIZE} training examples)" if config.quick else "")
        + "; every method under the same cosine learning-rate decay",
        f"device {config.device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)",
    ]
    path = out / "report.md"
    path.write_text(demo_report(runs, settings, figures, rate_sections, curvature_sections),
                    encoding="utf-8")
    return DemoResult(runs, table, path)
