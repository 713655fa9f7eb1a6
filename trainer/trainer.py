"""The Trainer: built once from a RunConfig; `train()` is the step loop and reads top to bottom.

What survives a restart lives in one RunState (trainer/state.py), saved whole with every
checkpoint. The periodic work is done by components that decide from the RunState when they are
due: the WindowMeter (loss, speed, MFU, the non-finite check and the stop check every
`train.log_every` steps and at epoch ends), the Evaluator (epoch ends and the run's end) and the
Checkpointer (every N steps, epoch ends, a stop, the end; never the same step twice). The host
synchronises with the device only in those components.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline import build_loaders, dataset_input
from data_pipeline.sharding import epoch_end, resumed_epoch_end
from models import count_params, model_info

from .batch_probe import resolve_auto_batch
from .build import (
    build_engine,
    build_loss,
    build_model,
    build_teacher,
    compile_decision,
    compile_report,
    grad_norm_on_demand,
    init_from,
    set_grad_norm,
)
from .checkpoint import (
    Checkpointer,
    CheckpointError,
    check_complete,
    fp32_group_names,
    load_rng_state,
    set_rng_state,
    to_universal,
)
from .config import ConfigError, RunConfig, plan_run
from .distributed import init_distributed
from .ema import ModelEma
from .evaluate import evaluate
from .losses import DistillationLoss
from .mfu import mfu_pct, peak_tflops, train_flops_per_image
from .preflight import node_name, preflight
from .state import RunState
from .tracking import NOT_A_SETTING, Tracker, run_id_of, start_run_tracking
from .watchdog import HangWatchdog

EXIT_PREEMPTED = 85   # checkpointed after a stop signal: requeue me
EXIT_NONFINITE = 3    # the loss stayed NaN/inf after train.max_rollbacks reloads
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainResult:
    step: int
    top1: float | None = None
    top5: float | None = None
    ema_top1: float | None = None
    preempted: bool = False
    rollbacks: int = 0
    # steady-state training speed: images/s over the log windows after the run's first (which holds
    # start-up: loader workers, FFCV's compile, DALI's build); None with fewer than two windows
    images_per_sec: float | None = None


class ReplicaMismatch(RuntimeError):
    """The data-parallel copies of the weights differ between ranks (exit EXIT_CORRUPT, no requeue)."""


EXIT_CORRUPT = 4


class StopRequest:
    """Signal handlers only set a flag; the loop acts on it at the next log window."""

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


class ForwardTimer:
    """Each rank's forward time per log window, for the straggler check. On a GPU the host only launches the
    kernels, so its clock cannot see a slow GPU: CUDA events around each forward, read at the log window
    (one wait on the window's last event, just before the window's all-reduce waits anyway). On a CPU the
    host clock is the compute time."""

    def __init__(self, cuda: bool, event_factory=None) -> None:
        self.cuda = cuda
        self.make_event = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self.pool: list = []  # (start, end) event pairs, reused window after window
        self.used, self.host_s, self.t0 = 0, 0.0, 0.0

    def start(self) -> None:
        if not self.cuda:
            self.t0 = time.perf_counter()
            return
        if self.used == len(self.pool):
            self.pool.append((self.make_event(), self.make_event()))
        self.pool[self.used][0].record()

    def stop(self) -> None:
        if not self.cuda:
            self.host_s += time.perf_counter() - self.t0
            return
        self.pool[self.used][1].record()
        self.used += 1

    def read(self) -> float:
        """Seconds of forward in the window so far; starts a new window."""
        if not self.cuda:
            seconds, self.host_s = self.host_s, 0.0
            return seconds
        if self.used:
            self.pool[self.used - 1][1].synchronize()  # the window's last forward ended: so did the others
        seconds = sum(start.elapsed_time(end) for start, end in self.pool[:self.used]) / 1000
        self.used = 0
        return seconds


class WindowMeter:
    """Per log window: the mean loss, images/s, MFU, DeepSpeed's skipped steps, the non-finite check and
    the stop agreement, all in one all-reduce. Between windows it only adds on the device."""

    def __init__(self, trainer: Trainer) -> None:
        self.t, dev = trainer, trainer.env.device
        self.every = trainer.cfg.train.log_every
        # loss sum, non-finite flag, stop flag, images replaced (every rank's, at log windows), then each
        # rank's seconds per step outside collectives
        self.sums = torch.zeros(4 + trainer.env.world_size, device=dev)
        self.forward = ForwardTimer(dev.type == "cuda")
        self.one = torch.ones((), device=dev)
        self.micro, self.steps, self.data_s = 0, 0, 0.0
        self.t0, self.paused_s, self.windows = time.perf_counter(), 0.0, 0
        self.steady_images, self.steady_s = 0, 0.0
        # (epoch, sample, step) of the last finite check: a non-finite loss lies in the data after it
        self.checked = (trainer.state.epoch, trainer.state.epoch_sample, trainer.state.step)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def add(self, loss: torch.Tensor) -> None:
        self.sums[0] += loss
        self.sums[1] = torch.maximum(self.sums[1], (~torch.isfinite(loss)).float())
        self.micro += 1

    def forward_done(self) -> None:
        """The forward pass of a micro-batch ended (it began when its batch was handed over)."""
        self.forward.stop()

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpoints are not training time, nor steps the hang watchdog waits for."""
        t0 = time.perf_counter()
        with self.t.watchdog.paused():
            yield
        self.paused_s += time.perf_counter() - t0

    def restart(self) -> None:
        self.sums.zero_()
        self.micro, self.steps, self.paused_s, self.data_s, self.t0 = 0, 0, 0.0, 0.0, time.perf_counter()
        self.forward.read()
        self.checked = (self.t.state.epoch, self.t.state.epoch_sample, self.t.state.step)

    def check(self, log: bool) -> tuple[bool, bool]:
        """(finite, stop requested on any rank) since the last check, in one all-reduce; with `log`, also
        the window's mean loss, speed and MFU, logged when finite, and a new window begins."""
        t, state = self.t, self.t.state
        self.sums[2] = float(t.stopper.signum != 0)
        if not log:
            flags = self.sums[1:3].clone()
            dist.all_reduce(flags, op=dist.ReduceOp.SUM)
            bad, stop = flags.tolist()
        else:
            self.sums[3] = float(t.train_loader.decode_failures)  # this rank's so far: the job's total, summed
            self.sums[4 + t.env.rank] = (self.data_s + self.forward.read()) / max(1, self.steps)
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
            loss_sum, bad, stop, replaced, *rank_step_s = self.sums.tolist()
            if self.windows:  # the first window holds the warm-up (compilation, loader start): no verdict on it
                self.stragglers(rank_step_s)
        if bad:
            return False, bool(stop)
        self.checked = (state.epoch, state.epoch_sample, state.step)
        if log:
            self._log(loss_sum / t.env.world_size / self.micro, int(replaced))
        return True, bool(stop)

    def stragglers(self, rank_step_s: list[float]) -> None:
        """Ranks whose own time per step (input wait + forward, outside collectives) is more than
        train.straggler_factor x the median: logged with their host, and in MLflow."""
        t = self.t
        median = sorted(rank_step_s)[(len(rank_step_s) - 1) // 2]  # the lower median: with 2 ranks, the faster
        if median <= 0 or len(rank_step_s) < 2:
            return
        slow = {r: v / median for r, v in enumerate(rank_step_s) if v > t.cfg.train.straggler_factor * median}
        for r, ratio in slow.items():
            t.log(f"[straggler] rank {r} on {t.hosts[r]}: {1000 * rank_step_s[r]:.0f} ms/step of its own work, "
                  f"{ratio:.1f}x the median {1000 * median:.0f} ms (step {t.state.step})")
        if t.tracker:
            t.tracker.log_metrics({"train/straggler_ratio_max": max(v / median for v in rank_step_s),
                                   "train/stragglers": len(slow)}, t.state.step)
            if slow:
                t.tracker.set_tags({f"straggler_rank{r}": f"{t.hosts[r]} {ratio:.1f}x median at step {t.state.step}"
                                    for r, ratio in slow.items()})

    def _log(self, loss: float, replaced_images: int) -> None:
        t, state = self.t, self.t.state
        dt = time.perf_counter() - self.t0 - self.paused_s
        images = self.steps * t.plan.batch.global_batch
        ips = images / dt
        if self.windows:
            self.steady_images, self.steady_s = self.steady_images + images, self.steady_s + dt
        else:
            t.watchdog.measured(dt / self.steps)  # the hang timeout from the first window's step time
            if t.compiled:  # once, after the first steps compiled the model
                t.log(f"[compile] {t.cfg.train.compile_backend}: {compile_report()}")
        self.windows += 1
        lr, grad_norm = max(t.engine.lr_scheduler.get_last_lr()), float(t.engine.get_global_grad_norm() or 0)
        mfu = mfu_pct(ips, t.flops_per_image, t.peak, t.env.world_size)
        step_ms, data_pct = 1000 * dt / self.steps, 100 * min(1.0, self.data_s / dt)
        t.log(f"epoch {state.epoch} step {state.step}/{t.total_steps} loss {loss:.4f} lr {lr:.3g} "
              f"grad_norm {grad_norm:.3f} {ips:.0f} img/s {step_ms:.0f} ms/step data {data_pct:.0f}% MFU {mfu:.1f}%")
        terms = {}
        if t.distiller is not None and t.distiller.terms is not None:  # at log windows only: one more all-reduce
            sums = t.distiller.terms.clone()
            dist.all_reduce(sums)
            base, distill = (sums / t.env.world_size / self.micro).tolist()
            terms = {"train/loss_base": base, "train/loss_distill": distill}
            t.distiller.terms = None
            t.log(f"  loss terms: base {base:.4f} distill {distill:.4f}")
        if t.tracker:
            t.tracker.log_metrics({**terms, "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                   "train/images_per_sec": ips, "train/epoch": state.epoch, "train/mfu": mfu,
                                   "train/step_ms": step_ms, "train/data_wait_pct": data_pct,
                                   "train/skipped_steps": t.engine.skipped_steps,
                                   "data/replaced_images": replaced_images}, state.step)
        self.restart()


class StepProfiler:
    """train.profile=START:END: a torch.profiler trace of optimizer steps START+1..END, written to
    <run dir>/profile/ as a Chrome/Perfetto trace per rank and logged to MLflow (artifacts/profile)."""

    def __init__(self, trainer: Trainer) -> None:
        self.t, spec = trainer, trainer.cfg.train.profile
        self.start, self.end = (int(v) for v in spec.split(":")) if spec else (None, None)
        self.prof = None

    def step(self, step: int) -> None:
        if step == self.start and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, record_shapes=True, with_stack=False)
            self.prof.__enter__()
        elif step == self.end and self.prof is not None:
            self.prof.__exit__(None, None, None)
            out = self.t.run_dir / "profile" / f"trace_steps{self.start + 1}-{self.end}_rank{self.t.env.rank}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(out))
            self.prof = None
            self.t.log(f"[profile] steps {self.start + 1}-{self.end}: {out} (open in ui.perfetto.dev)")
            if self.t.tracker:
                self.t.tracker.log_artifact(out, "profile")


