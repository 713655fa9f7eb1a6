"""Model FLOPs utilisation, one definition for the trainer and launch/bench_model.py:
images/s x training FLOPs per image (3 x the forward MACs x 2, from the model's own count) over
the device's peak in the run's precision: `train.peak_tflops` when set (e.g. the spec sheet's),
else the dense-matmul rate measured on the device at start."""
from __future__ import annotations

import time

import torch
from torch import nn

from models import count_gmacs


def train_flops_per_image(model: nn.Module, img_size: int) -> float:
    return count_gmacs(model, img_size) * 1e9 * 2 * 3


def measured_peak_tflops(device: torch.device, bf16: bool) -> float:
    """Best of several square matmuls in the run's precision: a rate the device can reach."""
    n, reps = (8192, 10) if device.type == "cuda" else (1024, 3)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = 0.0
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12)
    return best


def peak_tflops(configured: float | None, device: torch.device, bf16: bool) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it comes from) for the log line that names it."""
    if configured:
        return configured, f"train.peak_tflops={configured:g}"
    peak = measured_peak_tflops(device, bf16)
    return peak, f"measured {'bf16' if bf16 else 'fp32'} matmul peak {peak:.3g} TFLOP/s"


def mfu_pct(images_per_s: float, flops_per_image: float, peak_tflops_per_device: float, devices: int) -> float:
    return 100 * images_per_s * flops_per_image / (peak_tflops_per_device * 1e12 * devices)
