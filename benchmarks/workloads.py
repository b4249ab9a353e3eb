"""The benchmark workloads, defined once and shared by every script in ``benchmarks/``.

Each workload is a seeded, float32 batch and a freshly initialised model:

* **W1** — MLP 784-512-512-10 on a batch of 256, cross-entropy. Activation ``relu`` by default
  (``W1-tanh`` for the smooth variant the partitioned benchmark needs).
* **W2** — CNN on 3×32×32 images, batch 128: three 3×3 convolutions (32, 64, 128 channels,
  padding 1), each followed by the activation and a 2×2 max-pool, then a linear head to 10 classes.
  ``relu`` by default, ``W2-elu`` for the smooth variant.
* **W3** — one pre-LayerNorm transformer encoder block on sequences: batch 32, 64 tokens,
  an input projection from 32 features to width 128, hand-written 4-head self-attention whose
  q/k/v/out projections are ``nn.Linear`` (so every projection is Kronecker-covered), an MLP
  128-256-128 (GELU by default) and a per-token classifier to 10 classes. The model returns
  [N, C, T] logits for a per-token ``nn.CrossEntropyLoss``.

Use :func:`make_workload` with a name such as ``"W1"``, ``"W1-tanh"`` or ``"W2-elu"``, or call the
factories directly. A :class:`Workload` unpacks as ``model, loss_fn, inputs, targets``;
:func:`kron_modules` lists the layers a Kronecker estimate covers (all ``nn.Linear`` and
``nn.Conv2d`` modules; W3's LayerNorm parameters are not among them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_CLASSES = 10

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


class Workload(NamedTuple):
    """A model, its loss and one batch; unpacks as ``model, loss_fn, inputs, targets``."""

    model: nn.Module
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}."
        ) from None


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def w1_mlp(
    *,
    activation: str = "relu",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Workload:
    """W1: MLP 784-512-512-10 with cross-entropy."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(784, 512),
        _activation(activation),
        nn.Linear(512, 512),
        _activation(activation),
        nn.Linear(512, NUM_CLASSES),
    )
    gen = _generator(seed + 1)
    inputs = torch.randn(batch_size, 784, generator=gen, dtype=dtype)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    return Workload(
        model.to(device, dtype), nn.CrossEntropyLoss(), inputs.to(device), targets.to(device)
    )


def w2_cnn(
    *,
    activation: str = "relu",
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Workload:
    """W2: conv 32-64-128 (3×3, padding 1) + activation + 2×2 max-pool each, linear head to 10."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = [3, 32, 64, 128]
    for c_in, c_out in itertools.pairwise(channels):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), _activation(activation), nn.MaxPool2d(2)]
    layers += [nn.Flatten(), nn.Linear(128 * 4 * 4, NUM_CLASSES)]
    model = nn.Sequential(*layers)
    gen = _generator(seed + 1)
    inputs = torch.randn(batch_size, 3, 32, 32, generator=gen, dtype=dtype)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    return Workload(
        model.to(device, dtype), nn.CrossEntropyLoss(), inputs.to(device), targets.to(device)
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.Linear`` q/k/v/out projections (no fused in_proj)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}.")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, width = x.shape
        head_dim = width // self.heads

        def split(y: Tensor) -> Tensor:
            return y.view(n, t, self.heads, head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, t, width))


class EncoderBlockClassifier(nn.Module):
    """Input projection, one pre-LN encoder block, per-token classifier; returns [N, C, T]."""

    def __init__(
        self,
        in_features: int = 32,
        width: int = 128,
        hidden: int = 256,
        heads: int = 4,
        num_classes: int = NUM_CLASSES,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), _activation(activation), nn.Linear(hidden, width)
        )
        self.norm3 = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = h + self.attn(self.norm1(h))
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm3(h)).transpose(1, 2)


def w3_transformer(
    *,
    activation: str = "gelu",
    batch_size: int = 32,
    seq_len: int = 64,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Workload:
    """W3: transformer encoder block, per-token cross-entropy over [N, C, T] logits."""
    torch.manual_seed(seed)
    model = EncoderBlockClassifier(activation=activation)
    gen = _generator(seed + 1)
    inputs = torch.randn(batch_size, seq_len, 32, generator=gen, dtype=dtype)
    targets = torch.randint(0, NUM_CLASSES, (batch_size, seq_len), generator=gen)
    return Workload(
        model.to(device, dtype), nn.CrossEntropyLoss(), inputs.to(device), targets.to(device)
    )


FACTORIES: dict[str, Callable[..., Workload]] = {
    "W1": w1_mlp,
    "W2": w2_cnn,
    "W3": w3_transformer,
}

DESCRIPTIONS: dict[str, str] = {
    "W1": "MLP 784-512-512-10, batch 256",
    "W2": "CNN conv32-64-128 + linear, 3×32×32, batch 128",
    "W3": "transformer block, batch 32 × 64 tokens, width 128",
}


def make_workload(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Workload:
    """Build a workload by name: ``"W1"``, ``"W2"``, ``"W3"``, optionally ``"-<activation>"``."""
    base, _, activation = name.partition("-")
    if base not in FACTORIES:
        raise ValueError(f"Unknown workload {name!r}; choose from {sorted(FACTORIES)}.")
    extra = {"activation": activation} if activation else {}
    return FACTORIES[base](device=device, dtype=dtype, seed=seed, **extra)


def kron_modules(model: nn.Module) -> list[nn.Module]:
    """The layers a Kronecker estimate covers: every ``nn.Linear`` and ``nn.Conv2d``, in order."""
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