class Evaluator:
    """Top-1/top-5 of the engine (and of the EMA weights) on the val set; keeps the best in the RunState."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer
        self.ema_model = None
        self.top1 = self.top5 = self.ema_top1 = None
        self.reference: dict[int, Reference] | None = None  # off-track: the best earlier setting by epoch

    def run(self) -> None:
        t, state = self.t, self.t.state
        t.engine.eval()
        self.top1, self.top5 = evaluate(t.engine, t.val_loader, t.env.device, t.dtype)
        line, metrics = (f"epoch {state.epoch} step {state.step} val top1 {self.top1:.2f} top5 {self.top5:.2f}",
                         {"val/top1": self.top1, "val/top5": self.top5})
        if t.train_loader.minival is not None:  # held-out train images: choose on these, report val
            mini1, mini5 = evaluate(t.engine, t.train_loader.minival, t.env.device, t.dtype)
            line += f" | minival top1 {mini1:.2f} top5 {mini5:.2f}"
            metrics.update({"minival/top1": mini1, "minival/top5": mini5})
        if t.ema is not None:
            if self.ema_model is None:
                self.ema_model = build_model(t.cfg, drop_path=None).to(t.env.device).eval()
            self.ema_model.load_state_dict(t.ema.state_dict())
            autocast = torch.autocast(t.env.device.type, dtype=torch.bfloat16) if t.bf16_compute \
                else contextlib.nullcontext()
            with autocast:
                self.ema_top1, ema_top5 = evaluate(self.ema_model, t.val_loader, t.env.device, torch.float32)
            line += f" | EMA top1 {self.ema_top1:.2f} top5 {ema_top5:.2f}"
            metrics.update({"val/ema_top1": self.ema_top1, "val/ema_top5": ema_top5})
        t.engine.train()
        state.last_top1 = self.ema_top1 if t.ema is not None else self.top1
        state.best_top1 = max(state.best_top1 or 0.0, state.last_top1)
        t.log(line)
        every = t.cfg.eval.suite_every_epochs
        if t.suite and (t.finished or (every and (state.epoch + 1) % every == 0)):
            metrics.update(self.run_suite())
        if t.tracker:
            t.tracker.log_metrics(metrics, state.step)
            # by epoch too (epochs done so far): what earlier runs are compared at (off-track, compare.py)
            t.tracker.log_metrics({"val/top1_by_epoch": state.last_top1}, state.epoch + 1)
            self.off_track(state.epoch + 1, state.last_top1)

    def run_suite(self) -> dict[str, float]:
        """eval.suite_root's benchmarks with the reported weights (EMA where on): a line each, and the metrics
        suite/<benchmark>/<top1|top5|ece|nll|mce|real_top1> for MLflow."""
        from .benchmarks import evaluate_suite

        t = self.t
        if t.ema is not None:
            model = self.ema_model
        else:
            model = lambda x: t.engine(x.to(t.dtype))  # noqa: E731  (the engine's own input dtype)
        table = evaluate_suite(model, t.suite_loader, t.suite, t.cfg.model.num_classes, t.env)
        metrics = {}
        for key, r in (table or {}).items():
            extra = "" if "mce_partial" not in r else f", mCE {r['mce']:.2f}" if r["mce"] is not None else \
                f", mCE over the {len(r['corruptions'])} corruptions present {r['mce_partial']:.2f}"
            t.log(f"[suite] {key}: top1 {r['top1']:.2f} top5 {r['top5']:.2f} ECE {r['ece']:.2f} NLL {r['nll']:.4f}"
                  f" ({r['images']} images){extra}")
            for metric in ("top1", "top5", "ece", "nll", "real_top1", "mce"):
                if r.get(metric) is not None:
                    metrics[f"suite/{key}/{metric}"] = float(r[metric])
        return metrics

    def fit_crop(self) -> None:
        """The evaluation crop from data: minival top-1 at each crop_pct of CROP_CANDIDATES with the weights that
        are reported (EMA where on); the best goes into the state, so the last checkpoint and its export carry it
        as the recommended evaluation transform."""
        from data_pipeline import CROP_CANDIDATES, minival_loader

        t, state = self.t, self.t.state
        model = self.ema_model if t.ema is not None else t.engine
        model.eval()
        scores = {}
        autocast = torch.autocast(t.env.device.type, dtype=torch.bfloat16) if t.bf16_compute and t.ema is not None \
            else contextlib.nullcontext()
        for crop in CROP_CANDIDATES:
            loader = minival_loader(t.cfg, t.env.rank, t.env.world_size, t.env.device, crop, fork=False)
            with autocast:
                scores[str(crop)] = evaluate(model, loader, t.env.device, torch.float32 if t.ema else t.dtype)[0]
        usual = t.cfg.data.crop_pct or model_info(t.cfg.model.name).crop_pct  # ties: the crop it would use anyway
        best = max(CROP_CANDIDATES, key=lambda c: (scores[str(c)], -abs(c - usual)))
        state.eval_crop_pct, state.crop_fit = best, scores
        t.engine.train()
        t.log("[crop] minival top1 by crop_pct: " + ", ".join(f"{c} {v:.2f}" for c, v in scores.items())
              + f"; recommended evaluation crop_pct {best} (in the checkpoint and its export)")
        if t.tracker:
            t.tracker.log_metrics({f"minival/top1_crop_{c}": v for c, v in scores.items()}, state.step)
            t.tracker.set_tags({"eval_crop_pct": str(best)})

    def off_track(self, epoch: int, top1: float) -> None:
        """Behind the best earlier setting of the same recipe at the same epoch: a warning line, an MLflow tag
        and metrics (off_track_verdict). The earlier runs are read once."""
        t = self.t
        if self.reference is None:
            self.reference = earlier_settings(t.tracker.uri, t.cfg.tracking.experiment, t.recipe, t.tracker.run_id,
                                              t.log)
        if epoch not in self.reference:
            return
        ref = self.reference[epoch]
        verdict, metrics = off_track_verdict(ref, top1, t.cfg.tracking.off_track_points, t.cfg.tracking.off_track_sd)
        t.tracker.log_metrics(metrics, epoch)
        if verdict:
            t.log(f"[off-track] epoch {epoch}: {verdict}")
            t.tracker.set_tags({"off_track": f"epoch {epoch}: {verdict}"})


@dataclass
class Reference:
    """The best earlier setting at one epoch: the mean val top-1 over its seeds, their sd (None for one run)."""
    mean: float
    sd: float | None
    runs: list[str]


def earlier_settings(uri: str, experiment: str, recipe: str, this_run: str, log) -> dict[int, Reference]:
    """epoch -> the best setting (by mean) among the experiment's FINISHED runs tagged with `recipe`."""
    import statistics
    try:
        from mlflow.tracking import MlflowClient

        from .tracking import store_lock
        with store_lock(uri):  # opening a SQLite store may migrate it: never beside another job's migration
            client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return {}
        runs = client.search_runs([exp.experiment_id], f"tags.recipe = '{recipe}' and attributes.status = 'FINISHED'")
        by_epoch: dict[int, dict[tuple, list[tuple[float, str]]]] = {}
        for run in runs:
            if run.info.run_id == this_run:
                continue
            setting = tuple(sorted((k, v) for k, v in run.data.params.items() if not k.startswith(NOT_A_SETTING)))
            for m in client.get_metric_history(run.info.run_id, "val/top1_by_epoch"):
                by_epoch.setdefault(m.step, {}).setdefault(setting, []).append((m.value, run.info.run_name))
        best: dict[int, Reference] = {}
        for epoch, settings in by_epoch.items():
            for members in settings.values():
                values = [v for v, _ in members]
                ref = Reference(statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None,
                                [name for _, name in members])
                if epoch not in best or ref.mean > best[epoch].mean:
                    best[epoch] = ref
        return best
    except Exception as e:  # noqa: BLE001  (a tracking server that is away must not stop training)
        log(f"[tracking] off-track check unavailable: {e}")
        return {}


