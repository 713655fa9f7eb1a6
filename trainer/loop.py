"""The training loop: a small loop around `deepspeed.initialize`.

AdamW (no decay on norms, biases, CS-Mixer's mixing bias), per-step warmup + cosine, soft-target
cross-entropy (the data pipeline folds smoothing and Mixup/CutMix into the targets), optional EMA,
top-1/top-5 every epoch, atomic checkpoints with exact resume, and a clean stop on SIGUSR1/
SIGUSR2/SIGTERM. The host synchronises only every `train.log_every` steps (loss, stop request,
non-finite check), at checkpoints and at epoch ends.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline import build_loaders
from data_pipeline.augment import SoftTargetCrossEntropy
from models import count_gmacs, count_params, create_model, model_info

from .checkpoint import CheckpointError, Checkpointer, check_complete, export, set_rng_state, to_universal
from .config import ConfigError, RunConfig, plan_batch, resolved
from .distributed import DistEnv, init_distributed
from .ds_config import build_ds_config
from .ema import ModelEma
from .optim import build_optimizer, lr_at
from .tracking import Tracker, default_uri, flatten, git_commit, local_artifact_root, run_id_of

EXIT_PREEMPTED = 85   # checkpointed after a stop signal: requeue me
EXIT_NONFINITE = 3    # the loss became NaN/inf
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainResult:
    step: int
    top1: float | None = None
    top5: float | None = None
    ema_top1: float | None = None
    preempted: bool = False
    # steady-state training speed: images/s over the log windows after the run's first (which holds
    # start-up: loader workers, FFCV's compile, DALI's build); None with fewer than two windows
    images_per_sec: float | None = None


class StopRequest:
    """Signal handlers only set a flag; the loop acts on it at the next step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def done(self) -> None:
        """The stop checkpoint is written: later signals (a launcher terminating the other ranks once
        one exited) must not turn the exit code 85 into a death by signal."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled (one small all-reduce)."""
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_tflops(cfg: RunConfig, device: torch.device) -> float | None:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None


def resume_point(cfg: RunConfig, ckpt: Checkpointer) -> tuple[Path, dict] | None:
    if cfg.train.resume == "none":
        return None
    tag_dir = ckpt.latest() if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if tag_dir is None:
        return None
    meta = check_complete(tag_dir)
    if meta.get("model") != cfg.model.name:
        raise CheckpointError(f"checkpoint {tag_dir} is of model {meta.get('model')!r}, but model.name="
                              f"{cfg.model.name!r}: use another train.run_name / train.resume, or the matching config")
    return tag_dir, meta


def run_directory(cfg: RunConfig, env: DistEnv) -> Path:
    name = [cfg.train.run_name or f"{cfg.model.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"]
    dist.broadcast_object_list(name, src=0)  # every rank uses rank 0's timestamp
    return Path(cfg.train.output_dir) / name[0]


@torch.no_grad()
def evaluate(model, loader, env: DistEnv, dtype: torch.dtype) -> tuple[float, float]:
    """Top-1 / top-5 in percent over the whole val set (each image counted once across ranks)."""
    counts = torch.zeros(3, dtype=torch.float64, device=env.device)  # top1, top5, n
    for images, labels in loader:
        logits = model(images.to(dtype))
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels))]).double()
    dist.all_reduce(counts)
    top1, top5, n = counts.tolist()
    return 100 * top1 / n, 100 * top5 / n


