"""The run configuration: one typed tree, read from YAML, overridden from the command line.

A run is fully described by a `RunConfig`. YAML files in `configs/` fill it (a variant file
names its family recipe under `base:`), then `section.key=value` overrides from the command
line. Every key and value is checked against the dataclasses below before anything starts:
an unknown key names the closest valid one, a wrong type or range names key, value and what
is allowed. Key names follow timm/DeiT where those are what users know.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and what is allowed."""


def knob(default: Any, *, ge: float | None = None, gt: float | None = None,
         le: float | None = None, lt: float | None = None) -> Any:
    """A config field with optional numeric bounds, checked at load time."""
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=bounds)
    return field(default=default, metadata=bounds)


@dataclass
class ModelConfig:
    name: str = "cs_mixer_tiny"            # a name from models.list_models()
    num_classes: int = knob(1000, ge=1)
    img_size: int = knob(224, ge=8)        # train/eval resolution (square)
    drop_path: float | None = knob(None, ge=0.0, lt=1.0)  # null: the variant's default
    grad_checkpointing: bool = False       # timm's set_grad_checkpointing: per block, less activation memory


@dataclass
class DataConfig:
    backend: Literal["dali", "ffcv", "folder", "synthetic"] = "folder"
    root: str | None = None                # ImageNet layout: ROOT/train/<class>/*.JPEG, ROOT/val/...
    workers: int = knob(8, ge=0)           # loader processes / DALI threads per rank
    scale: list[float] = knob([0.08, 1.0])  # RandomResizedCrop area range
    ratio: list[float] = knob([0.75, 4.0 / 3.0])
    hflip: float = knob(0.5, ge=0.0, le=1.0)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    crop_pct: float | None = knob(None, gt=0.0, le=1.0)  # eval resize = img_size / crop_pct; null: model's
    synthetic_size: int = knob(12800, ge=1)  # samples per epoch for backend=synthetic
    minival_per_class: int = knob(0, ge=0)  # hold out N train images per class (never trained on): minival/*


@dataclass
class AugConfig:
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # rand-m<M>[-n<N>][-mstd<S>][-inc1] | autoaug-imagenet | none
    mixup: float = knob(0.8, ge=0.0)       # Beta(alpha) for Mixup; 0 disables
    cutmix: float = knob(1.0, ge=0.0)      # Beta(alpha) for CutMix; 0 disables
    mixup_prob: float = knob(1.0, ge=0.0, le=1.0)
    mixup_switch_prob: float = knob(0.5, ge=0.0, le=1.0)
    mixup_off_epoch: int = knob(0, ge=0)   # timm: Mixup/CutMix off from this epoch on (0: never off)
    smoothing: float = knob(0.1, ge=0.0, lt=1.0)
    reprob: float = knob(0.25, ge=0.0, le=1.0)
    remode: Literal["pixel", "const", "rand"] = "pixel"
    recount: int = knob(1, ge=1)
    repeats: int = knob(1, ge=1)           # repeated augmentation (DeiT's RASampler, timm's --aug-repeats; DeiT: 3)


@dataclass
class OptimConfig:
    opt: Literal["adamw", "adam", "sgd", "momentum"] = "adamw"  # timm's names; sgd = Nesterov momentum SGD
    lr: float | None = knob(None, gt=0.0)  # null: lr_base * global_batch / lr_base_size
    lr_base: float = knob(5e-4, gt=0.0)
    lr_base_size: int = knob(512, ge=1)
    weight_decay: float = knob(0.05, ge=0.0)
    betas: list[float] = knob([0.9, 0.999])  # adam/adamw
    eps: float = knob(1e-8, gt=0.0)           # adam/adamw
    momentum: float = knob(0.9, ge=0.0, lt=1.0)  # sgd/momentum
    clip_grad: float | None = knob(None, gt=0.0)  # global grad-norm clip; null: none
    layer_decay: float | None = knob(None, gt=0.0, le=1.0)  # timm/BEiT layer-wise lr decay (fine-tuning); null: off