def off_track_verdict(ref: Reference, top1: float, points: float, sds: float) -> tuple[str | None, dict[str, float]]:
    """Off-track, against seeds' spread where the reference has several (tracking.off_track_sd standard deviations
    below their mean: a seed's noise is not a signal), else against tracking.off_track_points."""
    gap = ref.mean - top1
    metrics = {"val/off_track_points": gap}
    if ref.sd:  # two or more seeds that did not agree exactly
        metrics["val/off_track_sd"] = gap / ref.sd
        if gap / ref.sd <= sds:
            return None, metrics
        return (f"val top-1 {top1:.2f} is {gap:.1f} points, {gap / ref.sd:.1f} sd, below {ref.mean:.2f} +- "
                f"{ref.sd:.2f}, the mean of {len(ref.runs)} seeds ({', '.join(ref.runs)}) at the same epoch "
                f"(tracking.off_track_sd={sds:g})"), metrics
    if gap <= points:
        return None, metrics
    return (f"val top-1 {top1:.2f} is {gap:.1f} points behind {ref.mean:.2f} of run {', '.join(ref.runs)} at the "
            f"same epoch (tracking.off_track_points={points:g})"), metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_point(cfg: RunConfig, ckpt: Checkpointer) -> tuple[Path, dict] | None:
    if cfg.train.resume == "none":
        return None
    tag_dir = ckpt.latest() if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if tag_dir is None:
        return None
    meta = check_complete(tag_dir)
    if "state" not in meta:
        raise CheckpointError(f"checkpoint {tag_dir} was written by an older version of this trainer (no RunState "
                              "in meta.json): resume it with that version, or start anew with train.resume=none")
    if meta.get("model") != cfg.model.name:
        raise CheckpointError(f"checkpoint {tag_dir} is of model {meta.get('model')!r}, but model.name="
                              f"{cfg.model.name!r}: use another train.run_name / train.resume, or the matching config")
    return tag_dir, meta


