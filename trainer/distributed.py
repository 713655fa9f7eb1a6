"""Process-group setup for every launcher: torchrun / deepspeed (RANK, WORLD_SIZE, LOCAL_RANK),
srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), or one plain process. gloo on CPU, NCCL on GPU."""
from __future__ import annotations

import contextlib
import io
import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

# A quiet start: the first lines a user reads are the project's. Without a GPU, name DeepSpeed's CPU
# accelerator up front (else every rank warns that it fell back to it); DeepSpeed's ZeRO calls
# torch's all_gather_into_tensor, which torch 2.13 deprecates with a FutureWarning on every start.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_ranks() -> tuple[int, int, int, str]:
    """(rank, local rank, world size, launcher) from the environment the launcher set."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun/deepspeed"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "srun"
    return 0, 0, 1, "single process"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_device(local_rank: int) -> torch.device:
    """This process's GPU. Where each task sees only its own GPU (SLURM --gpus-per-task=1 or --gpu-bind,
    a container per GPU) it is device 0 whatever the local rank; with all of a node's GPUs visible, the
    local rank's."""
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        raise RuntimeError(f"local rank {local_rank} but this process sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process per GPU "
                           "(torchrun --nproc_per_node, srun --ntasks-per-node = GPUs per node)")
    return torch.device("cuda", local_rank)


def init_distributed() -> DistEnv:
    rank, local_rank, world, _ = launcher_ranks()
    if torch.cuda.is_available():
        device = cuda_device(local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # DeepSpeed's init reads RANK/WORLD_SIZE/LOCAL_RANK and MASTER_ADDR/PORT: fill them in for srun
    # and for a single process (the srun launcher script exports MASTER_ADDR/PORT).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise RuntimeError(f"MASTER_PORT is not set for a {world}-process run: export MASTER_ADDR and "
                               "MASTER_PORT (the SLURM launcher script does), or start with torchrun/deepspeed")
        os.environ["MASTER_PORT"] = str(_free_port())
    if not dist.is_initialized():
        import deepspeed

        out = io.StringIO()
        try:  # its op builder prints "... built successfully" on every start: keep it if init fails
            with contextlib.redirect_stdout(out):
                deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                           auto_mpi_discovery=False, verbose=False)
        except BaseException:
            print(out.getvalue(), end="")
            raise
    return DistEnv(rank, local_rank, world, device)


def shutdown() -> None:
    """Destroy the process group before exit: avoids aborts at interpreter teardown (seen with ZeRO-3)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
