"""Model speed: forward+backward images/s per variant and batch size on the current device.

    python launch/bench_model.py --model cs_mixer_t --batch 32 [--model s2mlpv2_small ...] [--json out.json]

On a GPU it runs in bf16 autocast (add --compile for torch.compile) and times with CUDA events;
on a CPU in fp32 unless --bf16. MFU is the trainer's definition (trainer/mfu.py): training FLOPs
per image (3x the forward MACs x 2) over the device's dense-matmul rate, measured at the start in
the same precision. Also printed: the
activation memory autograd keeps per image for the backward pass (bytes of the tensors saved by
the forward, batch 2 minus batch 1, in the run's precision; eager mode), which with the ZeRO state
sets the GPU memory a batch needs. A benchmark, not a test: it prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from models import create_model, model_info
from trainer.mfu import measured_peak_tflops, mfu_pct, train_flops_per_image


def activation_mb_per_image(model: torch.nn.Module, size: int, bf16: bool, device: torch.device) -> float:
    """Bytes autograd saves for backward, per image: the slope between batch 1 and 2 (weights cancel out)."""
    def saved_bytes(batch: int) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(batch, 3, size, size, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(x)
        return sum(storages.values())
    return (saved_bytes(2) - saved_bytes(1)) / 2**20


def bench(name: str, batch: int, steps: int, warmup: int, bf16: bool, compile_: bool,
          device: torch.device, img_size: int | None, peak: float, grad_checkpointing: bool = False,
          compile_backend: str = "inductor") -> dict:
    size = img_size or model_info(name).img_size
    model = create_model(name, img_size=size).to(device)
    model.set_grad_checkpointing(grad_checkpointing)
    flops_per_image = train_flops_per_image(model, size)
    act_mb = activation_mb_per_image(model, size, bf16, device)
    if compile_:  # variants share forward()'s code: their graphs would add up to dynamo's recompile limit
        torch._dynamo.reset()
    step_model = torch.compile(model, backend=compile_backend) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(step_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - t0
    ips = batch * steps / seconds
    # forward+backward = 3x the forward MACs, 2 FLOPs per MAC
    return dict(model=name, img_size=size, batch=batch, bf16=bf16, compile=compile_, device=str(device),
                grad_checkpointing=grad_checkpointing,
                images_per_s=round(ips, 1), tflops=round(ips * flops_per_image / 1e12, 6),
                activation_mb_per_image=round(act_mb, 1), mfu_pct=round(mfu_pct(ips, flops_per_image, peak, 1), 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="variant name; repeat for several (default cs_mixer_t)")
    p.add_argument("--batch", type=int, action="append", help="batch size; repeat for several (default 32)")
    p.add_argument("--img-size", type=int, help="input side (default: the variant's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with a GPU, off on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward (model.grad_checkpointing)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    rows = []
    peak = measured_peak_tflops(device, bf16)
    print(f"{device}: measured {'bf16' if bf16 else 'fp32'} matmul peak {peak:.3f} TFLOP/s (the MFU denominator)")
    print(f"{'model':<16}{'size':>5}{'batch':>6}{'dtype':>6}{'compile':>8}{'img/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'act MB/img':>11}")
    for name in args.model or ["cs_mixer_t"]:
        for batch in args.batch or [32]:
            r = bench(name, batch, args.steps, args.warmup, bf16, args.compile, device, args.img_size, peak,
                      args.grad_checkpointing)
            rows.append(r)
            print(f"{name:<16}{r['img_size']:>5}{batch:>6}{'bf16' if bf16 else 'fp32':>6}"
                  f"{str(args.compile):>8}{r['images_per_s']:>10.1f}{r['tflops']:>9.3f}{r['mfu_pct']:>6.1f}%"
                  f"{r['activation_mb_per_image']:>11.1f}", flush=True)
    env = dict(torch=torch.__version__, python=platform.python_version(), host=platform.node(),
               device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"), matmul_peak_tflops=round(peak, 6))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