@dataclass
class ScheduleConfig:
    sched: Literal["cosine", "step", "const", "wsd"] = "cosine"  # timm's names + wsd; stepped per optimizer update
    warmup_epochs: float = knob(5.0, ge=0.0)
    decay_epochs: float = knob(30.0, gt=0.0)   # step: lr x decay_rate every decay_epochs
    decay_rate: float = knob(0.1, gt=0.0, le=1.0)
    warmup_lr: float = knob(1e-6, ge=0.0)
    min_lr: float = knob(1e-5, ge=0.0)
    cooldown_epochs: float = knob(0.0, ge=0.0)  # cosine/step: min_lr at the end (timm); wsd: the decay phase
    cooldown_fraction: float = knob(0.0, ge=0.0, lt=1.0)  # wsd: the decay phase as a fraction of all steps instead
    cooldown_shape: Literal["linear", "1-sqrt", "cosine"] = "1-sqrt"  # wsd: the decay's shape to min_lr


@dataclass
class TrainConfig:
    epochs: int = knob(300, ge=1)
    batch_size: int | Literal["auto"] | None = knob(None, ge=1)  # per GPU (DeepSpeed's micro-batch); auto: the
                                                 # largest that fits, found at start on CUDA (trainer/batch_probe.py)
    global_batch: int | None = knob(None, ge=1)  # DeepSpeed's train_batch_size
    grad_accum: int | None = knob(None, ge=1)    # DeepSpeed's gradient_accumulation_steps
    seed: int = knob(0, ge=0)
    max_steps: int | None = knob(None, ge=1)     # stop after this many optimizer steps
    log_every: int = knob(50, ge=1)             # also how often a stop signal / NaN loss is checked
    peak_tflops: float | None = knob(None, gt=0.0)  # per device, the MFU denominator; null: measured at start
    max_rollbacks: int = knob(3, ge=0)           # non-finite loss: reload the last checkpoint this often, then exit 3
    compile: bool | Literal["auto"] = "auto"     # torch.compile the model inside the engine; auto: on with CUDA
    compile_backend: str = "inductor"            # torch.compile's backend (aot_eager / eager: no code generation)
    profile: str | None = None                   # "START:END": torch.profiler trace of steps START+1..END
    hang_timeout_s: float | None = knob(None, gt=0.0)  # no step this long: stacks dumped, exit 86 (requeue); null: derived
    straggler_factor: float = knob(1.5, gt=1.0)  # a rank this much slower than the median (data + forward) is logged
    preflight: bool = True                       # node health at start (matmul timing, all-reduce check), > 1 rank
    preflight_factor: float = knob(3.0, gt=1.0)  # a rank's matmul this much slower than the median: exclude its node
    model_ema_every: int = knob(1, ge=1)         # update the EMA every k optimizer steps (decay ** k per update)
    model_ema: bool = False
    model_ema_decay: float = knob(0.99996, gt=0.0, lt=1.0)
    output_dir: str = "runs"
    run_name: str | None = None                  # null: <model>-<timestamp>
    resume: str = "auto"                         # auto | none | path to a checkpoint
    branch_of: str | None = None                 # "<trunk run dir>@step_N": set by launch/branch.py (MLflow tags)
    init_from: str | None = None                 # start from these weights (exported .safetensors or a checkpoint);
                                                 # fresh optimizer, schedule and state; another head re-initialised


@dataclass
class DeepSpeedConfig:
    zero_stage: int = knob(2, ge=0, le=3)
    bf16: bool = True
    # autocast: fp32 weights, bf16 matmuls under torch.autocast (DeepSpeed's torch_autocast; timm's AMP),
    # the closest to fp32 measured (README, Precision); weights: DeepSpeed's bf16 mode (bf16 weights,
    # activations and norms; fp32 master weights in the optimizer), less memory
    bf16_mode: Literal["autocast", "weights"] = "autocast"
    config: str | None = None   # a DeepSpeed JSON merged on top of the generated one