def start_tracking(cfg: RunConfig, run_dir: Path, env: DistEnv, run_id: str | None, restarts: int,
                   step: int, log) -> Tracker:
    """Rank 0's MLflow run: a new one, or the checkpoint's run continued with a restart tag."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(cfg.train.output_dir)
    tracker = Tracker(uri, cfg.tracking.experiment, run_dir, run_dir.name, run_id, artifact_root=local_artifact_root(uri),
                      system_metrics=cfg.tracking.system_metrics, retry_s=cfg.tracking.retry_s, log=log)
    tags = {"world_size": env.world_size, "restart_count": restarts, "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}
    if "SLURM_JOB_ID" in os.environ:  # SLURM sets the count from the first requeue on
        tags["slurm_restart_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    if run_id is None:
        info = model_info(cfg.model.name)
        tracker.log_params(flatten(cfg.to_dict()))
        tracker.set_tags({**tags, "model": cfg.model.name, "family": info.family, "git_commit": git_commit(),
                          "mlflow.runName": run_dir.name})
        for name in ("config.yaml", "deepspeed_config.json"):
            tracker.log_artifact(run_dir / name)
    else:
        tracker.set_tags({**tags, f"restart_{restarts}_from_step": step})
        for name in ("config.yaml", "deepspeed_config.json"):
            tracker.log_artifact(run_dir / name, f"restart_{restarts}")
    return tracker


def train(cfg: RunConfig) -> TrainResult:
    import deepspeed

    stop = StopRequest()  # first: a stop signal during start-up must not kill the rank
    env = init_distributed()
    if cfg.train.model_ema and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("train.model_ema=true needs the full weights on every rank: use deepspeed.zero_stage "
                          "0, 1 or 2 (ZeRO-3 partitions the parameters)")
    cfg = resolved(cfg, env.world_size)
    plan = plan_batch(cfg, env.world_size)
    run_dir = run_directory(cfg, env)
    ckpt = Checkpointer(Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints",
                        cfg.checkpoint.keep_last, env)
    resume = resume_point(cfg, ckpt)
    seed_everything(cfg.train.seed + env.rank)

    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, img_size=cfg.model.img_size,
                         drop_path=cfg.model.drop_path)
    train_flops = count_gmacs(model, cfg.model.img_size) * 1e9 * 2 * 3  # fwd + bwd FLOPs per image
    train_loader, val_loader = build_loaders(cfg, env.rank, env.world_size, env.device)
    steps_per_epoch = len(train_loader) // plan.grad_accum
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    sched = dict(peak_lr=plan.lr, total_steps=total_steps, warmup_lr=cfg.schedule.warmup_lr,
                 min_lr=cfg.schedule.min_lr, warmup_steps=round(cfg.schedule.warmup_epochs * steps_per_epoch),
                 cooldown_steps=round(cfg.schedule.cooldown_epochs * steps_per_epoch))
    optimizer = build_optimizer(cfg, model, plan.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, **sched) / plan.lr)
    ds_config, user_keys = build_ds_config(cfg, plan, count_params(model))
    if resume and resume[1]["world_size"] != env.world_size and cfg.deepspeed.zero_stage > 0:
        load_dir = to_universal(resume[0], env)
        ds_config["checkpoint"] = {"load_universal": True}
    else:
        load_dir = resume[0] if resume else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    ema = ModelEma(engine.module, cfg.train.model_ema_decay) if cfg.train.model_ema else None

    step, epoch, step_in_epoch, tracking_run_id, restarts = 0, 0, 0, None, 0
    log = (lambda *a: print(*a, flush=True)) if env.is_main else (lambda *a: None)
    if resume:
        tag_dir, meta = resume
        engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name)
        step, epoch, step_in_epoch = meta["step"], meta["epoch"], meta["step_in_epoch"]
        tracking_run_id, restarts = meta.get("tracking_run_id"), meta.get("restarts", 0) + 1
        rng_file = tag_dir / f"rng_rank{env.rank}.pt"
        if rng_file.is_file() and meta["world_size"] == env.world_size:
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            seed_everything(cfg.train.seed + env.rank + 1_000_003 * step)
        if ema:
            ema.load_state_dict(torch.load(tag_dir / "ema.pt", map_location=env.device))
        how = (f"converted to a universal checkpoint for world size {env.world_size} (saved at "
               f"{meta['world_size']})" if load_dir != tag_dir else "same world size")
        log(f"[resume] {tag_dir}: step {step}, epoch {epoch} (+{step_in_epoch} steps); {how}")

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1))
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    peak = peak_tflops(cfg, env.device)
    log(f"[plan] {cfg.model.name}: world size {env.world_size}; batch {plan.batch_size}/rank x accum "
        f"{plan.grad_accum} x {env.world_size} ranks = global {plan.global_batch}; {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps ({cfg.train.epochs} epochs{', max_steps ' + str(cfg.train.max_steps) if cfg.train.max_steps else ''}); "
        f"lr {plan.lr:g} ({plan.lr_rule}); ZeRO stage {cfg.deepspeed.zero_stage}; "
        f"{'bf16' if cfg.deepspeed.bf16 else 'fp32'} on {env.device.type}; data {cfg.data.backend}; run dir {run_dir}")
    if user_keys:
        log(f"[deepspeed] {cfg.deepspeed.config} overrides: {', '.join(user_keys)}")
    if resume and tracking_run_id is None:  # checkpointed before the run was created: the run file knows it
        tracking_run_id = run_id_of(run_dir)
    tracker = start_tracking(cfg, run_dir, env, tracking_run_id, restarts, step, log) \
        if env.is_main and cfg.tracking.enabled else None
    try:
        result = _loop(cfg, env, plan, engine, scheduler, ema, ckpt, train_loader, val_loader, steps_per_epoch,
                       total_steps, step, epoch, step_in_epoch, restarts, tracker, log, dtype, peak, train_flops,
                       stop, tracking_run_id)
    except BaseException:
        if tracker:
            tracker.finish("FAILED")
        raise
    if tracker:
        last = ckpt.latest()
        if not result.preempted and cfg.tracking.log_model and last:
            for weights_ema in ([False, True] if ema else [False]):
                tracker.log_artifact(export(last, ema=weights_ema), "model")
        tracker.finish("KILLED" if result.preempted else "FINISHED")
    return result


def _loop(cfg: RunConfig, env: DistEnv, plan, engine, scheduler, ema: ModelEma | None, ckpt: Checkpointer,
          train_loader, val_loader, steps_per_epoch: int, total_steps: int, step: int, epoch: int,
          step_in_epoch: int, restarts: int, tracker: Tracker | None, log, dtype: torch.dtype,
          peak: float | None, train_flops: float, stop: StopRequest, tracking_run_id: str | None) -> TrainResult:
    """The steps: forward/backward/step, periodic logging, evaluation, checkpoints, stop signals."""

    loss_fn = SoftTargetCrossEntropy()
    ema_model = None
    result = TrainResult(step=step)

    def save() -> Path:
        meta = dict(model=cfg.model.name, step=step, epoch=epoch, step_in_epoch=step_in_epoch,
                    world_size=env.world_size, zero_stage=cfg.deepspeed.zero_stage,
                    tracking_run_id=tracker.run_id if tracker else tracking_run_id, restarts=restarts,
                    config=cfg.to_dict())
        return ckpt.save(engine, meta, ema.state_dict() if ema else None)

    def check_finite(bad: torch.Tensor) -> None:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            last = ckpt.latest()
            raise NonFiniteLoss(f"non-finite loss by step {step}; last good checkpoint: {last or 'none'} "
                                "(lower optim.lr, check the data, or resume from that checkpoint)")

    bad = torch.zeros((), device=env.device)
    running = torch.zeros((), device=env.device)
    bar = tqdm(total=total_steps, initial=step, disable=not (env.is_main and sys.stderr.isatty()),
               unit="step", dynamic_ncols=True)
    t_log, steps_logged = time.perf_counter(), 0
    windows, steady_images, steady_s = 0, 0, 0.0

    while step < total_steps:
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        train_loader.set_position(epoch, step_in_epoch * plan.grad_accum)
        engine.train()
        micro = 0
        for images, targets in train_loader:
            loss = loss_fn(engine(images.to(dtype)), targets)
            engine.backward(loss)
            engine.step()
            running += loss.detach() / plan.grad_accum
            bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
            micro += 1
            if micro % plan.grad_accum:
                continue
            step, step_in_epoch = step + 1, step_in_epoch + 1
            steps_logged += 1
            bar.update(1)
            if ema:
                ema.update(engine.module)
            if step % cfg.train.log_every == 0 or step == total_steps:
                check_finite(bad)
                mean_loss = running.clone()
                dist.all_reduce(mean_loss)
                dt = time.perf_counter() - t_log
                ips = steps_logged * plan.global_batch / dt
                if windows:
                    steady_images, steady_s = steady_images + steps_logged * plan.global_batch, steady_s + dt
                windows += 1
                mfu_pct = 100 * ips * train_flops / (peak * 1e12 * env.world_size) if peak else None
                mfu = f" MFU {mfu_pct:.1f}%" if peak else ""
                loss_value, lr, grad_norm = (mean_loss.item() / env.world_size / steps_logged,
                                             scheduler.get_last_lr()[0], float(engine.get_global_grad_norm() or 0))
                log(f"epoch {epoch} step {step}/{total_steps} loss {loss_value:.4f} lr {lr:.3g} "
                    f"grad_norm {grad_norm:.3f} {ips:.0f} img/s{mfu}")
                if tracker:
                    tracker.log_metrics({"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                                         "train/images_per_sec": ips, "train/epoch": epoch,
                                         **({"train/mfu": mfu_pct} if peak else {})}, step)
                running.zero_()
                t_log, steps_logged = time.perf_counter(), 0
                if stop.agreed(env.device):
                    check_finite(bad)
                    where = save()
                    log(f"[stop] signal received: checkpoint {where} written at step {step}; exit {EXIT_PREEMPTED}")
                    bar.close()
                    stop.done()
                    return TrainResult(step=step, preempted=True)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                check_finite(bad)
                t_pause = time.perf_counter()
                save()
                t_log += time.perf_counter() - t_pause  # checkpoints are not counted in img/s
            if step >= total_steps or step_in_epoch >= steps_per_epoch:
                break
        t_pause = time.perf_counter()
        engine.eval()
        result.top1, result.top5 = evaluate(engine, val_loader, env, dtype)
        line = f"epoch {epoch} step {step} val top1 {result.top1:.2f} top5 {result.top5:.2f}"
        if ema:
            if ema_model is None:
                ema_model = create_model(cfg.model.name, num_classes=cfg.model.num_classes,
                                         img_size=cfg.model.img_size).to(env.device).eval()
            ema_model.load_state_dict(ema.state_dict())
            autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if cfg.deepspeed.bf16 else nullcontext()
            with autocast:
                result.ema_top1, ema_top5 = evaluate(ema_model, val_loader, env, torch.float32)
            line += f" | EMA top1 {result.ema_top1:.2f} top5 {ema_top5:.2f}"
        log(line)
        if tracker:
            tracker.log_metrics({"val/top1": result.top1, "val/top5": result.top5, **(
                {"val/ema_top1": result.ema_top1, "val/ema_top5": ema_top5} if ema else {})}, step)
        check_finite(bad)
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        save()
        t_log += time.perf_counter() - t_pause  # evaluation and the checkpoint are not training time
        if stop.agreed(env.device):
            log(f"[stop] signal received: checkpoint written at step {step}; exit {EXIT_PREEMPTED}")
            bar.close()
            stop.done()
            return TrainResult(step=step, preempted=True)
    bar.close()
    result.images_per_sec = steady_images / steady_s if steady_s else None
    if result.top1 is None:  # resumed a run that had already finished: report its accuracy
        engine.eval()
        result.top1, result.top5 = evaluate(engine, val_loader, env, dtype)
    result.step = step
    return result
