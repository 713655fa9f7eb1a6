"""Trainer benchmarks, run under a launcher with the process count to measure:

    torchrun --standalone --nproc_per_node 2 launch/bench_trainer.py overhead [--model cs_mixer_tiny --batch 64]
    torchrun --standalone --nproc_per_node 2 launch/bench_trainer.py memory   [--model cs_mixer_l --batch 2]

overhead: ms per optimizer step of our DeepSpeed step (engine forward/backward/step as the trainer
takes it, at the --stages given, default 0,1) against a plain PyTorch DDP + AdamW step of the same
model, batch, loss and precision, windows interleaved so drift hits both alike. Target: within 10 %.
memory: per rank, the bytes of training state (every live tensor storage after the backward of
the second step:
weights, gradients, optimizer moments, master copies, DeepSpeed's flat buffers) at ZeRO 0-3,
beside the ZeRO paper's model for mixed-precision Adam: (2 + 2 + 12) x params bytes at stage 0,
2P + 2P + 12P/N at 1, 2P + 14P/N at 2, 16P/N at 3 (N ranks). ZeRO-3's gradient reduce bucket
(a communication buffer of reduce_bucket_size elements, which the trainer caps at the parameter
count) is shown apart from the state. Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models import count_params, create_model, model_info
from trainer.build import build_engine, compile_enabled, grad_norm_on_demand, set_grad_norm
from trainer.config import CONFIG_DIR, load_config, plan_run
from trainer.distributed import init_distributed
from trainer.losses import SoftTargetCrossEntropy
from trainer.optim import param_groups

LOG_EVERY = load_config(CONFIG_DIR / "cs_mixer.yaml", []).train.log_every  # the recipe's; norm on those steps
PAPER_BYTES_PER_PARAM = {0: lambda n: 16.0, 1: lambda n: 4 + 12 / n, 2: lambda n: 2 + 14 / n, 3: lambda n: 16 / n}


def bench_config(model, stage: int, bf16: bool, batch: int, ds_json: str | None = None, compile_: str = "auto",
                 backend: str = "inductor"):
    """The engine exactly as the trainer builds it (trainer/build.py); bf16 as DeepSpeed's bf16 mode
    (bf16 weights, fp32 master copy in the optimizer): the mixed precision of the ZeRO paper's accounting."""
    return load_config(CONFIG_DIR / "cs_mixer.yaml", [f"deepspeed.config={ds_json or 'null'}", f"train.compile={compile_}",
        f"train.compile_backend={backend}",
        f"deepspeed.zero_stage={stage}", f"deepspeed.bf16={str(bf16).lower()}", "deepspeed.bf16_mode=weights",
        f"train.batch_size={batch}",
        "train.grad_accum=1", "train.global_batch=null", "optim.clip_grad=null", "data.backend=synthetic",
        "schedule.min_lr=0", f"model.name={model.model_name}", f"model.img_size={model.img_size}",
        f"model.num_classes={model.num_classes}"])


def ds_engine(model, stage: int, bf16: bool, batch: int, world: int, ds_json: str | None = None,
              compile_: str = "auto", backend: str = "inductor"):
    cfg = bench_config(model, stage, bf16, batch, ds_json, compile_, backend)
    return build_engine(plan_run(cfg, world, count_params(model)), model)


