"""Speed and memory of the partitioned derivatives (Wolinski, arXiv 2312.03885). Not a test.

For each workload and partition (``Partition.by_tensor``, ``Partition.by_module``) this times ḡ,
H̄, H̄ with diag D̄ and H̄ with the full D̄ along a random direction, three ways side by side in one
run:

* ``reference``: the plain loop of ``research/wolinski.md`` §2.2, written here on the model's live
  parameters with ``torch.autograd.grad`` (one attached ḡ, then one pass per row over the subsets
  j ≥ i, one more pass per row for D̄_iii, one per pair (i, j ≤ k) for the full D̄);
* ``curvlib loop``: ``partitioned_derivatives(method="loop")`` (curvlib's default);
* ``curvlib batched``: ``partitioned_derivatives(method="batched", chunk_size=S)``: all S rows
  in one vmapped pass for ḡ, H̄ and diag D̄, S of the S(S+1)/2 pairs per pass for the full D̄ (all
  pairs at once would need S(S+1)/2 second-order graphs in memory).

**Time** is reported in units of one forward+backward of the same batch (``loss_fn(model(x), y)``
then ``torch.autograd.grad`` with respect to all parameters), divided by S for the quantities that
cost O(S) passes and by S(S+1)/2 for the full D̄. Every call of a method is timed between two
calls of the unit, and its ratio is taken to the mean of those two, so that load from other
processes affects numerator and denominator alike; the figure reported is the median of the
ratios over the repeats (with their range). One warm-up call of everything precedes the repeats.
By default the clock is wall time with ``torch.get_num_threads()`` threads as is. On a machine
shared with other jobs, ``--threads 1 --clock cpu`` (CPU time of a single-threaded process) is
far steadier: two threads on two busy cores measured per-repeat ratios spread over 0.3–2.0×
where one thread's CPU time stayed within 0.55–0.68× for the same call.

**Work** is the floating-point operation count of matrix products and convolutions
(``torch.utils.flop_counter``) in the same units: deterministic, independent of the machine and
its load, and the reason behind the time ratios.

**Memory** is the peak resident set size during one call minus the resident size just before it
(Linux: ``/proc/self/clear_refs`` resets the high-water mark ``VmHWM``), median of the repeats.
glibc's malloc would otherwise keep freed blocks for reuse and hide later peaks, so the script
fixes its mmap threshold at 64 KiB (``mallopt``): every tensor above that size is mapped on
allocation and unmapped on free, and the resident size follows the live tensors. Small
allocations (below 64 KiB) and the interpreter's own growth are included, as a user would see them.

Usage::

    python benchmarks/partitioned.py            # W1-tanh and W2-elu, full batches
    python benchmarks/partitioned.py --quick    # small batches, one repeat: a smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from workloads import DESCRIPTIONS, FACTORIES

from curvlib import Partition, partitioned_derivatives

# name: (order, third, normaliser of the pass count as a function of S, target per unit or None)
QUANTITIES: dict[str, tuple[int, str, Callable[[int], float], float | None]] = {
    "g": (1, "diag", lambda S: 1.0, None),
    "H": (2, "diag", lambda S: float(S), 1.2),
    "H + diag D": (3, "diag", lambda S: float(S), 2.0),
    "H + full D": (3, "full", lambda S: S * (S + 1) / 2, 1.5),
}
NORMALISER_NAMES = {"g": "1", "H": "S", "H + diag D": "S", "H + full D": "S(S+1)/2"}
METHODS = ("reference", "curvlib loop", "curvlib batched")
QUICK_BATCH = {"W1": 32, "W2": 16, "W3": 4}


# ----------------------------------------------------------------------------- the reference loop
def reference_loop(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor,
                   u: list[Tensor], partition: Partition, order: int, third: str) -> None:
    """The plain algorithm of ``research/wolinski.md`` §2.2 on the live parameters."""
    params, S = partition.parameters, len(partition)
    first = [partition.subset_of.index(s) for s in range(S)] + [len(params)]

    def contract(grads: tuple[Tensor | None, ...], start: int) -> list[Tensor]:
        out = [torch.zeros((), dtype=x.dtype) for _ in range(S - start)]
        for k, gr in enumerate(grads, start=first[start]):
            if gr is not None:
                out[partition.subset_of[k] - start] = (
                    out[partition.subset_of[k] - start] + (gr * u[k]).sum())
        return out

    def grad(out: Tensor, inputs: list[Tensor], create_graph: bool) -> tuple[Tensor | None, ...]:
        if not out.requires_grad:
            return (None,) * len(inputs)
        return torch.autograd.grad(out, inputs, retain_graph=True, create_graph=create_graph,
                                   allow_unused=True)

    loss = loss_fn(model(x), y)
    g = contract(grad(loss, params, order > 1), 0)
    H = torch.zeros(S, S)
    D = torch.zeros(S, S, S) if third == "full" else torch.zeros(S)
    for i in range(S if order > 1 else 0):
        row = contract(grad(g[i], params[first[i]:], order > 2), i)
        H[i, i:] = torch.stack(row).detach()
        if order < 3:
            continue
        if third == "diag":
            D[i] = contract(grad(row[0], params[first[i]:first[i + 1]], False), i)[0].detach()
            continue
        for j in range(i, S):
            D[i, j, j:] = torch.stack(contract(grad(row[j - i], params[first[j]:], False),
                                               j)).detach()


# ----------------------------------------------------------------------------- measurement
_LIBC = ctypes.CDLL("libc.so.6")
_M_MMAP_THRESHOLD = -3


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def peak_memory(fn: Callable[[], Any]) -> int:
    """Bytes: the peak resident size during fn() minus the resident size before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident size
    before = _status("VmRSS:")
    fn()
    return _status("VmHWM:") - before


def flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of the matrix products and convolutions of fn()."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def elapsed(fn: Callable[[], Any]) -> float:
    start = clock()
    fn()
    return clock() - start


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ----------------------------------------------------------------------------- the benchmark
def build(workload: str, quick: bool) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    base, _, activation = workload.partition("-")
    extra: dict[str, Any] = {"activation": activation} if activation else {}
    if quick:
        extra["batch_size"] = QUICK_BATCH[base]
    return FACTORIES[base](**extra)


def run(workload: str, partition_kind: str, quantities: list[str], repeats: int, quick: bool,
        chunk_size: int | None) -> list[dict[str, Any]]:
    model, loss_fn, x, y = build(workload, quick)
    partition = (Partition.by_tensor(model) if partition_kind == "by_tensor"
                 else Partition.by_module(model))
    S = len(partition)
    chunk_size = S if chunk_size is None else chunk_size
    gen = torch.Generator().manual_seed(0)
    u = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in partition.parameters]
    params = [p for p in model.parameters() if p.requires_grad]

    def unit() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params)

    rows = []
    for name in quantities:
        order, third, normaliser, target = QUANTITIES[name]
        calls: dict[str, Callable[[], Any]] = {
            "reference": lambda o=order, t=third: reference_loop(
                model, loss_fn, x, y, u, partition, o, t),
            "curvlib loop": lambda o=order, t=third: partitioned_derivatives(
                model, loss_fn, x, y, u, partition, o, t, method="loop"),
            "curvlib batched": lambda o=order, t=third: partitioned_derivatives(
                model, loss_fn, x, y, u, partition, o, t, method="batched",
                chunk_size=chunk_size),
        }
        unit()
        for call in calls.values():  # warm-up
            call()
        ratios: dict[str, list[float]] = {m: [] for m in METHODS}
        units: list[float] = []
        for _ in range(repeats):
            for method, call in calls.items():
                before = elapsed(unit)
                t = elapsed(call)
                after = elapsed(unit)
                units += [before, after]
                ratios[method].append(t / (0.5 * (before + after)) / normaliser(S))
        unit_flops = flops(unit)
        row = {
            "workload": workload, "partition": partition_kind, "S": S, "quantity": name,
            "target": target, "unit_s": statistics.median(units),
            "unit_mem": peak_memory(unit),
        }
        for method, call in calls.items():
            row[method] = statistics.median(ratios[method])
            row[f"{method} spread"] = (min(ratios[method]), max(ratios[method]))
            row[f"{method} work"] = flops(call) / unit_flops / normaliser(S)
            row[f"{method} mem"] = peak_memory(call)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def verdict(row: dict[str, Any]) -> str:
    """Targets (per-tensor partition): curvlib's default (the loop) against its target, and its
    time relative to the reference loop's (same algorithm: differences are noise or overhead)."""
    if row["partition"] != "by_tensor" or row["target"] is None:
        return ""
    default = row["curvlib loop"]
    met = "met" if default <= row["target"] else "MISSED"
    return f"{met} (≤ {row['target']}); vs ref {100 * (default / row['reference'] - 1):+.0f}%"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def format_row(row: dict[str, Any]) -> str:
    unit = NORMALISER_NAMES[row["quantity"]]
    cells = [row["workload"], row["partition"], str(row["S"]), row["quantity"], unit]
    cells += [f"{row[m]:.2f} ({row[f'{m} spread'][0]:.2f}–{row[f'{m} spread'][1]:.2f})"
              for m in METHODS]
    cells += [" / ".join(f"{row[f'{m} work']:.2f}" for m in METHODS)]
    cells += [f"{mib(row['unit_mem'])} / " + " / ".join(mib(row[f"{m} mem"]) for m in METHODS)]
    cells += [f"{row['unit_s'] * 1e3:.0f}", verdict(row)]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| workload | partition | S | quantity | per | time: reference | curvlib loop "
    "| curvlib batched "
    "| work: ref / loop / batched | peak MiB: F+B / ref / loop / batched | F+B ms "
    "| target (curvlib default) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["W1-tanh", "W2-elu"],
                        help="workload names from benchmarks/workloads.py")
    parser.add_argument("--partitions", nargs="+", default=["by_tensor", "by_module"],
                        choices=["by_tensor", "by_module"])
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES),
                        choices=list(QUANTITIES))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="chunk_size of the batched method (default: S)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch.get_num_threads() as is)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall-clock time, or CPU time of the process (robust to other jobs "
                        "on a shared machine when single-threaded)")
    parser.add_argument("--quick", action="store_true",
                        help="small batches and one repeat: a smoke run, not a measurement")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    global clock
    clock = CLOCKS[args.clock]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"{args.clock} clock; torch {torch.__version__}; "
          f"Python {platform.python_version()}; repeats {repeats}; batched chunk_size "
          f"{args.chunk_size or 'S'}{'; QUICK (small batches)' if args.quick else ''}")
    for workload in args.workloads:
        model, _, x, _ = build(workload, args.quick)
        print(f"{workload}: {DESCRIPTIONS[workload.partition('-')[0]]} (this run: batch "
              f"{x.shape[0]}, {sum(p.numel() for p in model.parameters())} parameters)")
    print(f"load average (1 min) at the start: {os.getloadavg()[0]:.1f}")
    print(HEADER, flush=True)
    start = time.perf_counter()
    for workload in args.workloads:
        for kind in args.partitions:
            run(workload, kind, args.quantities, repeats, args.quick, args.chunk_size)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}; "
          f"{time.perf_counter() - start:.0f} s wall-clock")


if __name__ == "__main__":
    main()