@dataclass
class CheckpointConfig:
    every_steps: int = knob(0, ge=0)   # 0: only at epoch ends
    keep_last: int = knob(3, ge=1)     # the newest N written (write order, not step order)
    keep_best: int = knob(0, ge=0)     # also the N best by val top-1 (EMA top-1 with train.model_ema)
    keep_every_epochs: int = knob(0, ge=0)  # also every epoch-end checkpoint of epochs that are multiples of N
    dir: str | None = None             # null: <run dir>/checkpoints


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None             # null: $MLFLOW_TRACKING_URI, else a local SQLite store
    experiment: str = "vision-mlp"
    system_metrics: bool = True
    log_model: bool = True             # export the final weights (safetensors) as a run artifact
    retry_s: float = knob(10.0, gt=0.0)  # while the server is unreachable, retry this often
    register_model: str | None = None  # register the final export as a version of this Model Registry name
    off_track_points: float = knob(5.0, gt=0.0)  # val top-1 this far behind the best earlier run (one seed): off-track
    off_track_sd: float = knob(3.0, gt=0.0)  # ... where that setting has several seeds: this many sd below their mean
    parent_run_id: str | None = None   # nest the run under this MLflow run (a sweep's parent; launch/sweep.py)


@dataclass
class DistillConfig:
    teacher: str | None = None         # an exported .safetensors or a run/checkpoint dir (its model named there)
    type: Literal["soft", "hard"] = "soft"  # DeiT's: KL at temperature tau, or cross-entropy on the teacher's top-1
    alpha: float = knob(0.5, ge=0.0, le=1.0)  # weight of the distillation term (1 - alpha: the label loss)
    tau: float = knob(1.0, gt=0.0)     # soft: the temperature


@dataclass
class EvalConfig:
    suite_root: str | None = None      # a benchmark folder (evaluate.py --suite's layouts): evaluated at the end
    suite_every_epochs: int = knob(0, ge=0)  # and every N epochs (0: only at the end); suite/<benchmark>/<metric>


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists inline ([0.08, 1.0]): reads like the files in configs/."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


# ----------------------------------------------------------------------------- schema

def _sections() -> dict[str, type]:
    return typing.get_type_hints(RunConfig)


def _fields(section_cls: type) -> dict[str, tuple[Any, dict[str, float]]]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in dataclasses.fields(section_cls)}


def valid_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in _sections().items() for k in _fields(cls)]


def _unknown_key(key: str, where: str) -> ConfigError:
    leaf = key.partition(".")[2]  # the right key name in the wrong section (train.lr) first
    close = [k for k in valid_keys() if k.partition(".")[2] == leaf][:1] or \
        difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else f"; valid sections: {', '.join(_sections())}"
    return ConfigError(f"{where}unknown config key '{key}'{hint}")


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise TypeError. Only lossless conversions are made."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is Literal:
        if value in args:
            return value
        raise TypeError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_coerce(v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError
    raise TypeError


def _check_bounds(key: str, value: Any, bounds: dict[str, float], where: str) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        if isinstance(v, str):  # a Literal choice ('auto') beside a number
            continue
        for op, limit in bounds.items():
            ok = {"ge": v >= limit, "gt": v > limit, "le": v <= limit, "lt": v < limit}[op]
            if not ok:
                sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op]
                raise ConfigError(f"{where}{key}={value!r} is out of range: must be {sign} {limit}")


def _set(cfg: RunConfig, key: str, value: Any, where: str) -> None:
    section, _, name = key.partition(".")
    sections = _sections()
    if section not in sections or name not in _fields(sections[section]):
        raise _unknown_key(key, where)
    tp, bounds = _fields(sections[section])[name]
    try:
        typed = _coerce(value, tp)
    except TypeError:
        raise ConfigError(f"{where}{key}={value!r} has the wrong type: expected {_describe(tp)}") from None
    _check_bounds(key, typed, bounds, where)
    setattr(getattr(cfg, section), name, typed)


# ----------------------------------------------------------------------------- loading

