"""Counts host syncs per optimizer step of a real Trainer run (one process, CPU): every
`aten::_local_scalar_dense` (what .item(), bool(), float(), int() of a tensor run), every `.tolist()`
and every `get_accelerator().synchronize()` (DeepSpeed's timers and ZeRO's overlapped reductions call
it: a no-op on the CPU accelerator, a device sync on CUDA), with the line that asked. On a CUDA device
each of those waits for the device; on this CPU they are counted from the step's Python. Not counted:
the input pipeline's host-side random draws (CPU generator tensors on a GPU machine too) and torch
optimizers' step counters (CPU tensors unless capturable). Also records the steps whose ZeRO-1/2
optimizer computed the gradient norm.
Usage: python tests/host_syncs.py section.key=value ...
Prints two lines: HOST_SYNCS {step: {site: count}} and GRAD_NORM_STEPS [step, ...].
"""
from __future__ import annotations

import collections
import json
import sys
import traceback

import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.config import CONFIG_DIR, load_config
from trainer.distributed import shutdown
from trainer.trainer import Trainer

HOST_SIDE = ("/data_pipeline/", "/torch/optim/")
calls: collections.Counter = collections.Counter()
trainer: Trainer | None = None


def site() -> str | None:
    frames = traceback.extract_stack()[:-3]
    if any(h in f.filename for f in frames for h in HOST_SIDE):
        return None
    for f in reversed(frames):
        if "/torch/" not in f.filename:
            return f"{f.filename.split('site-packages/')[-1].split('/main/')[-1]}:{f.lineno} {f.name}"
    return "?"


def record(kind: str) -> None:
    where = site() if trainer is not None else None
    if where:
        calls[(trainer.state.step, f"{kind} {where}")] += 1


class CountScalarReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            record("item")
        return func(*args, **(kwargs or {}))


real_tolist = torch.Tensor.tolist


def tolist(self):
    record("tolist")
    return real_tolist(self)


torch.Tensor.tolist = tolist
accelerator = type(get_accelerator())
real_synchronize = accelerator.synchronize


def synchronize(self, *args, **kwargs):
    record("synchronize")
    return real_synchronize(self, *args, **kwargs)


accelerator.synchronize = synchronize
real_norm = DeepSpeedZeroOptimizer.scaled_global_norm
norm_steps: list[int] = []


def scaled_global_norm(self, *args, **kwargs):
    norm_steps.append(trainer.state.step + 1)  # the optimizer step being taken
    return real_norm(self, *args, **kwargs)


DeepSpeedZeroOptimizer.scaled_global_norm = scaled_global_norm
trainer = Trainer(load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", sys.argv[1:]))
with CountScalarReads():
    trainer.train()
per_step: dict[int, dict[str, int]] = collections.defaultdict(dict)
for (step, where), n in calls.items():
    per_step[step][where] = n
print("HOST_SYNCS " + json.dumps(per_step))
print("GRAD_NORM_STEPS " + json.dumps(norm_steps))
shutdown()
