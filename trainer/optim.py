"""AdamW parameter groups and the per-step learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import RunConfig


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters with and without weight decay: decay on weight matrices/kernels
    only, not on norms, biases (1-D) or what the model lists in no_weight_decay() (e.g. CS-Mixer's
    per-head mixing bias). The optimizer's group order; export reads bf16 ZeRO-0 master weights by it."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float,
          min_lr: float, cooldown_steps: int = 0) -> float:
    """Linear warmup from warmup_lr to peak_lr, cosine decay to min_lr, then min_lr for the cooldown."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - cooldown_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * t))


def build_optimizer(cfg: RunConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=lr, betas=tuple(o.betas), eps=o.eps)
