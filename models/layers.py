"""Layers shared by both model families."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples' residual branches with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class Mlp(nn.Module):
    """Linear -> GELU -> Linear on the last (channel) axis."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def init_linear_and_norm(module: nn.Module) -> None:
    """The init both papers use: Linear trunc-normal(0.02) / bias 0, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def stochastic_depth_rates(drop_path: float, depths: list[int] | tuple[int, ...]) -> list[list[float]]:
    """Per-stage lists of drop-path rates rising linearly from 0 to drop_path over all blocks."""
    rates = torch.linspace(0, drop_path, sum(depths), device="cpu").tolist()  # cpu: also under a meta-device build
    out, start = [], 0
    for d in depths:
        out.append(rates[start:start + d])
        start += d
    return out


def checkpoint_seq(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run a stage's blocks with activation checkpointing, one checkpoint per block (timm's
    `checkpoint_seq` granularity): each block's activations are recomputed in the backward pass,
    only its input is kept. Drop-path draws are replayed identically (the RNG state is restored)."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x
