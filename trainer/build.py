"""RunConfig -> model and DeepSpeed engine: the one builder that training, evaluation and every
benchmark call, so what they measure is what the trainer runs."""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from models import create_model

from .config import ConfigError, RunConfig, RunPlan
from .losses import SoftTargetCrossEntropy
from .optim import build_optimizer, build_scheduler


def build_model(cfg: RunConfig, **overrides) -> nn.Module:
    m = cfg.model
    args = dict(num_classes=m.num_classes, img_size=m.img_size, drop_path=m.drop_path)
    model = create_model(m.name, **{**args, **overrides})
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model


def init_from(model: nn.Module, path: str, log) -> None:
    """train.init_from: load trained weights by name into a freshly built model. A classifier of another
    class count starts anew (reported); any other missing, unexpected or differently shaped tensor is an
    error naming them. Optimizer, schedule and run state are not touched (unlike train.resume)."""
    from .checkpoint import init_weights, state_mismatch
    from .config import ConfigError

    state, source_model, how = init_weights(Path(path))
    own = model.state_dict()
    head = {n for n in own if n.startswith("head.")}
    problems = state_mismatch(own, state, reshapable=head)
    if problems:
        raise ConfigError(f"train.init_from={path} ({source_model}) does not fit model {model.model_name}: "
                          f"{problems} (only the classifier may differ)")
    reset = sorted(n for n in head if state[n].shape != own[n].shape)
    model.load_state_dict({n: (own[n] if n in reset else state[n].to(own[n].dtype)) for n in own})
    line = f"[init] {len(own) - len(reset)} tensors from {path} ({source_model}; {how})"
    if reset:
        old, new = state["head.weight"].shape[0], own["head.weight"].shape[0]
        line += f"; classifier {old} -> {new} classes, re-initialised: {', '.join(reset)}"
    log(line)


def build_teacher(cfg, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """distill.teacher: the model its file names, with those weights, in eval mode without gradients, on the
    training device in the run's precision; a teacher of another class count is an error at start."""
    from models import count_gmacs, create_model

    from .checkpoint import CheckpointError, init_weights
    from .config import ConfigError

    path = Path(cfg.distill.teacher)
    try:
        state, name, how = init_weights(path)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"distill.teacher={path}: {e}") from None
    classes = state["head.weight"].shape[0] if "head.weight" in state else None
    if classes != cfg.model.num_classes:
        raise ConfigError(f"distill.teacher={path} ({name}) has {classes} classes but model.num_classes="
                          f"{cfg.model.num_classes}: a teacher must predict the student's classes")
    teacher = create_model(name, num_classes=classes, img_size=cfg.model.img_size)
    teacher.load_state_dict(state)
    gmacs = count_gmacs(teacher, cfg.model.img_size)
    teacher = teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return teacher, (f"[plan] distillation ({cfg.distill.type}, alpha {cfg.distill.alpha}, tau {cfg.distill.tau}): "
                     f"teacher {name} from {path} ({how}), {gmacs:.3g} GMACs per image on top of the student's")