def run_directory(cfg: RunConfig) -> Path:
    name = [cfg.train.run_name or f"{cfg.model.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"]
    dist.broadcast_object_list(name, src=0)  # every rank uses rank 0's timestamp
    return Path(cfg.train.output_dir) / name[0]


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.stopper = StopRequest()  # first: a stop signal during start-up must not kill the rank
        self.env = env = init_distributed()
        self.log = (lambda *a: print(*a, flush=True)) if env.is_main else (lambda *a: None)
        seed_everything(cfg.train.seed + env.rank)
        model = build_model(cfg)
        cfg, batch_note = resolve_auto_batch(cfg, model, env.device, env.world_size)
        self.plan = plan = plan_run(cfg, env.world_size, count_params(model))
        self.cfg = cfg = plan.cfg
        self.run_dir = run_directory(cfg)
        self.hosts, preflight_line = [node_name()], None
        if cfg.train.preflight and env.world_size > 1:  # before anything heavy: a bad node costs seconds
            self.hosts, preflight_line = preflight(env.device, env.world_size, env.rank, self.run_dir,
                                                   cfg.train.preflight_factor)
        c = cfg.checkpoint
        self.checkpointer = Checkpointer(Path(c.dir) if c.dir else self.run_dir / "checkpoints", c.keep_last, env,
                                         every_steps=c.every_steps, keep_best=c.keep_best,
                                         keep_every_epochs=c.keep_every_epochs, log=self.log)
        resume = resume_point(cfg, self.checkpointer)
        if cfg.train.init_from and resume:
            self.log(f"[init] train.init_from={cfg.train.init_from} not applied: resuming {resume[0]}")
        elif cfg.train.init_from:
            init_from(model, cfg.train.init_from, self.log)
        self.flops_per_image = train_flops_per_image(model, cfg.model.img_size)
        self.train_loader, self.val_loader = build_loaders(cfg, env.rank, env.world_size, env.device)
        for loader in (self.train_loader, self.val_loader, self.train_loader.minival):  # fork the data workers
            if loader is not None:                                                     # before any thread starts
                getattr(loader.source, "start_workers", lambda: None)()
        self.suite = self.suite_loader = None
        if cfg.eval.suite_root:  # found and checked now, its workers forked before any thread starts
            self.suite, self.suite_loader = build_suite(cfg, self.train_loader.class_names, env)
            names = list(dict.fromkeys("imagenet-c" if b.corruption else b.key for b in self.suite))
            self.log(f"[suite] eval.suite_root={cfg.eval.suite_root}: {', '.join(names)} "
                     f"({sum(len(b.samples) for b in self.suite)} images), evaluated at the end"
                     + (f" and every {cfg.eval.suite_every_epochs} epochs" if cfg.eval.suite_every_epochs else ""))
        if self.train_loader.minival is not None:
            self.log(f"[data] data.minival_per_class={cfg.data.minival_per_class}: {self.train_loader.minival.num_samples}"
                     f" train images held out as minival, {self.train_loader.num_samples} left to train on")
        self.step_samples = plan.batch.global_batch
        self.epoch_end = epoch_end(self.train_loader.num_samples, self.step_samples)
        self.steps_per_epoch = self.epoch_end // self.step_samples
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        universal = bool(resume) and resume[1]["engine"]["world_size"] != env.world_size and plan.zero_stage > 0
        self.engine = build_engine(plan, model, self.steps_per_epoch, self.total_steps, load_universal=universal)
        self.norm_on_demand = grad_norm_on_demand(self.engine)
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32  # of weights and inputs
        self.bf16_compute = self.dtype == torch.bfloat16 or self.engine.torch_autocast_enabled()
        self.compiled, compile_note = compile_decision(cfg, env.device, plan.zero_stage)
        self.ema = ModelEma(self.engine.module, cfg.train.model_ema_decay, cfg.train.model_ema_every) \
            if cfg.train.model_ema else None
        self.state = RunState(epoch_end=self.epoch_end)
        self.loss_fn = build_loss(self.state)
        self.distiller = None
        if cfg.distill.teacher:  # built before any thread starts, like everything that can fail at start
            teacher, teacher_line = build_teacher(cfg, env.device, self.dtype)
            autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) \
                if self.bf16_compute and self.dtype == torch.float32 else contextlib.nullcontext
            self.distiller = DistillationLoss(self.loss_fn, teacher, cfg.distill.type, cfg.distill.alpha,
                                              cfg.distill.tau, autocast)
            self.log(teacher_line)
        if resume:
            self.restore(*resume)
            self.state.restarts += 1
        self.peak, peak_source = peak_tflops(cfg.train.peak_tflops, env.device, self.bf16_compute)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(plan.ds_config, indent=1))
        b = plan.batch
        self.log(f"[plan] {cfg.model.name}: world size {env.world_size}; batch {b.batch_size}/rank x accum "
                 f"{b.grad_accum} x {env.world_size} ranks = global {b.global_batch}; {self.steps_per_epoch} "
                 f"steps/epoch, {self.total_steps} steps ({cfg.train.epochs} epochs"
                 f"{', max_steps ' + str(cfg.train.max_steps) if cfg.train.max_steps else ''}); lr {b.lr:g} "
                 f"({b.lr_rule}); {cfg.optim.opt}"
                 f"{f' with layer_decay {cfg.optim.layer_decay:g}' if cfg.optim.layer_decay else ''}, "
                 f"{cfg.schedule.sched} schedule; ZeRO stage "
                 f"{self.engine.zero_optimization_stage()}; {plan.dtype} on {env.device.type}"
                 f"{'; compiled (' + cfg.train.compile_backend + ')' if self.compiled else ''}; data "
                 f"{cfg.data.backend}; MFU against {peak_source}; run dir {self.run_dir}")
        if batch_note:
            self.log(batch_note)
        if compile_note and env.device.type == "cuda":
            self.log(f"[compile] {compile_note}")
        if preflight_line:
            self.log(preflight_line)
        if plan.ds_overrides:
            self.log(f"[deepspeed] {cfg.deepspeed.config} overrides: {', '.join(plan.ds_overrides)}")
        requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0  # the same job, the same arguments
        if self.state.tracking_run_id is None and (resume or (requeued and cfg.train.resume == "auto")):
            # checkpointed before the run was created, or a requeued job that had no checkpoint yet (a rank
            # hung early): the run directory's MLflow run continues, no second run
            self.state.tracking_run_id = run_id_of(self.run_dir)
        self.tracker: Tracker | None = None
        new_run = self.state.tracking_run_id is None  # a new MLflow run: a fresh start, or a branch's first start
        if env.is_main and cfg.tracking.enabled:
            self.tracker = start_run_tracking(cfg, self.run_dir, env.world_size, self.state.tracking_run_id,
                                              self.state.restarts, self.state.step, self.log)
            self.state.tracking_run_id = self.tracker.run_id
        self.recipe = (f"{cfg.model.name}-{cfg.train.epochs}ep-{cfg.model.img_size}px-bs{plan.batch.global_batch}-"
                       f"{cfg.data.backend}")  # runs of one recipe (an lr or seed sweep) compare with each other
        excluded = self.run_dir / "exclude_nodes"
        if self.tracker and excluded.is_file():  # an earlier attempt of this job excluded them (preflight)
            self.tracker.set_tags({"preflight_excluded_nodes": excluded.read_text().strip()})
        if self.tracker and new_run:
            self.tracker.set_tags({"recipe": self.recipe, "steps_per_epoch": self.steps_per_epoch})
            self.tracker.log_dataset(*dataset_input(cfg, self.train_loader, self.val_loader))
        self.report_bad_files()
        if len(self.hosts) != env.world_size:
            self.hosts = [""] * env.world_size
            dist.all_gather_object(self.hosts, node_name())
        self.watchdog = HangWatchdog(cfg.train.hang_timeout_s, self.run_dir, env.rank,
                                     self.record_hang if self.tracker else None)
        slow = os.environ.get("TRAIN_TEST_SLOW_RANK", "")  # "RANK:SECONDS": that rank waits per batch
        self.test_slow_s = float(slow.split(":")[1]) if slow and int(slow.split(":")[0]) == env.rank else 0.0
        perturb = os.environ.get("TRAIN_TEST_PERTURB_AT_STEP")  # "STEP:RANK": that rank's weights change
        self.test_perturb = tuple(int(v) for v in perturb.split(":")) if perturb else None
        self.first_batch_grid = self.tracker is not None and self.state.step == 0
        self.meter, self.evaluator, self.profiler = WindowMeter(self), Evaluator(self), StepProfiler(self)
        self.bar = tqdm(total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                        disable=not (env.is_main and sys.stderr.isatty()))

    @property
    def finished(self) -> bool:
        return self.state.step >= self.total_steps

    def record_hang(self, what: str, stacks: Path) -> None:
        """Rank 0's hang report to MLflow (from the watchdog thread; the main thread is stuck)."""
        self.tracker.set_tags({"hang": what})
        self.tracker.log_metrics({"train/hang_after_step": self.state.step}, self.state.step)
        self.tracker.log_artifact(stacks, "hang")
        self.tracker.finish("FAILED", timeout=20)

    def log_batch_grid(self, images: torch.Tensor) -> None:
        """Once, at the start of a run: what the model sees (the first batch, augmented and mixed) as
        a PNG in MLflow (artifacts/data/first_batch.png); launch/preview_augment.py shows more."""
        from data_pipeline.preview import grid_image

        self.first_batch_grid = False
        info = model_info(self.cfg.model.name)
        path = self.run_dir / "first_batch.png"
        grid_image(images[:32], info.mean, info.std).save(path)
        self.tracker.log_artifact(path, "data")

    def report_bad_files(self) -> None:
        """Files the scan left out (an unverified tree: data_pipeline.folder.screen): named in the log,
        listed in <run dir>/bad_files.txt and counted in MLflow (data/bad_files)."""
        bad = self.train_loader.bad_files + self.val_loader.bad_files
        if not bad or not self.env.is_main:
            return
        listing = self.run_dir / "bad_files.txt"
        listing.write_text("".join(f"{path}\t{why}\n" for path, why in bad))
        shown = "; ".join(f"{path} ({why})" for path, why in bad[:10])
        self.log(f"[data] WARNING {len(bad)} file(s) left out, they would not decode: {shown}"
                 f"{' ...' if len(bad) > 10 else ''} (all in {listing}; `python launch/prepare_data.py verify "
                 f"--root {self.cfg.data.root} --skip-bad` checks every image once and writes the file lists)")
        if self.tracker:
            self.tracker.log_metrics({"data/bad_files": len(bad)}, self.state.step)
            self.tracker.log_artifact(listing, "data")

    def batches(self):
        """Micro-batches from the RunState's position on, epoch after epoch, each with whether it ends an
        optimizer step; an epoch's windows leave out what a rollback excluded."""
        state, accum = self.state, self.plan.batch.grad_accum
        while not self.finished:
            epoch = state.epoch
            for start, end in state.windows():
                state.epoch_sample = start  # jumps over a skipped window
                self.train_loader.set_window(epoch, start, end)
                batches, i = iter(self.train_loader), 0
                while True:
                    t0 = time.perf_counter()
                    batch = next(batches, None)
                    if self.test_slow_s:
                        time.sleep(self.test_slow_s)  # test-only: a slow rank
                    self.meter.data_s += time.perf_counter() - t0  # the step waits for its input
                    if batch is None:
                        break
                    if self.first_batch_grid:
                        self.log_batch_grid(batch[0])
                    i += 1
                    self.meter.forward.start()
                    yield *batch, i % accum == 0
                if state.epoch != epoch:
                    break

    def train(self) -> TrainResult:
        state, engine = self.state, self.engine
        engine.train()
        while not self.finished:
            for images, targets, step_done in self.batches():
                inputs = images.to(self.dtype)
                loss = self.loss_fn(engine(inputs), targets) if self.distiller is None else \
                    self.distiller(engine(inputs), targets, inputs)
                self.meter.forward_done()
                engine.backward(loss)
                if step_done and self.norm_on_demand:  # only the steps that log it compute the gradient norm
                    set_grad_norm(engine, self.meter.due(state.step + 1) or state.step + 1 >= self.total_steps)
                engine.step()
                self.meter.add(loss.detach())
                if not step_done:
                    continue
                state.advance(self.step_samples)
                self.watchdog.beat(state.step)
                self.meter.steps += 1
                if self.ema is not None:
                    self.ema.update(state.step)
                self.profiler.step(state.step)
                self.bar.update(1)
                epoch_done, stop = state.epoch_done, False
                save_due = epoch_done or self.finished or self.checkpointer.due(state.step)
                if save_due or self.meter.due(state.step):  # nothing non-finite is ever saved
                    finite, stop = self.meter.check(log=self.meter.due(state.step) or self.finished)
                    if not finite:
                        self.roll_back()
                        break
                if epoch_done or self.finished:
                    with self.meter.paused():
                        self.evaluator.run()
                        if self.finished and self.train_loader.minival is not None:
                            self.evaluator.fit_crop()
                if epoch_done:
                    state.next_epoch(self.epoch_end)
                if save_due or stop:
                    self.save(epoch_end=epoch_done)
                if stop:
                    self.log(f"[stop] signal received: checkpoint {self.checkpointer.last_path} written at step "
                             f"{state.step}; exit {EXIT_PREEMPTED}")
                    self.stopper.done()
                    return self.finish(preempted=True)
                if self.finished:
                    break
        return self.finish()

    def check_replicas(self) -> None:
        """Silent corruption: the data-parallel copies of the weights (ZeRO 0-2 replicate them) must be
        bit-identical on every rank. A float64 checksum per rank, all-gathered; ranks that differ from
        the majority (all of them on a tie) stop the run before it is saved, named with their hosts."""
        if self.engine.zero_optimization_stage() >= 3:  # partitioned weights: nothing replicated to compare
            return
        params = [p.detach() for p in self.engine.module.parameters()]
        if self.test_perturb == (self.state.step, self.env.rank):  # test-only: one rank's weights change
            with torch.no_grad():
                params[0].view(-1)[0] += 1e-2
        sums = torch.stack([p.double().sum() for p in params])
        mine = torch.stack([sums.sum(), (sums * torch.arange(1, len(sums) + 1, device=sums.device)).sum()])
        every = [torch.zeros_like(mine) for _ in range(self.env.world_size)]
        dist.all_gather(every, mine)
        values = [tuple(v.tolist()) for v in every]
        if len(set(values)) == 1:
            return
        majority = max(set(values), key=values.count)
        odd = [r for r, v in enumerate(values) if v != majority or values.count(majority) * 2 <= len(values)]
        named = ", ".join(f"rank {r} on {self.hosts[r]}" for r in odd)
        raise ReplicaMismatch(f"step {self.state.step}: the replicated weights differ between ranks ({named} "
                              f"disagree with the others): silent data corruption on a device or node; not "
                              f"saving. Exclude those nodes and resume from the last checkpoint "
                              f"({self.checkpointer.latest() or 'none'}).")

    def save(self, epoch_end: bool = False) -> Path:
        engine = self.engine
        self.check_replicas()
        meta = dict(model=self.cfg.model.name, state=self.state.state_dict(),
                    engine=dict(zero_stage=engine.zero_optimization_stage(), dtype=self.plan.dtype,
                                world_size=self.env.world_size),
                    plan=dict(batch_size=self.plan.batch.batch_size, grad_accum=self.plan.batch.grad_accum,
                              global_batch=self.plan.batch.global_batch),
                    epoch_end_save=epoch_end, top1=self.state.last_top1 if epoch_end else None,
                    fp32_group_names=fp32_group_names(engine), config=self.cfg.to_dict(),
                    class_names=self.train_loader.class_names)
        with self.meter.paused():
            return self.checkpointer.save(engine, meta, self.ema.state_dict() if self.ema else None)

    def restore(self, tag_dir: Path, meta: dict) -> None:
        """Engine, RunState, EMA and RNG from a checkpoint; at another world size through DeepSpeed's
        universal format, the interrupted epoch continued exactly once per image (sharding.py)."""
        env, state = self.env, self.state
        same_size = meta["engine"]["world_size"] == env.world_size
        load_dir = tag_dir if same_size or self.plan.zero_stage == 0 else to_universal(tag_dir, env)
        self.engine._config.load_universal_checkpoint = load_dir != tag_dir
        self.engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name)
        state.load_state_dict(meta["state"])
        if meta["plan"]["global_batch"] != self.step_samples and state.epoch_sample:
            state.epoch_end = resumed_epoch_end(self.train_loader.num_samples, state.epoch_sample, state.epoch_end,
                                                self.step_samples)
        elif state.epoch_sample == 0:
            state.epoch_end = self.epoch_end
        rng_file = tag_dir / f"rng_rank{env.rank}.pt"
        if rng_file.is_file() and same_size:
            set_rng_state(load_rng_state(rng_file))
        else:
            seed_everything(self.cfg.train.seed + env.rank + 1_000_003 * state.step)
        if self.ema is not None:
            self.ema.load_state_dict(torch.load(tag_dir / "ema.pt", map_location=env.device, weights_only=True))
        how = "same world size" if same_size else \
            f"world size {env.world_size}, saved at {meta['engine']['world_size']}" + \
            (" (converted to a universal checkpoint)" if load_dir != tag_dir else "")
        self.log(f"[resume] {tag_dir}: step {state.step}, epoch {state.epoch} (+{state.epoch_sample} samples); {how}")

    def roll_back(self) -> None:
        """A non-finite loss in the last log window: reload the last checkpoint and never read that
        window's samples again; after train.max_rollbacks of them, give up (exit 3)."""
        state, last = self.state, self.checkpointer.latest()
        epoch, start, step = self.meter.checked
        where = f"steps {step + 1}-{state.step} (epoch {epoch}, samples {start}-{state.epoch_sample})"
        if last is None or state.rollbacks >= self.cfg.train.max_rollbacks:
            raise NonFiniteLoss(f"non-finite loss in {where}; {state.rollbacks} rollbacks done (train.max_rollbacks="
                                f"{self.cfg.train.max_rollbacks}); last good checkpoint: {last or 'none'} (lower "
                                "optim.lr, check the data, or resume from that checkpoint)")
        kept = dict(skip=[*state.skip, [epoch, start, state.epoch_sample]], rollbacks=state.rollbacks + 1,
                    restarts=state.restarts, tracking_run_id=state.tracking_run_id)
        with self.watchdog.paused():  # reloading a checkpoint is not a hang
            self.restore(last, check_complete(last))
        state.load_state_dict(kept)
        rollbacks = state.rollbacks
        self.checkpointer.last_saved_step = None  # the steps after `last` are written again
        self.log(f"[rollback] non-finite loss in {where}: reloaded {last}, skipping those samples "
                 f"(rollback {rollbacks} of at most {self.cfg.train.max_rollbacks})")
        if self.tracker:
            self.tracker.log_metrics({"train/rollback_step": state.step, "train/rollbacks": rollbacks}, state.step)
            self.tracker.set_tags({f"rollback_{rollbacks}": where})
        self.bar.n = state.step
        self.meter.restart()

    def finish(self, preempted: bool = False) -> TrainResult:
        self.watchdog.stop()
        if not preempted:  # a stop signal from here on (export, teardown) must not make a finished run look stopped
            self.stopper.done()
        self.bar.close()
        m, e = self.meter, self.evaluator
        return TrainResult(step=self.state.step, top1=e.top1, top5=e.top5, ema_top1=e.ema_top1, preempted=preempted,
                           rollbacks=self.state.rollbacks,
                           images_per_sec=m.steady_images / m.steady_s if m.steady_s else None)


