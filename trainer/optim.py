"""Optimizer (timm's `opt` names) with parameter groups, and the per-step learning-rate schedule
(timm's `sched` names), both read from the run config."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import RunConfig


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters with and without weight decay: decay on weight matrices/kernels
    only, not on norms, biases (1-D) or what the model lists in no_weight_decay() (e.g. CS-Mixer's
    per-head mixing bias)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: float | None = None) -> list[dict]:
    """Decay / no-decay groups; with layer_decay (timm's --layer-decay, BEiT's convention) one pair per
    depth, the lr of depth i scaled by layer_decay ** (top - i): the head at the full lr, the stem at
    the smallest. Each group carries its `lr_scale`; the schedule multiplies every group's own lr."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    if layer_decay is None:
        return [{"params": [params[n] for n in decay], "weight_decay": weight_decay, "lr": lr},
                {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "lr": lr}]
    ids = model.layer_ids()
    top = max(ids.values())
    groups: dict[tuple[int, bool], dict] = {}
    for names, wd in ((decay, weight_decay), (no_decay, 0.0)):
        for n in names:
            scale = layer_decay ** (top - ids[n])
            group = groups.setdefault((ids[n], wd > 0), {"params": [], "weight_decay": wd, "lr": lr * scale,
                                                          "lr_scale": scale, "layer_id": ids[n]})
            group["params"].append(params[n])
    return [groups[k] for k in sorted(groups)]


def build_optimizer(cfg: RunConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """adamw / adam (decoupled vs L2 weight decay), sgd and momentum (timm: sgd is Nesterov)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, lr, o.layer_decay)
    if o.opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps)
    if o.opt == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(o.betas), eps=o.eps)
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.opt == "sgd")


def lr_at(step: int, *, sched: str = "cosine", peak_lr: float, total_steps: int, warmup_steps: int,
          warmup_lr: float, min_lr: float, cooldown_steps: int = 0, decay_steps: int = 1,
          decay_rate: float = 0.1, cooldown_shape: str = "1-sqrt") -> float:
    """Linear warmup from warmup_lr to peak_lr, then
    cosine: decay to min_lr over the remaining steps less the cooldown, min_lr for the cooldown;
    step:   peak_lr x decay_rate ** (steps after warmup // decay_steps), not below min_lr;
    const:  peak_lr;
    wsd:    warmup-stable-decay: peak_lr until the last cooldown_steps, then down to min_lr along
            cooldown_shape (linear, 1-sqrt, cosine of the decay's progress t in [0, 1])."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    if sched == "const":
        return peak_lr
    if sched == "wsd":
        start = total_steps - cooldown_steps
        if step < start:
            return peak_lr
        t = min(1.0, (step - start) / max(1, cooldown_steps))
        fall = {"linear": t, "1-sqrt": math.sqrt(t), "cosine": 0.5 * (1 - math.cos(math.pi * t))}[cooldown_shape]
        return peak_lr - (peak_lr - min_lr) * fall
    if sched == "step":
        return max(min_lr, peak_lr * decay_rate ** ((step - warmup_steps) // max(1, decay_steps)))
    decay = max(1, total_steps - warmup_steps - cooldown_steps)
    t = min(1.0, (step - warmup_steps) / decay)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * t))


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, peak_lr: float, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped by DeepSpeed once per applied optimizer update (not on a skipped one)."""
    s = cfg.schedule
    args = dict(sched=s.sched, peak_lr=peak_lr, total_steps=total_steps, warmup_lr=s.warmup_lr, min_lr=s.min_lr,
                warmup_steps=round(s.warmup_epochs * steps_per_epoch),
                cooldown_steps=round(s.cooldown_epochs * steps_per_epoch) if s.cooldown_epochs or s.sched != "wsd"
                else round(s.cooldown_fraction * total_steps),
                decay_steps=round(s.decay_epochs * steps_per_epoch), decay_rate=s.decay_rate,
                cooldown_shape=s.cooldown_shape)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, **args) / peak_lr)