def _clip_without_host_sync() -> None:
    """DeepSpeed's ZeRO-1/2 gradient clipping asks `if is_invalid_grad_norm(norm)` per parameter group:
    a host-device sync every step. The same clip, computed on the device: a non-finite or negative norm
    counts as infinite (then the clip zeroes the step's update, as DeepSpeed's inf branch does).
    With fp32 weights (bf16 autocast, fp32) its step() also asks is_invalid_grad_norm of the global
    norm every step to skip the step: here it does not ask (as bf16 with check_grad_overflow=false);
    a non-finite norm gives a zero update through the clip, and the trainer's non-finite loss check at
    each log window rolls the run back."""
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if getattr(DeepSpeedZeroOptimizer.unscale_and_clip_grads, "sync_free", False):
        return

    def unscale_and_clip_grads(self, grad_groups_flat, total_norm):
        if self.clip_grad == 0.0 and self.loss_scale == 1.0:
            return
        combined_scale = self.loss_scale
        if self.clip_grad > 0.0:
            norm = torch.as_tensor(total_norm, dtype=torch.float, device=self.device)
            norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm, torch.full_like(norm, float("inf")))
            combined_scale = torch.clamp(((norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0) * self.loss_scale
        for grad in grad_groups_flat:
            for g in grad if isinstance(grad, list) else [grad]:
                g.data.mul_(1.0 / combined_scale)

    def never_invalid(norm) -> bool:  # only step() calls it once the clipping is ours
        return False

    never_invalid.original = stage_1_and_2.is_invalid_grad_norm
    stage_1_and_2.is_invalid_grad_norm = never_invalid
    unscale_and_clip_grads.sync_free = True
    unscale_and_clip_grads.original = DeepSpeedZeroOptimizer.unscale_and_clip_grads
    DeepSpeedZeroOptimizer.unscale_and_clip_grads = unscale_and_clip_grads


def build_engine(plan: RunPlan, model: nn.Module, steps_per_epoch: int = 1, total_steps: int = 1,
                 load_universal: bool = False):
    """deepspeed.initialize with the run's optimizer, schedule and generated DeepSpeed config."""
    import deepspeed

    _clip_without_host_sync()
    cfg, lr = plan.cfg, plan.batch.lr
    optimizer = build_optimizer(cfg, model, lr)
    scheduler = build_scheduler(cfg, optimizer, lr, steps_per_epoch, total_steps)
    ds_config = copy.deepcopy(plan.ds_config)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if compile_enabled(cfg, engine.device, plan.zero_stage):
        check_compiler(cfg.train.compile_backend, torch.device(engine.device).type)
        engine.compile(backend=cfg.train.compile_backend)
    return engine


def grad_norm_on_demand(engine) -> bool:
    """Whether the gradient norm may be left out of steps that do not log it. DeepSpeed's ZeRO-1/2 optimizer
    computes it every step (a pass over every gradient and an all-reduce) even without clipping; without
    clipping (or offload) only the logged steps need it, so the trainer switches DeepSpeed's own
    zero_optimization.compute_grad_norm per step (set_grad_norm)."""
    opt = engine.optimizer
    return (hasattr(opt, "compute_grad_norm") and getattr(opt, "clip_grad", 1.0) == 0.0
            and not getattr(opt, "cpu_offload", True) and not getattr(opt, "zenflow", True))


def set_grad_norm(engine, wanted: bool) -> None:
    """The next optimizer step computes the gradient norm (engine.get_global_grad_norm()) or not; only for an
    engine where grad_norm_on_demand() holds."""
    engine.optimizer.compute_grad_norm = wanted


def compile_decision(cfg: RunConfig, device: torch.device, zero_stage: int) -> tuple[bool, str]:
    """(compile the model?, why train.compile=auto left it off). Auto: on with CUDA, except at ZeRO stage 3,
    whose parameter hooks torch.compile has broken before (pytorch #115484) and which no GPU run here has
    measured yet; train.compile=true compiles there too."""
    if cfg.train.compile != "auto":
        return bool(cfg.train.compile), ""
    if torch.device(device).type != "cuda":
        return False, "train.compile=auto: off without CUDA"
    if zero_stage == 3:
        return False, ("train.compile=auto: off at ZeRO stage 3 (torch.compile with ZeRO-3's parameter hooks is "
                       "not yet measured here; train.compile=true to try it)")
    return True, ""


def compile_enabled(cfg: RunConfig, device: torch.device, zero_stage: int) -> bool:
    return compile_decision(cfg, device, zero_stage)[0]


def check_compiler(backend: str, device_type: str) -> None:
    """Inductor generates code that a compiler on this node must build at run time: C for Triton's launchers
    on a GPU, C++ for its CPU kernels. Without one, the first step would fail deep inside torch.compile."""
    if backend != "inductor":
        return
    env, names = ("CC", ("gcc", "clang", "cc")) if device_type == "cuda" else ("CXX", ("g++", "clang++", "c++"))
    found = [c for c in ((os.environ.get(env) or "").split()[:1] + list(names)) if shutil.which(c)]
    if not found:
        raise ConfigError(f"train.compile with train.compile_backend=inductor needs a {'C' if env == 'CC' else 'C++'} "
                          f"compiler on this node ({env}, or one of {', '.join(names)} on PATH) and none was found: "
                          "load a compiler module (module load gcc), or set train.compile=false "
                          "(or train.compile_backend=aot_eager: no code generation)")


def compile_report() -> str:
    """What torch.compile made of the model so far: graphs, graph breaks (with their reasons), recompiles."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    reasons = "; ".join(f"{n}x {r[:120]}" for r, n in sorted(breaks.items(), key=lambda kv: -kv[1])[:3])
    return (f"{counters['stats'].get('unique_graphs', 0)} graph(s), {sum(breaks.values())} graph break(s)"
            f"{' (' + reasons + ')' if reasons else ''}, {counters['recompiles'].total()} recompile(s)")


def build_loss(state=None) -> nn.Module:
    """The training loss. Test-only: TRAIN_TEST_NAN_AT_STEP=N makes the loss of step N non-finite once
    (the first time this process reaches it), to exercise the rollback."""
    loss = SoftTargetCrossEntropy()
    at = os.environ.get("TRAIN_TEST_NAN_AT_STEP")
    return loss if not at or state is None else _NanOnce(loss, state, int(at))


class _NanOnce(nn.Module):
    def __init__(self, loss: nn.Module, state, step: int) -> None:
        super().__init__()
        self.loss, self.state, self.step = loss, state, step

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = self.loss(logits, target)
        if self.state.step + 1 == self.step:
            self.step = -1
            return value * float("nan")
        return value