def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file and the `base:` file(s) it extends into {"section.key": (value, file)}."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: 'base:' loop: " + " -> ".join(str(p) for p in (*chain, path)))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a file name or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:  # in order: a later base overrides an earlier one, the file itself all of them
        merged.update(_read_yaml(path.parent / base, (*chain, path)))
    for section, values in data.items():
        if not isinstance(values, dict):
            if section in _sections():
                raise ConfigError(f"{path}: section '{section}' must be a mapping, got {values!r}")
            raise _unknown_key(str(section), f"{path}: ")
        for name, value in values.items():
            merged[f"{section}.{name}"] = (value, path)
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=2e-3' -> ('optim.lr', 0.002); the value is read as YAML, then typed by the schema."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*\.[A-Za-z_]\w*", key.strip()):
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if re.fullmatch(r"\d+(:\d+)+", raw.strip()):  # YAML 1.1 reads 2:4 as the base-60 number 124
        value = raw.strip()
    if isinstance(value, (dict,)):
        value = raw  # a mapping is never a valid leaf value; keep the text for the error message
    return key.strip(), value


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Build the RunConfig for a YAML file plus command-line overrides, validated."""
    values = {key: (value, f"{source}: ") for key, (value, source) in _read_yaml(Path(path)).items()}
    return _build(values, overrides)


def config_from_dict(data: dict[str, dict[str, Any]], overrides: list[str] = (), source: str = "") -> RunConfig:
    """The RunConfig saved with a run (RunConfig.to_dict(), e.g. a checkpoint's meta.json) plus overrides."""
    values = {f"{section}.{key}": (value, f"{source}: ") for section, keys in data.items()
              for key, value in keys.items()}
    return _build(values, overrides)


def _build(values: dict[str, tuple[Any, str]], overrides: list[str]) -> RunConfig:
    cfg = RunConfig()
    for key, (value, where) in values.items():
        _set(cfg, key, value, where)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, "command line: ")
    validate(cfg)
    return cfg


_AUTO_AUGMENT = re.compile(r"rand(-(m\d+(\.\d+)?|n\d+|mstd\d+(\.\d+)?|inc[01]|mmax\d+(\.\d+)?|w\d+))*")


def validate(cfg: RunConfig) -> None:
    """Checks that span several keys or need the model registry."""
    from models import list_models  # the model table lives in one place: the registry

    if cfg.model.name not in list_models():
        close = difflib.get_close_matches(cfg.model.name, list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"model.name='{cfg.model.name}' is not a known model{hint}; "
                          f"known: {', '.join(list_models())}")
    aa = cfg.aug.auto_augment
    if aa not in ("none", "autoaug-imagenet") and not _AUTO_AUGMENT.fullmatch(aa):
        raise ConfigError(f"aug.auto_augment='{aa}' is not understood: expected 'none', "
                          "'autoaug-imagenet' or a RandAugment string like 'rand-m9-mstd0.5-inc1'")
    for key, pair in (("data.scale", cfg.data.scale), ("data.ratio", cfg.data.ratio),
                      ("optim.betas", cfg.optim.betas)):
        if len(pair) != 2 or pair[0] > pair[1] or pair[0] <= 0:
            raise ConfigError(f"{key}={pair!r}: expected [low, high] with 0 < low <= high")
    if cfg.data.scale[1] > 1.0 or any(not 0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"data.scale must lie in (0, 1] and optim.betas in [0, 1): "
                          f"got data.scale={cfg.data.scale}, optim.betas={cfg.optim.betas}")
    if cfg.schedule.sched == "wsd" and not (cfg.schedule.cooldown_epochs or cfg.schedule.cooldown_fraction):
        raise ConfigError("schedule.sched=wsd needs its decay phase: schedule.cooldown_epochs (epochs) or "
                          "schedule.cooldown_fraction (of all steps), e.g. schedule.cooldown_fraction=0.2")
    if cfg.schedule.warmup_epochs + cfg.schedule.cooldown_epochs >= cfg.train.epochs:
        raise ConfigError(f"schedule.warmup_epochs ({cfg.schedule.warmup_epochs}) + cooldown_epochs "
                          f"({cfg.schedule.cooldown_epochs}) must be fewer than train.epochs ({cfg.train.epochs})")
    if cfg.schedule.min_lr > (cfg.optim.lr or float("inf")):
        raise ConfigError(f"schedule.min_lr={cfg.schedule.min_lr} exceeds optim.lr={cfg.optim.lr}")
    if cfg.train.profile is not None:
        m = re.fullmatch(r"(\d+):(\d+)", cfg.train.profile)
        if not m or int(m.group(1)) >= int(m.group(2)):
            raise ConfigError(f"train.profile={cfg.train.profile!r}: expected START:END optimizer steps with "
                              "START < END, e.g. 100:110")
    if cfg.train.batch_size is None and cfg.train.global_batch is None:
        raise ConfigError("set train.batch_size (per GPU) or train.global_batch (or both)")
    if cfg.deepspeed.config and not Path(cfg.deepspeed.config).is_file():
        raise ConfigError(f"deepspeed.config={cfg.deepspeed.config!r}: file not found")
    if cfg.train.resume not in ("auto", "none") and not Path(cfg.train.resume).exists():
        raise ConfigError(f"train.resume={cfg.train.resume!r}: expected 'auto', 'none' or an existing checkpoint path")


