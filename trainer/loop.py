"""The training loop: plain PyTorch (DDP over gloo on CPU, NCCL on GPU), one process per device.

AdamW, per-step warmup + cosine, soft-target cross-entropy (the data pipeline folds label
smoothing and Mixup/CutMix into the targets), top-1/top-5 evaluation every epoch. It refuses
recipe features it does not implement yet (EMA) instead of silently ignoring them.
"""
from __future__ import annotations

import datetime
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data_pipeline import build_loaders
from data_pipeline.augment import SoftTargetCrossEntropy
from models import create_model

from .config import ConfigError, RunConfig, plan_batch, resolved
from .optim import build_optimizer, lr_at


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed() -> DistEnv:
    """Ranks from the launcher's environment (torchrun, deepspeed); one process if none is set."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, local_rank, world, device)


def unsupported_features(cfg: RunConfig) -> list[str]:
    return ["train.model_ema=true"] if cfg.train.model_ema else []


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_run_dir(cfg: RunConfig, env: DistEnv) -> Path:
    """Rank 0 names and creates the run directory and saves the resolved config there."""
    name = [cfg.train.run_name or f"{cfg.model.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"]
    if env.world_size > 1:
        dist.broadcast_object_list(name, src=0)
    run_dir = Path(cfg.train.output_dir) / name[0]
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, autocast) -> tuple[float, float]:
    """Top-1 / top-5 in percent over the whole val set (each image counted once across ranks)."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=env.device)  # top1, top5, n
    for images, labels in loader:
        with autocast():
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels))]).double()
    if env.world_size > 1:
        dist.all_reduce(counts)
    model.train()
    top1, top5, n = counts.tolist()
    return 100 * top1 / n, 100 * top5 / n


def train(cfg: RunConfig) -> float:
    """Train as configured; returns the final val top-1 (percent)."""
    env = init_distributed()
    missing = unsupported_features(cfg)
    if missing:
        raise ConfigError(f"this trainer does not implement {', '.join(missing)} yet: set them to 0/none/false")
    cfg = resolved(cfg, env.world_size)
    plan = plan_batch(cfg, env.world_size)
    seed_everything(cfg.train.seed + env.rank)
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, img_size=cfg.model.img_size,
                         drop_path=cfg.model.drop_path).to(env.device)
    optimizer = build_optimizer(cfg, model, plan.lr)
    train_loader, val_loader = build_loaders(cfg, env.rank, env.world_size, env.device)
    run_dir = make_run_dir(cfg, env)
    ddp_model = nn.parallel.DistributedDataParallel(model) if env.world_size > 1 else model

    steps_per_epoch = len(train_loader) // plan.grad_accum
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    sched = dict(peak_lr=plan.lr, total_steps=total_steps, warmup_lr=cfg.schedule.warmup_lr,
                 min_lr=cfg.schedule.min_lr, warmup_steps=round(cfg.schedule.warmup_epochs * steps_per_epoch),
                 cooldown_steps=round(cfg.schedule.cooldown_epochs * steps_per_epoch))
    bf16 = cfg.deepspeed.bf16
    autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    loss_fn = SoftTargetCrossEntropy()
    log = print if env.rank == 0 else (lambda *a, **k: None)
    log(f"[plan] {cfg.model.name}: world size {env.world_size}, batch {plan.batch_size}/rank x accum "
        f"{plan.grad_accum} = global {plan.global_batch}; {steps_per_epoch} steps/epoch, {total_steps} steps; "
        f"lr {plan.lr:g} ({plan.lr_rule}); {'bf16' if bf16 else 'fp32'} on {env.device.type}; run dir {run_dir}")

    step, top1 = 0, 0.0
    running = torch.zeros((), device=env.device)
    t0 = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        train_loader.set_position(epoch)
        for i, (images, targets) in enumerate(train_loader):
            with autocast():
                loss = loss_fn(ddp_model(images), targets) / plan.grad_accum
            loss.backward()
            running += loss.detach()
            if (i + 1) % plan.grad_accum:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, **sched)
            if cfg.optim.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.train.log_every == 0:  # the only host sync of the loop
                dt = time.perf_counter() - t0
                log(f"epoch {epoch} step {step}/{total_steps} loss {running.item() / cfg.train.log_every:.4f} "
                    f"lr {optimizer.param_groups[0]['lr']:.3g} "
                    f"{cfg.train.log_every * plan.global_batch / dt:.0f} img/s", flush=True)
                running.zero_()
                t0 = time.perf_counter()
            if step >= total_steps:
                break
        top1, top5 = evaluate(ddp_model, val_loader, env, autocast)
        log(f"epoch {epoch} val top1 {top1:.2f} top5 {top5:.2f}", flush=True)
        if step >= total_steps:
            break
    if env.rank == 0:
        torch.save(model.state_dict(), run_dir / "model_final.pt")
    if env.world_size > 1:
        dist.destroy_process_group()
    return top1
