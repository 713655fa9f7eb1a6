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
