"""Checkpoints: complete or absent, never lost, and everything a resumed run needs.

Layout of <run dir>/checkpoints/:
    step_00001200/     DeepSpeed's files (model, optimizer, scheduler), rng_rank<r>.pt (python, numpy,
                       torch, CUDA generators of rank r), ema.pt, and meta.json (written last): the
                       RunState, what the engine ran (ZeRO stage, dtype, world size), the config
    step_00001200-2/   the same step written again by another timeline (a resume from an older
                       checkpoint): names are never reused, so no directory is ever replaced
    latest             the tag of the newest complete checkpoint; moved only after the write
A save goes to <tag>.partial/; every file and directory is fsynced, then it is renamed, and only then
`latest` moves (atomically, fsynced). A process killed at any moment leaves either the previous
checkpoint or the new one named by `latest`; a .partial directory is ignored and removed at the
next save. Retention follows write order (not step names): the newest `keep_last`, the `keep_best`
best evaluated ones and the `keep_every_epochs` milestones stay; the checkpoint just written and the
one `latest` names are never deleted. The directory must be on a file system all ranks share.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .distributed import DistEnv

META = "meta.json"
TAG = re.compile(r"step_(\d{8})(-\d+)?")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory and what to do."""


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values: `torch.load(weights_only=True)` reads it back
    (NumPy's key array would need unpickling NumPy's reconstructor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rng_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:  # written before the NumPy state was stored as a tensor (2026-12)
        return torch.load(path, weights_only=False)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file's data and every directory's entries on disk (a rename is only durable after both)."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _kill_hook(save_index: int, rank: int) -> threading.Timer | None:
    """Test-only (TRAIN_TEST_KILL_IN_SAVE=<save index>:<rank>:<seconds>): SIGKILL this process that many
    seconds into its save number <save index>, or at the save's very end if it finishes sooner."""
    spec = os.environ.get("TRAIN_TEST_KILL_IN_SAVE")
    if not spec:
        return None
    index, who, delay = spec.split(":")
    if int(index) != save_index or int(who) != rank:
        return None
    timer = threading.Timer(float(delay), os.kill, (os.getpid(), 9))
    timer.start()
    return timer


class Checkpointer:
    """Decides when a save is due and writes it; one save path for every trigger (epoch end, every
    N steps, a stop signal, the end of the run), and never the same step twice."""

    def __init__(self, directory: Path, keep_last: int, env: DistEnv, *, every_steps: int = 0,
                 keep_best: int = 0, keep_every_epochs: int = 0, log=print) -> None:
        self.dir, self.keep_last, self.env, self.every_steps = directory, keep_last, env, every_steps
        self.keep_best, self.keep_every_epochs, self.log = keep_best, keep_every_epochs, log
        self.last_saved_step: int | None = None
        self.last_path: Path | None = None
        self.saves = 0

    def due(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def complete(self) -> list[tuple[int, str, dict]]:
        """(write sequence, tag, meta) of the complete checkpoints, oldest write first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            if p.is_dir() and TAG.fullmatch(p.name) and (p / META).is_file():
                try:
                    meta = json.loads((p / META).read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                out.append((meta.get("seq", 0), p.name, meta))
        return sorted(out, key=lambda e: (e[0], e[1]))

    def latest(self) -> Path | None:
        """The newest complete checkpoint by write order. `latest` names it, except after a kill in the
        instant between a save's rename and the pointer's update: then the newer, complete one is
        taken and the pointer repaired (rank 0)."""
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        tag_dir = self.dir / pointer.read_text().strip()
        named = check_complete(tag_dir)
        newer = [(seq, tag) for seq, tag, _ in self.complete() if seq > named.get("seq", 0)]
        if newer:
            seq, tag = newer[-1]
            self.log(f"[checkpoint] {tag} (write {seq}) is complete and newer than {tag_dir.name}, which 'latest' "
                     f"names: a save was interrupted after writing it; using it")
            if self.env.is_main:
                write_atomically(pointer, tag + "\n")
            tag_dir = self.dir / tag
        return tag_dir

    def _new_tag(self, step: int) -> str:
        tag, n = f"step_{step:08d}", 1
        while (self.dir / tag).exists():
            n += 1
            tag = f"step_{step:08d}-{n}"
        return tag

    def save(self, engine, meta: dict[str, Any], ema_state: dict | None) -> Path:
        step = meta["state"]["step"]
        if step == self.last_saved_step:
            return self.last_path
        t0 = time.perf_counter()
        self.saves += 1
        timer = _kill_hook(self.saves, self.env.rank)
        tag = [None]
        if self.env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
            tag = [self._new_tag(step)]
        dist.broadcast_object_list(tag, src=0)
        tag = tag[0]
        final, partial = self.dir / tag, self.dir / f"{tag}.partial"
        engine.save_checkpoint(str(self.dir), tag=partial.name, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{self.env.rank}.pt")
        dist.barrier()  # every rank's part is written
        fsync_tree(partial)  # each rank: what it wrote (and the rest) is on disk
        dist.barrier()
        if self.env.is_main:
            if ema_state is not None:
                torch.save(ema_state, partial / "ema.pt")
                _fsync(partial / "ema.pt")
            previous = self.complete()
            meta = {**meta, "seq": 1 + max((seq for seq, _, _ in previous), default=0)}
            write_atomically(partial / META, json.dumps(meta, indent=1))
            os.replace(partial, final)
            _fsync(self.dir)
            if os.environ.get("TRAIN_TEST_KILL_BEFORE_POINTER") == str(self.saves):  # test-only
                os.kill(os.getpid(), 9)
            write_atomically(self.dir / "latest", tag + "\n")
            self._retain(tag)
        dist.barrier()
        if timer is not None:  # the kill moment fell after the save: die at its very end
            timer.cancel()
            os.kill(os.getpid(), 9)
        self.last_saved_step, self.last_path = step, final
        self.log(f"[checkpoint] {final} ({time.perf_counter() - t0:.2f} s)")
        return final

    def _retain(self, just_written: str) -> None:
        entries = self.complete()
        keep = {just_written} | {tag for _, tag, _ in entries[-self.keep_last:]}
        if self.keep_best:
            scored = [(m["top1"], seq, tag) for seq, tag, m in entries if m.get("top1") is not None]
            keep |= {tag for _, _, tag in sorted(scored, reverse=True)[:self.keep_best]}
        if self.keep_every_epochs:
            keep |= {tag for _, tag, m in entries if m.get("epoch_end_save")
                     and m["state"]["epoch"] % self.keep_every_epochs == 0}
        for _, tag, _ in entries:
            if tag not in keep:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
                shutil.rmtree(self.dir / f"{tag}.universal", ignore_errors=True)


def check_complete(tag_dir: Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint, or a CheckpointError saying what is wrong."""
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {tag_dir} does not exist (the 'latest' pointer names it); "
                              "restore it, or set train.resume to an existing checkpoint or 'none'")
    meta_file = tag_dir / META
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete or corrupt (no readable {META}); delete it, "
                              "or set train.resume to an older checkpoint directory") from None
    if not any(tag_dir.glob("*model_states.pt")):
        raise CheckpointError(f"checkpoint {tag_dir} has no DeepSpeed model states: incomplete or not a "
                              "checkpoint of this trainer")
    return meta