def batch_for(batch: int, size: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.nn.functional.one_hot(torch.randint(0, 1000, (batch,), generator=g), 1000).float().to(device)
    return x, y


def overhead(args, env) -> dict:
    size = args.img_size or model_info(args.model).img_size
    x, y = batch_for(args.batch, size, env.device, env.rank)
    loss_fn = SoftTargetCrossEntropy()
    torch.manual_seed(0)
    plain = create_model(args.model, img_size=size).to(env.device)
    ddp = DistributedDataParallel(plain)
    # like with like: the baseline is compiled where the engines are (train.compile, the trainer's rule)
    compiled = {"pytorch_ddp": compile_enabled(bench_config(plain, 0, False, args.batch, None, args.compile),
                                               env.device, 0)}
    if compiled["pytorch_ddp"]:
        ddp = torch.compile(ddp, backend=args.compile_backend)
    opt = torch.optim.AdamW(param_groups(plain, 0.05, 1e-4), lr=1e-4)  # what build_optimizer makes

    def plain_step():
        loss = loss_fn(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    steps = {"pytorch_ddp": plain_step}
    for stage in args.stages:
        torch.manual_seed(0)
        model = create_model(args.model, img_size=size).to(env.device)
        engine = ds_engine(model, stage, False, args.batch, env.world_size, args.deepspeed_config, args.compile,
                           args.compile_backend)
        compiled[f"deepspeed_zero{stage}"] = compile_enabled(
            bench_config(model, stage, False, args.batch, args.deepspeed_config, args.compile), env.device, stage)

        def ds_step(engine=engine, on_demand=grad_norm_on_demand(engine), count=itertools.count(1)):
            loss = loss_fn(engine(x), y)
            engine.backward(loss)
            if on_demand:  # as the trainer: the gradient norm only on the steps it logs
                set_grad_norm(engine, next(count) % LOG_EVERY == 0)
            engine.step()
        steps[f"deepspeed_zero{stage}"] = ds_step

    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)  # barrier alone: host time
    times = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        for _ in range(args.warmup):
            fn()
    for _ in range(args.windows):
        for name, fn in steps.items():
            sync()
            dist.barrier()
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync()
            dist.barrier()
            times[name].append(1000 * (time.perf_counter() - t) / args.steps)
    ms = {k: statistics.median(v) for k, v in times.items()}
    base = ms["pytorch_ddp"]
    return {"model": args.model, "batch_per_rank": args.batch, "img_size": size, "world_size": env.world_size,
            "precision": "fp32", "compiled": compiled, "ms_per_step": {k: round(v, 2) for k, v in ms.items()},
            "overhead_pct": {k: round(100 * (v / base - 1), 1) for k, v in ms.items() if k != "pytorch_ddp"}}


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage Python can reach (views of one flat buffer count once)."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # some tensor subclasses have no storage
            continue
    return sum(seen.values())


def memory(args, env) -> dict:
    size = args.img_size or model_info(args.model).img_size
    x, y = batch_for(args.batch, size, env.device, env.rank)
    loss_fn = SoftTargetCrossEntropy()
    n_params = count_params(create_model(args.model, img_size=size))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    rows = []
    for stage in args.stages:
        base = live_tensor_bytes() - x.nbytes - y.nbytes
        engine = ds_engine(create_model(args.model, img_size=size).to(env.device), stage, args.bf16, args.batch,
                           env.world_size, args.deepspeed_config)
        for _ in range(2):  # the first step creates the optimizer moments; measure in the second, after
            loss = loss_fn(engine(x.to(dtype)), y)  # backward, when gradients are held too
            engine.backward(loss)
            del loss
            held = live_tensor_bytes() - base - x.nbytes - y.nbytes
            engine.step()
        buckets = sum(b.buffer.nbytes for b in getattr(engine.optimizer, "ipg_buckets", {}).values()
                      if isinstance(getattr(b, "buffer", None), torch.Tensor))  # ZeRO-3's gradient reduce bucket
        per_rank = [None] * env.world_size
        dist.all_gather_object(per_rank, (held, buckets))
        paper = PAPER_BYTES_PER_PARAM[stage](env.world_size) * n_params
        state = max(h - b for h, b in per_rank)
        rows.append({"zero_stage": stage, "measured_mb_per_rank": [round(h / 2 ** 20) for h, _ in per_rank],
                     "reduce_bucket_mb": round(per_rank[0][1] / 2 ** 20), "state_mb": round(state / 2 ** 20),
                     "paper_mb": round(paper / 2 ** 20), "state_over_paper": round(state / paper, 2)})
        engine.destroy()
        del engine
        gc.collect()
    s0 = rows[0]["state_mb"] if rows and rows[0]["zero_stage"] == 0 else None
    for r in rows:
        r["state_vs_stage0"] = round(r["state_mb"] / s0, 2) if s0 else None
    return {"model": args.model, "params": n_params, "world_size": env.world_size,
            "precision": "bf16" if args.bf16 else "fp32", "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["overhead", "memory"])
    p.add_argument("--model")
    p.add_argument("--batch", type=int)
    p.add_argument("--img-size", type=int)
    p.add_argument("--stages", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--steps", type=int, default=10, help="steps per timing window (overhead)")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="memory: bf16 engine")
    p.add_argument("--deepspeed-config", help="a DeepSpeed JSON merged on top, as deepspeed.config does")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                   help="overhead: torch.compile every row alike (train.compile's rule: auto = on with CUDA, off at ZeRO-3)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend, every row")
    p.add_argument("--json", help="write the result here (rank 0)")
    args = p.parse_args()
    if args.what == "overhead":
        args.model, args.batch = args.model or "cs_mixer_tiny", args.batch or 64
        args.stages = args.stages or [0, 1]
    else:
        args.model, args.batch = args.model or "cs_mixer_l", args.batch or 2
        args.stages = args.stages or [0, 1, 2, 3]
    torch.set_num_threads(1)
    env = init_distributed()
    result = overhead(args, env) if args.what == "overhead" else memory(args, env)
    if env.is_main:
        if args.what == "overhead":
            print(f"{result['model']} batch {result['batch_per_rank']}/rank x {result['world_size']} ranks, "
                  f"{result['img_size']}px, fp32, median of {args.windows} windows x {args.steps} steps:")
            for k, v in result["ms_per_step"].items():
                print(f"  {k:18s} {v:9.2f} ms/step  {result['overhead_pct'].get(k, 0):+6.1f} %"
                      f"{'  (compiled)' if result['compiled'][k] else ''}")
        else:
            print(f"{result['model']} ({result['params'] / 1e6:.1f} M params), {result['world_size']} ranks, "
                  f"{result['precision']}: training state per rank (after backward, step 2)")
            print("  stage | all tensors MB/rank | of which reduce bucket | state MB | ZeRO paper MB | "
                  "state/paper | state vs stage 0")
            for r in result["rows"]:
                print(f"  {r['zero_stage']:5d} | {str(r['measured_mb_per_rank']):19s} | {r['reduce_bucket_mb']:22d} | "
                      f"{r['state_mb']:8d} | {r['paper_mb']:13d} | {r['state_over_paper']:11.2f} | {r['state_vs_stage0']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
