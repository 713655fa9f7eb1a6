"""Checkpoints: complete or absent, and everything a resumed run needs.

Layout of <run dir>/checkpoints/:
    step_00001200/     DeepSpeed's files (model, optimizer, scheduler) + meta.json (written last),
                       rng_rank<r>.pt (python, numpy, torch, CUDA generators of rank r), ema.pt
    latest             the tag of the newest complete checkpoint; moved only after the write
A save goes to step_N.partial/ and is renamed when every rank has written its part; a process
killed mid-save leaves a .partial directory that is ignored and removed at the next save. The
directory must be on a file system all ranks share (as DeepSpeed's own checkpoints require).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .distributed import DistEnv

META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory and what to do."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int, env: DistEnv) -> None:
        self.dir, self.keep_last, self.env = directory, keep_last, env

    def tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.glob("step_*") if p.is_dir() and "." not in p.name
                      and (p / META).is_file())

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        tag_dir = self.dir / pointer.read_text().strip()
        check_complete(tag_dir)
        return tag_dir

    def save(self, engine, meta: dict[str, Any], ema_state: dict | None) -> Path:
        tag = f"step_{meta['step']:08d}"
        final, partial = self.dir / tag, self.dir / f"{tag}.partial"
        if self.env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=partial.name, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{self.env.rank}.pt")
        dist.barrier()  # every rank's part is on disk
        if self.env.is_main:
            if ema_state is not None:
                torch.save(ema_state, partial / "ema.pt")
            _write_atomically(partial / META, json.dumps(meta, indent=1))
            if final.exists():  # the same step saved twice (epoch end on a save step): keep the new one
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_atomically(self.dir / "latest", tag + "\n")
            for old in self.tags()[:-self.keep_last]:
                shutil.rmtree(self.dir / old, ignore_errors=True)
                shutil.rmtree(self.dir / f"{old}.universal", ignore_errors=True)
        dist.barrier()
        return final


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
    if ema:
        if not (tag_dir / "ema.pt").is_file():
            raise CheckpointError(f"checkpoint {tag_dir} has no EMA weights (the run had train.model_ema=false)")
        return torch.load(tag_dir / "ema.pt", map_location="cpu", weights_only=True), meta
    if meta["zero_stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints per-shard progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return {k: v.float() for k, v in state.items()}, meta
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state = {k: v.float() for k, v in saved["module"].items()}
    fp32_groups = (saved.get("optimizer") or {}).get("fp32_groups")
    if fp32_groups:  # bf16 at ZeRO 0: the module holds bf16 copies; the master weights are per group
        from models import create_model

        from .optim import decay_split

        names = decay_split(create_model(meta["model"], **_model_args(meta)))
        for group_names, tensors in zip(names, fp32_groups):
            if [state[n].shape for n in group_names] != [t.shape for t in tensors]:
                raise CheckpointError(f"checkpoint {tag_dir}: optimizer groups do not match model "
                                      f"{meta['model']}'s parameters; it was written by another version")
            state.update({n: t.float() for n, t in zip(group_names, tensors)})
    return state, meta


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
    save_exported(tmp, meta["model"], {k: v.to(dtype) for k, v in state.items()}, args, step=meta["step"],
                  weights="ema" if ema else "model", source=str(tag_dir.resolve()))
    os.replace(tmp, out)
    return out
