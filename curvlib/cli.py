"""The ``curvlib`` command (also ``python -m curvlib``).

* ``curvlib demo``: train an MLP and a small CNN on scikit-learn's 8×8 digits with SGD, Adam, the
  Kronecker family through NaturalGradient, PartitionedNewton and Adam+PerLayerLR; print a
  results table and write plots and a markdown report (:mod:`curvlib.demo`).
* ``curvlib report``: the demo's curvature report (per-layer learning rates, the H̄ heatmap, GGN
  eigenvalues, Kronecker-vs-GGN comparison) for your own model and batch, given as
  ``module:factory`` names: the model factory returns an ``nn.Module``, the data factory an
  ``(inputs, targets)`` batch. The current directory is importable, so ``mymodels:build`` finds
  ``./mymodels.py``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlib.demo.curvature import curvature_report
from curvlib.demo.job import QUICK_EPOCHS, DemoConfig, run_demo
from curvlib.demo.methods import METHODS
from curvlib.demo.models import MODELS
from curvlib.demo.report import curvature_section

LOSSES: dict[str, Callable[[], nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
}
DEFAULT_EPOCHS = 5


def _names(choices: dict[str, Any], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names from ``choices``."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown or text!r}; choose from {', '.join(choices)}")
        return names

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _nonnegative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
    return value


def _device(parser: argparse.ArgumentParser, name: str) -> str:
    """``name`` if torch can use it, else a command-line error saying why."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        parser.error(f"--device {name!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: CUDA is not available on this machine "
                     f"(torch {torch.__version__}); use --device cpu.")
    return name


def _factory(parser: argparse.ArgumentParser, option: str, spec: str) -> Callable[[], Any]:
    """Import ``module:attribute`` and return the attribute (a callable)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        parser.error(f"{option} must look like module:factory, got {spec!r}.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `curvlib report --model mymodels:build` from here
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        parser.error(f"{option}: cannot import {module_name!r}: {error}")
    factory = getattr(module, attribute, None)
    if not callable(factory):
        parser.error(f"{option}: {module_name!r} has no callable {attribute!r}.")
    return factory


def demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Train on 8×8 digits with every optimizer; print the table, write plots and a report."""
    epochs = args.epochs if args.epochs is not None else (
        QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    config = DemoConfig(
        methods=args.methods, models=args.models, epochs=epochs, batch_size=args.batch_size,
        seed=args.seed, device=_device(parser, args.device), out=Path(args.out),
        quick=args.quick, threads=args.threads,
    )
    result = run_demo(config)
    print()
    print(result.table)
    print(f"\nplots and report written to {result.report.parent}/ (open {result.report})")


def report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The curvature report of your model on your batch."""
    device = _device(parser, args.device)
    model = _factory(parser, "--model", args.model)()
    if not isinstance(model, nn.Module):
        parser.error(f"--model {args.model} returned a {type(model).__name__}, not an nn.Module.")
    batch = _factory(parser, "--data", args.data)()
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        parser.error(f"--data {args.data} must return an (inputs, targets) pair, "
                     f"got a {type(batch).__name__}.")
    model = model.to(device)
    inputs, targets = (t.to(device) if isinstance(t, torch.Tensor) else t for t in batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measured = curvature_report(model, LOSSES[args.loss](), inputs, targets, damping=args.damping)
    section = curvature_section(measured, out, "model", f"{args.model} on {args.data}")
    path = out / "report.md"
    path.write_text(f"# curvlib curvature report\n\nLoss: {args.loss}.\n\n{section}",
                    encoding="utf-8")
    print(section)
    print(f"report written to {path}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvlib`` command."""
    parser = argparse.ArgumentParser(
        prog="curvlib", description="Second-order curvature for PyTorch: the demo and the "
        "curvature report of your own model.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{demo,report}")

    run = verbs.add_parser(
        "demo", help=demo.__doc__, description=demo.__doc__ + " Seeded and reproducible.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--methods", type=_names(METHODS, "method"), default=list(METHODS),
                     help=f"comma-separated, from: {', '.join(METHODS)}")
    run.add_argument("--models", type=_names(MODELS, "model"), default=list(MODELS),
                     help=f"comma-separated, from: {', '.join(MODELS)}")
    run.add_argument("--epochs", type=_positive, default=None,
                     help=f"passes over the training set (default {DEFAULT_EPOCHS}; "
                     f"{QUICK_EPOCHS} with --quick)")
    run.add_argument("--batch-size", type=_positive, default=64)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    run.add_argument("--threads", type=_positive, default=1,
                     help="torch threads (the models are tiny: one is fastest)")
    run.add_argument("--out", default="curvlib-demo", help="output folder")
    run.add_argument("--quick", action="store_true",
                     help="a smoke test: a small training subset and few epochs")
    run.set_defaults(run=demo, parser=run)

    rep = verbs.add_parser(
        "report", help=report.__doc__,
        description=report.__doc__ + " The model factory returns an nn.Module, the data "
        "factory an (inputs, targets) batch; the current directory is importable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rep.add_argument("--model", required=True, help="module:factory returning an nn.Module")
    rep.add_argument("--data", required=True,
                     help="module:factory returning an (inputs, targets) batch")
    rep.add_argument("--loss", choices=list(LOSSES), default="cross_entropy")
    rep.add_argument("--damping", type=_nonnegative, default=1e-3,
                     help="damping of the per-layer Newton learning rates")
    rep.add_argument("--device", default="cpu")
    rep.add_argument("--out", default="curvlib-report", help="output folder")
    rep.set_defaults(run=report, parser=rep)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``curvlib`` console script and of ``python -m curvlib``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.run(args.parser, args)