def build_suite(cfg: RunConfig, class_names: list[str] | None, env) -> tuple[list, object]:
    """eval.suite_root's benchmarks, mapped by the training tree's class names, and one val-style loader over all
    their images (JPEG files: the folder backend, or DALI where the run uses it)."""
    import dataclasses

    from data_pipeline import build_loaders

    from .benchmarks import SuiteError, find_benchmarks

    if not class_names:
        raise ConfigError(f"eval.suite_root={cfg.eval.suite_root}: the suite maps classes by name, and this run's "
                          "data has none (an FFCV file without its folder tree beside it)")
    try:
        benchmarks, _ = find_benchmarks(cfg.eval.suite_root, class_names)
    except SuiteError as e:
        raise ConfigError(f"eval.suite_root: {e}") from None
    data = dataclasses.replace(cfg.data, backend=cfg.data.backend if cfg.data.backend == "dali" else "folder")
    _, loader = build_loaders(dataclasses.replace(cfg, data=data), env.rank, env.world_size, env.device, train=False,
                              val_samples=[s for b in benchmarks for s in b.samples])
    getattr(loader.source, "start_workers", lambda: None)()
    return benchmarks, loader


def train(cfg: RunConfig) -> TrainResult:
    """Build the Trainer and run it; the MLflow run ends FINISHED, KILLED (preempted) or FAILED."""
    from .checkpoint import export

    trainer = Trainer(cfg)
    try:
        result = trainer.train()
        if result.top1 is None:  # resumed a run that had already finished: report its accuracy
            trainer.evaluator.run()
            result.top1, result.top5 = trainer.evaluator.top1, trainer.evaluator.top5
    except BaseException:
        if trainer.tracker:
            trainer.tracker.finish("FAILED")
        raise
    if os.environ.get("TRAIN_TEST_PAUSE_AFTER_TRAINING") and not result.preempted:
        trainer.log("[test] pausing before the export: a stop signal now must change nothing")
        time.sleep(float(os.environ["TRAIN_TEST_PAUSE_AFTER_TRAINING"]))  # test-only: a late stop signal's window
    if trainer.tracker:
        last = trainer.checkpointer.latest()
        if not result.preempted and cfg.tracking.log_model and last:
            for weights_ema in ([False, True] if trainer.ema else [False]):
                exported = export(last, ema=weights_ema)
                trainer.tracker.log_artifact(exported, "model")
            if cfg.tracking.register_model:  # the EMA weights where there are (timm's release convention)
                trainer.tracker.register_model(cfg.tracking.register_model, f"model/{exported.name}", {
                    "recipe": trainer.recipe, "val_top1": f"{result.top1:.2f}", "weights": "ema" if trainer.ema else "raw",
                    "ema_top1": f"{result.ema_top1:.2f}" if result.ema_top1 is not None else "none"})
        trainer.tracker.finish("KILLED" if result.preempted else "FINISHED")
    if trainer.env.is_main and not result.preempted:  # slurm/launch.sh never requeues a finished run
        (trainer.run_dir / "FINISHED").write_text(f"step {result.step} val_top1 {result.top1}\n")
    return result
