"""The DeepSpeed config, generated from the run's config: one source of truth for batch sizes,
accumulation, ZeRO stage, precision and clipping. A user's DeepSpeed JSON (deepspeed.config) is
merged on top, key by key, and what it changed is reported."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import BatchPlan, ConfigError, RunConfig


def _merge(base: dict, extra: dict, prefix: str = "") -> list[str]:
    """Merge extra into base in place; return the dotted keys it set."""
    changed = []
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            changed += _merge(base[key], value, f"{prefix}{key}.")
        elif base.get(key) != value:
            base[key] = value
            changed.append(f"{prefix}{key}")
    return changed


DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce/allgather bucket (elements)
DEFAULT_PREFETCH = 50_000_000  # ZeRO-3 prefetch bucket
BUCKET_ALIGNMENT = 256  # DeepSpeed asserts buckets are a multiple of its NCCL start alignment (2 elements)


def bucket_size(n_params: int, default: int) -> int:
    """min(default, the parameter count rounded up to the alignment): a model with an odd count
    (num_classes=3) would otherwise fail DeepSpeed's allgather_bucket_size assertion at ZeRO 1/2."""
    return min(default, -(-n_params // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT)


def build_ds_config(cfg: RunConfig, plan: BatchPlan, n_params: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """(DeepSpeed config dict, keys the user's JSON overrode). With the model's parameter count,
    ZeRO's communication buckets are capped at it: DeepSpeed's 5e8-element default allocates
    ~1 GB per rank for ZeRO-3's reduce bucket even for a model a fraction of that size."""
    ds: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": cfg.optim.clip_grad or 0.0,
        # bf16 needs no loss scale; DeepSpeed's per-step overflow check would sync the host every step,
        # and the trainer checks the loss for non-finite values at each log window (and rolls back)
        "bf16": {"enabled": cfg.deepspeed.bf16 and cfg.deepspeed.bf16_mode == "weights", "check_grad_overflow": False},
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,  # our torch AdamW with its param groups
        "steps_per_print": 2 ** 31 - 1,         # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on unless told) calls get_accelerator().synchronize() in every
        # engine.forward and engine.step: two device syncs per micro-step on CUDA. The trainer measures
        # speed itself at its log windows.
        "timers": {"throughput": {"enabled": False}},
    }
    if cfg.deepspeed.bf16 and cfg.deepspeed.bf16_mode == "autocast":  # fp32 weights, grads and all-reduce
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if n_params and cfg.deepspeed.zero_stage > 0:
        zero = ds["zero_optimization"]
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = bucket_size(n_params, DEFAULT_BUCKET)
        if cfg.deepspeed.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = bucket_size(n_params, DEFAULT_PREFETCH)
    if cfg.deepspeed.zero_stage in (1, 2) and not torch.cuda.is_available():
        # gloo: reduce each rank's gradient partition to its owner (half an all-reduce's traffic) instead of
        # all-reducing every bucket: less overhead over DDP on CPU (README, trainer overhead). NCCL keeps
        # DeepSpeed's default, one all-reduce per bucket, which scales better to many ranks.
        ds["zero_optimization"]["use_multi_rank_bucket_allreduce"] = False
    changed: list[str] = []
    if cfg.deepspeed.config:
        path = Path(cfg.deepspeed.config)
        try:
            extra = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"deepspeed.config={path}: cannot read it as JSON ({e})") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"deepspeed.config={path}: expected a JSON object")
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            if key in extra and extra[key] != ds[key]:
                raise ConfigError(f"deepspeed.config={path} sets {key}={extra[key]}, but the run's config gives "
                                  f"{ds[key]}: set batch sizes with train.batch_size / grad_accum / global_batch")
        changed = _merge(ds, extra)
    return ds, changed