# ----------------------------------------------------------------------------- derived values

@dataclass(frozen=True)
class BatchPlan:
    """How the global batch splits over ranks and accumulation steps, and the lr that follows."""
    world_size: int
    batch_size: int      # per rank, per forward pass
    grad_accum: int
    global_batch: int
    lr: float
    lr_rule: str         # how lr was obtained, for the start-up log


def plan_batch(cfg: RunConfig, world_size: int) -> BatchPlan:
    """Resolve batch_size x grad_accum x world_size = global_batch as DeepSpeed does: any two given
    determine the third; all three given must agree. With global_batch and batch_size given,
    batch_size is an upper bound: on many GPUs the micro-batch shrinks so the global batch holds."""
    t = cfg.train
    bs, acc, gb = t.batch_size, t.grad_accum, t.global_batch
    if bs == "auto":  # before the probe (or without CUDA): no accumulation; the probe may shrink it
        if gb is None or acc is not None:
            raise ConfigError(f"train.batch_size=auto finds the micro-batch and derives the accumulation: it needs "
                              f"train.global_batch (got {gb}) and train.grad_accum=null (got {acc})")
        bs = gb // world_size if gb % world_size == 0 else gb
    if gb is None:
        bs, acc = bs, acc or 1
        gb = bs * acc * world_size
    elif bs is None:
        acc = acc or 1
        if gb % (acc * world_size):
            raise ConfigError(f"train.global_batch={gb} is not divisible by train.grad_accum={acc} x "
                              f"world size {world_size}")
        bs = gb // (acc * world_size)
    elif acc is None:  # batch_size is the largest micro-batch a GPU takes; accumulation makes up the rest
        if gb % world_size:
            raise ConfigError(f"train.global_batch={gb} is not divisible by the world size {world_size}: "
                              "change global_batch or the number of GPUs")
        per_rank = gb // world_size
        bs = max(d for d in range(1, min(bs, per_rank) + 1) if per_rank % d == 0)
        acc = per_rank // bs
    elif bs * acc * world_size != gb:
        raise ConfigError(f"train.batch_size={bs} x train.grad_accum={acc} x world size {world_size} = "
                          f"{bs * acc * world_size}, not train.global_batch={gb}; "
                          "set one of the three to null to have it derived")
    if cfg.optim.lr is not None:
        lr, rule = cfg.optim.lr, f"config: optim.lr={cfg.optim.lr:g} pinned (no batch scaling)"
    else:
        lr = cfg.optim.lr_base * gb / cfg.optim.lr_base_size
        rule = (f"linear rule: lr_base {cfg.optim.lr_base:g} x global batch {gb} / "
                f"{cfg.optim.lr_base_size} = {lr:g}")
    return BatchPlan(world_size, bs, acc, gb, lr, rule)


