"""Kronecker estimates under torch.distributed (two gloo ranks on CPU, float64).

Each rank sees an uneven shard of every batch; with ``process_group`` the estimate on every rank
must equal the estimate of one process that saw the whole batches — for a mean loss the batch-size
weighting across shards matters, for a sum loss the shards add up to one batch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from curvlib import EKFAC, KFAC, TEKFAC, TKFAC
from curvlib.kron import KroneckerEstimate
from curvlib.testing import assert_close
from tests.cases import make_case

METHODS: dict[str, type[KroneckerEstimate]] = {
    "KFAC": KFAC, "EKFAC": EKFAC, "TKFAC": TKFAC, "TEKFAC": TEKFAC,
}
# (method, case, reduction, ema_decay, weight_sharing): shared positions, both reductions, EMA.
CONFIGS = [
    ("KFAC", "cnn", "mean", None, "expand"),
    ("EKFAC", "sequence", "sum", None, "expand"),
    ("TKFAC", "cnn", "mean", 0.5, "reduce"),
    ("TEKFAC", "mlp", "sum", 0.7, "expand"),
    ("EKFAC", "cnn", "mean", 0.6, "expand"),
]
BATCHES = [slice(0, 7), slice(7, 12)]  # two statistics steps
SHARDS = [[slice(0, 2), slice(2, 7)], [slice(7, 11), slice(11, 12)]]  # per step, per rank


def build(config: tuple, process_group: dist.ProcessGroup | None = None
          ) -> tuple[KroneckerEstimate, Tensor, Tensor]:
    method, case, reduction, ema_decay, sharing = config
    model, loss_fn, x, y = make_case(case, "cross_entropy", reduction, batch=12, seed=2)
    estimate = METHODS[method](model, loss_fn, fisher="type2", ema_decay=ema_decay,
                               weight_sharing=sharing, process_group=process_group)
    return estimate, x, y


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        results = {}
        for index, config in enumerate(CONFIGS):
            estimate, x, y = build(config, dist.group.WORLD)
            for shards in SHARDS:
                estimate.update(x[shards[rank]], y[shards[rank]])
            results[index] = estimate.to_dense()
        model, loss_fn, x, y = make_case("mlp", batch=4, seed=3)
        mc = KFAC(model, loss_fn, fisher="mc", seed=0, process_group=dist.group.WORLD)
        mc.update(x, y)  # the same shard on both ranks: only the MC draws differ
        results["mc_G"] = mc.factors()["0"]["G"]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """The results of both ranks (one spawn for all tests of the module)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(worker, args=(2, init_file, out_dir), nprocs=2, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[c[0] + "-" + c[2] for c in CONFIGS])
def test_sharded_statistics_equal_one_process(ranks: list[dict], index: int) -> None:
    estimate, x, y = build(CONFIGS[index])
    for batch in BATCHES:
        estimate.update(x[batch], y[batch])
    expected = estimate.to_dense()
    for rank, results in enumerate(ranks):
        assert_close(results[index], expected, rtol=1e-11, what=f"rank {rank}")


def test_ranks_draw_their_own_mc_targets(ranks: list[dict]) -> None:
    """Same shard on both ranks: with identical draws the mean over both would be one rank's G."""
    model, loss_fn, x, y = make_case("mlp", batch=4, seed=3)
    single = KFAC(model, loss_fn, fisher="mc", seed=0)
    single.update(x, y)
    g = single.factors()["0"]["G"]
    assert_close(ranks[0]["mc_G"], ranks[1]["mc_G"], rtol=1e-12, what="ranks agree")
    assert float((ranks[0]["mc_G"] - g).abs().max()) > 1e-3 * float(g.abs().max())


def test_process_group_needs_initialized_distributed() -> None:
    model, loss_fn, _, _ = make_case("mlp")
    with pytest.raises(ValueError, match="not initialized"):
        KFAC(model, loss_fn, process_group=object())  # type: ignore[arg-type]