def to_universal(tag_dir: Path, env: DistEnv) -> Path:
    """Convert a checkpoint to DeepSpeed's universal format (for another world size), once."""
    out = tag_dir.with_name(tag_dir.name + ".universal")
    if env.is_main and not (out / "zero").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                 str(tag_dir), "--output_folder", str(out), "--inject_missing_state"],
                                capture_output=True, text=True)
        if result.returncode:
            raise CheckpointError(f"converting {tag_dir} to a universal checkpoint failed:\n{result.stderr[-2000:]}")
    dist.barrier()
    return out


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory from what a user may point at: the step_N directory itself, a
    checkpoints/ directory or a run directory (their `latest` checkpoint)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / META).is_file() or any(candidate.glob("*model_states.pt")):
            return candidate
        if (candidate / "latest").is_file():
            return candidate / (candidate / "latest").read_text().strip()
    raise CheckpointError(f"{path} is not a checkpoint: expected a step_N directory with {META}, or a run or "
                          "checkpoints directory with a 'latest' file")


def consolidated_weights(tag_dir: Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full fp32 model state dict of a checkpoint at any ZeRO stage, without DeepSpeed's engine
    (ZeRO 1-3: gathered from the optimizer partitions; ZeRO 0: the fp32 master copy under bf16),
    or its EMA weights; plus the checkpoint's meta.json."""
    import contextlib
    import io

    meta = check_complete(tag_dir)
    if "engine" not in meta:
        raise CheckpointError(f"checkpoint {tag_dir} was written by an older version of this trainer "
                              "(no 'engine' record in meta.json): export or resume it with that version")
    if ema:
        if not (tag_dir / "ema.pt").is_file():
            raise CheckpointError(f"checkpoint {tag_dir} has no EMA weights (the run had train.model_ema=false)")
        return torch.load(tag_dir / "ema.pt", map_location="cpu", weights_only=True), meta
    if meta["engine"]["zero_stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints per-shard progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return {k: v.float() for k, v in state.items()}, meta
    try:
        saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # bf16 at ZeRO 0: DeepSpeed's optimizer objects beside the weights
        saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state = {k: v.float() for k, v in saved["module"].items()}
    fp32_groups = (saved.get("optimizer") or {}).get("fp32_groups")
    if fp32_groups:  # bf16 at ZeRO 0: the module holds bf16 copies; the fp32 master weights, by name
        names = meta.get("fp32_group_names")
        if names is None or [len(g) for g in names] != [len(g) for g in fp32_groups]:
            raise CheckpointError(f"checkpoint {tag_dir}: its meta.json does not name the parameters of the "
                                  "optimizer's fp32 master copy (written by an older version): export it with that version")
        for group_names, tensors in zip(names, fp32_groups):
            for name, tensor in zip(group_names, tensors):
                if state[name].shape != tensor.shape:
                    raise CheckpointError(f"checkpoint {tag_dir}: master weight {name} has shape "
                                          f"{tuple(tensor.shape)}, the model's is {tuple(state[name].shape)}")
                state[name] = tensor.float()
    return state, meta


def state_mismatch(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor], reshapable: set[str] = frozenset()) -> str:
    """What keeps `given` from loading into a model whose state dict is `own`: missing, unexpected and
    differently shaped tensors (the first few of each, named), or "" when it fits. Tensors in
    `reshapable` may differ in shape (a classifier that is re-initialised)."""
    def some(names: list[str], show=str) -> str:
        return ", ".join(show(n) for n in names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = sorted(n for n in set(own) & set(given) if given[n].shape != own[n].shape and n not in reshapable)
    return "; ".join(p for p in (
        f"{len(missing)} missing: {some(missing)}" if missing else "",
        f"{len(unexpected)} unexpected: {some(unexpected)}" if unexpected else "",
        some(wrong, lambda n: f"{n} {tuple(given[n].shape)} vs {tuple(own[n].shape)}") if wrong else "") if p)


def init_weights(path: Path) -> tuple[dict[str, torch.Tensor], str, str]:
    """Weights to start a run from (train.init_from): (state dict, model name, how they were read).
    Someone else's weights are untrusted input: a safetensors file runs no code, and a checkpoint's
    fp32 module weights (ZeRO 0-2, fp32 weights: the default autocast policy) are read with
    torch.load(weights_only=True). Only bf16 weights or ZeRO-3 partitions need DeepSpeed's reader, which
    unpickles: export such a checkpoint to safetensors where it is trusted, and start from that file."""
    from models.exported import load_exported

    path = Path(path)
    if path.suffix == ".safetensors":
        state, header = load_exported(path)
        return state, header["model"], "safetensors"
    tag_dir = find_checkpoint(path)
    meta = check_complete(tag_dir)
    if meta.get("engine", {}).get("zero_stage", 0) < 3:
        try:
            module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError:  # DeepSpeed objects beside the weights (bf16 at ZeRO 0)
            module = None
        if module is not None and all(v.dtype == torch.float32 for v in module.values()):
            return dict(module), meta["model"], "checkpoint module weights, torch.load(weights_only=True)"
    state, meta = consolidated_weights(tag_dir)
    return state, meta["model"], "checkpoint fp32 master weights via DeepSpeed's reader (unpickles: trusted files only)"


def fp32_group_names(engine) -> list[list[str]] | None:
    """Parameter names of each fp32 master group of a ZeRO-0 bf16 engine (what export reads by name)."""
    groups = getattr(engine.optimizer, "fp16_groups", None)
    if engine.zero_optimization_stage() > 0 or groups is None:
        return None
    names = {p: n for n, p in engine.module.named_parameters()}
    return [[names[p] for p in group] for group in groups]


def _model_args(meta: dict[str, Any]) -> dict[str, Any]:
    model = meta["config"]["model"]
    return {"num_classes": model["num_classes"], "img_size": model["img_size"]}


def export(tag_dir: Path, out: Path | None = None, ema: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Write a checkpoint's weights as one safetensors file `create_model(name, checkpoint_path=...)`
    loads; default path <run dir>/exported/<model>-<step tag>[-ema].safetensors."""
    from models import create_model
    from models.exported import save_exported

    state, meta = consolidated_weights(tag_dir, ema)
    args = _model_args(meta)
    model = create_model(meta["model"], **args)  # check it loads before writing anything
    missing = set(model.state_dict()) ^ set(state)
    if missing:
        raise CheckpointError(f"checkpoint {tag_dir}: weights do not match model {meta['model']} "
                              f"({len(missing)} names differ, e.g. {sorted(missing)[:3]})")
    if out is None:
        out = tag_dir.parent.parent / "exported" / f"{meta['model']}-{tag_dir.name}{'-ema' if ema else ''}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_exported(tmp, meta["model"], {k: v.to(dtype) for k, v in state.items()}, args, step=meta["state"]["step"],
                  class_names=meta.get("class_names"), eval_crop_pct=meta["state"].get("eval_crop_pct"),
                  weights="ema" if ema else "model", source=str(tag_dir.resolve()))
    os.replace(tmp, out)
    return out