def resolved(cfg: RunConfig, world_size: int) -> RunConfig:
    """A copy with the derived values (per-GPU batch, accumulation, global batch, lr) filled in:
    what --print-config shows and what is saved with the run."""
    plan = plan_batch(cfg, world_size)
    out = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, batch_size=plan.batch_size, grad_accum=plan.grad_accum, global_batch=plan.global_batch),
        optim=dataclasses.replace(cfg.optim, lr=plan.lr))
    if out.schedule.min_lr > plan.lr:
        raise ConfigError(f"schedule.min_lr={out.schedule.min_lr:g} exceeds the lr {plan.lr:g} "
                          f"({plan.lr_rule})")
    return out


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before a rank starts: the resolved config, the batch plan and the DeepSpeed
    config the engine will run (generated + the user's JSON), with what that JSON changed."""
    cfg: RunConfig
    batch: BatchPlan
    ds_config: dict[str, Any]
    ds_overrides: list[str]

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def dtype(self) -> str:
        if self.ds_config.get("bf16", {}).get("enabled"):
            return "bf16"
        if self.ds_config.get("torch_autocast", {}).get("enabled"):
            return "bf16 autocast"
        return "fp16" if self.ds_config.get("fp16", {}).get("enabled") else "fp32"


def plan_run(cfg: RunConfig, world_size: int, n_params: int | None = None, check_data: bool = True) -> RunPlan:
    """The one place where a run is checked as a whole, on the merged config (YAML + overrides + the
    user's DeepSpeed JSON), before anything starts. Raises ConfigError naming the keys.
    check_data=False: a plan to print (--print-config, --dry-run) on a machine without the data."""
    from .ds_config import build_ds_config

    batch = plan_batch(cfg, world_size)
    cfg = resolved(cfg, world_size)
    ds, changed = build_ds_config(cfg, batch, n_params)
    plan = RunPlan(cfg, batch, ds, changed)
    where = f" (set by {cfg.deepspeed.config})" if "zero_optimization.stage" in changed else ""
    if cfg.train.model_ema and plan.zero_stage == 3:
        raise ConfigError(f"train.model_ema=true needs the full weights on every rank, but the ZeRO stage is 3{where}: "
                          "use deepspeed.zero_stage 0, 1 or 2 (ZeRO-3 partitions the parameters)")
    if plan.dtype == "fp16":
        raise ConfigError(f"deepspeed.config={cfg.deepspeed.config} enables fp16: this trainer runs fp32 or bf16 "
                          "(deepspeed.bf16); fp16's loss scaling is not supported")
    if (cfg.aug.mixup or cfg.aug.cutmix) and cfg.aug.mixup_prob > 0 and batch.batch_size % 2 \
            and cfg.data.backend != "synthetic":
        raise ConfigError(f"Mixup/CutMix need an even per-rank batch, but train.batch_size resolves to "
                          f"{batch.batch_size} at world size {world_size}: change the batch or set aug.mixup=0 "
                          "and aug.cutmix=0")
    check_architecture(cfg)
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        raise ConfigError(f"train.init_from={cfg.train.init_from}: no such file or directory (expected an exported "
                          ".safetensors file or a checkpoint / run directory)")
    if check_data and cfg.data.backend != "synthetic":
        if not cfg.data.root:
            raise ConfigError(f"data.root is not set: data.backend={cfg.data.backend} needs the dataset's folder")
        if cfg.data.backend in ("dali", "ffcv"):
            from data_pipeline import DataError, require
            try:
                require("nvidia.dali" if cfg.data.backend == "dali" else "ffcv", cfg.data.backend)
            except DataError as e:
                raise ConfigError(str(e)) from None
    return plan


def check_architecture(cfg: RunConfig) -> None:
    """Build the model on the meta device (no memory, no time): a resolution or class count the
    architecture cannot take (CS-Mixer's token-mixing windows need img_size a multiple of 224 at 7x7
    groups; S2-MLPv2 a multiple of its patch size) is a config error before anything starts."""
    import torch

    from models import create_model

    try:
        with torch.device("meta"):
            create_model(cfg.model.name, num_classes=cfg.model.num_classes, img_size=cfg.model.img_size)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.name={cfg.model.name} with model.img_size={cfg.model.img_size}, "
                          f"model.num_classes={cfg.model.num_classes}: {e}") from None


def find_config(name: str) -> Path:
    """Accept a path or a bare config name ('cs_mixer_l' -> configs/cs_mixer_l.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(path.stem, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"config file not found: {name}{hint}; shipped configs: {', '.join(known)}")
