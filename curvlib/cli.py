"""The ``curvlib`` command line."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from curvlib import ExactGGN, ExactHessian, Partition


def demo(args: argparse.Namespace) -> None:
    """Exact Hessian and GGN of a tiny tanh MLP: their reduced S×S matrices and spectra."""
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    part = Partition.by_tensor(model)
    gradient = torch.autograd.grad(loss_fn(model(x), y), part.parameters)
    for estimate in (ExactHessian(model, loss_fn, part), ExactGGN(model, loss_fn, part)):
        estimate.update(x, y)
        dense = estimate.to_dense()
        evals = torch.linalg.eigvalsh(dense)
        print(f"{type(estimate).__name__}: P={part.numel}, trace={float(estimate.trace()):.4f}, "
              f"eigenvalues in [{float(evals[0]):.4f}, {float(evals[-1]):.4f}]")
        print("  reduced along the gradient (S×S):")
        for name, row in zip(part.names, estimate.reduced(list(gradient))):
            print(f"    {name:>10s} " + " ".join(f"{float(v):+.2e}" for v in row))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="curvlib", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo_parser = verbs.add_parser("demo", help=demo.__doc__)
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    args.run(args)
