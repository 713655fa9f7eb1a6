"""Node health at job start, on every rank, in seconds: a matmul timing and an all-reduce of a known
tensor. A rank that sums wrong or is slower than train.preflight_factor x the lower median has its
node written to <run dir>/exclude_nodes (accumulated over requeues), and every rank exits
EXIT_BAD_NODE: slurm/launch.sh then excludes those nodes from the job (scontrol update
ExcNodeList) and requeues it, so the job does not land on the same bad node again."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_BAD_NODE = 87
EXCLUDE_FILE = "exclude_nodes"
MIN_GAP_S = {"cpu": 0.2, "cuda": 0.005}  # and slower by this much: a busy CPU's scheduling jitter is not a bad node


class BadNode(RuntimeError):
    """A node failed the pre-flight check (exit EXIT_BAD_NODE; launch.sh excludes it and requeues)."""


def node_name() -> str:
    """SLURM's name for this node (several emulated nodes can share one host), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def matmul_seconds(device: torch.device) -> float:
    n, reps = (4096, 10) if device.type == "cuda" else (512, 5)
    a = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ a  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    sync()
    seconds = time.perf_counter() - t0
    slow = os.environ.get("TRAIN_TEST_SLOW_PREFLIGHT", "")  # "RANK": that rank's matmul reads 1 s slower
    if slow and int(slow) == dist.get_rank():
        seconds += 1.0
    return seconds


def preflight(device: torch.device, world_size: int, rank: int, run_dir: Path, factor: float) -> tuple[list[str], str]:
    """(every rank's node name, a summary line to log); raises BadNode naming the nodes to exclude."""
    t0 = time.perf_counter()
    seconds = matmul_seconds(device)
    probe = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(probe)
    sums_ok = float(bool(torch.all(probe == world_size * (world_size + 1) / 2)))
    mine = torch.tensor([seconds, sums_ok], device=device, dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    nodes: list[str] = [""] * world_size
    dist.all_gather_object(nodes, node_name())
    times = [float(v[0]) for v in every]
    min_gap = MIN_GAP_S.get(device.type, 0.005)
    median = sorted(times)[(world_size - 1) // 2]
    bad = {r: ("a wrong all-reduce sum" if float(every[r][1]) != 1.0 else
               f"matmul {times[r] * 1000:.0f} ms, {times[r] / median:.1f}x the median {median * 1000:.0f} ms")
           for r in range(world_size) if float(every[r][1]) != 1.0 or (times[r] > factor * median and
                                                                      times[r] - median > min_gap)}
    if not bad:
        return nodes, (f"[preflight] {world_size} ranks on {len(set(nodes))} node(s): matmul {median * 1000:.0f} ms "
                       f"(median), all-reduce correct; {time.perf_counter() - t0:.1f} s")
    excluded = sorted({nodes[r] for r in bad})
    why = "; ".join(f"rank {r} on {nodes[r]}: {reason}" for r, reason in bad.items())
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / EXCLUDE_FILE
        before = {v.strip() for v in path.read_text().split(",")} - {""} if path.is_file() else set()
        path.write_text(",".join(sorted(before | set(excluded))) + "\n")
    raise BadNode(f"pre-flight: {why}; excluding node(s) {','.join(excluded)} (listed in {run_dir / EXCLUDE_FILE})")
