"""train.batch_size=auto: the largest per-GPU micro-batch that fits, found at start; the global batch is kept
by gradient accumulation. A probe step (forward, backward, AdamW step on a copy of the model, in the run's
precision) is tried at the whole per-rank batch, then at halves of it (divisors, so the accumulation is
exact) until one fits; the ranks take the smallest answer. Without CUDA there is nothing to probe: the
per-rank batch is used whole."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig, plan_batch

MEMORY_HEADROOM = 0.9  # a probe that peaks above this share of the GPU's memory does not fit: the engine's
                       # buffers (ZeRO's flat partitions, reduce buckets) and the loader's come on top


def largest_fitting(per_rank: int, fits: Callable[[int], bool], even: bool = False) -> tuple[int, list[tuple[int, bool]]]:
    """(the largest micro-batch that fits, [(size, fitted)] in the order tried): per_rank first, then the
    largest divisor of per_rank at most half the last size tried (an even one with `even`: Mixup/CutMix
    pair each image with another of its micro-batch)."""
    tried: list[tuple[int, bool]] = []
    size = per_rank
    while True:
        ok = fits(size)
        tried.append((size, ok))
        if ok:
            return size, tried
        smaller = [d for d in range(1, size // 2 + 1) if per_rank % d == 0 and (d % 2 == 0 or not even)]
        if not smaller:
            raise ConfigError(f"train.batch_size=auto: not even a micro-batch of {size} image(s) fits in this GPU's "
                              "memory (try model.grad_checkpointing=true or deepspeed.zero_stage=3)")
        size = max(smaller)


def probe_fits(model: torch.nn.Module, cfg: RunConfig, batch: int, device: torch.device) -> bool:
    """One training step of a copy of the model at this micro-batch; False on out-of-memory (or, on a GPU, a
    peak above MEMORY_HEADROOM of its memory). The model itself is not touched."""
    cuda = device.type == "cuda"
    probe = None
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        probe = copy.deepcopy(model).to(device).train()
        weights_bf16 = cfg.deepspeed.bf16 and cfg.deepspeed.bf16_mode == "weights"
        if weights_bf16:
            probe = probe.to(torch.bfloat16)
        opt = torch.optim.AdamW(probe.parameters(), lr=1e-6)
        size = cfg.model.img_size
        x = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16 if weights_bf16 else torch.float32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.deepspeed.bf16 and not weights_bf16):
            loss = probe(x).float().logsumexp(1).mean()
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
            _, total = torch.cuda.mem_get_info(device)
            return torch.cuda.max_memory_allocated(device) <= MEMORY_HEADROOM * total
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del probe
        if cuda:
            torch.cuda.empty_cache()


def resolve_auto_batch(cfg: RunConfig, model: torch.nn.Module, device: torch.device, world_size: int,
                       probe: bool | None = None) -> tuple[RunConfig, str]:
    """(the config with train.batch_size a number, the [plan] note); unchanged when it is not 'auto'.
    probe=None: probe on CUDA only (True forces it: the CPU test of this logic)."""
    if cfg.train.batch_size != "auto":
        return cfg, ""
    per_rank = plan_batch(cfg, world_size).batch_size
    if not (probe if probe is not None else device.type == "cuda"):
        chosen, how = per_rank, f"{per_rank}/rank, the whole per-rank batch (no CUDA device to probe)"
    else:
        mixing = (cfg.aug.mixup or cfg.aug.cutmix) and cfg.aug.mixup_prob > 0 and cfg.data.backend != "synthetic"
        chosen, tried = largest_fitting(per_rank, lambda b: probe_fits(model, cfg, b, device), even=bool(mixing))
        if world_size > 1 and dist.is_initialized():  # every rank runs the same micro-batch: the smallest answer
            t = torch.tensor([chosen], device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            chosen = int(t.item())
        steps = ", ".join(f"{b} {'fits' if ok else 'out of memory'}" for b, ok in tried)
        how = f"probed {steps} -> {chosen}/rank"
    accum = per_rank // chosen
    note = f"[batch] train.batch_size=auto: {how}; x accum {accum} keeps the global batch {cfg.train.global_batch}"
    train = dataclasses.replace(cfg.train, batch_size=chosen, grad_accum=None)
    return dataclasses.replace(cfg, train=train), note
