"""Top-1 / top-5 of a checkpoint on a val set, with any data backend:

    python launch/evaluate.py runs/cs_mixer_l-1234 data.root=/data/imagenet      # a DeepSpeed run/checkpoint
    python launch/evaluate.py runs/x/checkpoints/step_00050000 --ema               # its EMA weights
    python launch/evaluate.py cs_mixer_l.safetensors --config cs_mixer_l data.root=/data/imagenet
    torchrun --nproc_per_node 8 launch/evaluate.py ...                             # the val set split over ranks

A DeepSpeed checkpoint brings its run's config (data, resolution, crop); an exported file takes
it from --config (default: configs/<model>.yaml). `section.key=value` overrides apply on top.
Each val image is counted once, whatever the number of processes.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="run dir, checkpoints/ dir, step_N dir, or an exported .safetensors")
    p.add_argument("--config", help="config for an exported file (default: configs/<model>.yaml)")
    p.add_argument("--ema", action="store_true", help="evaluate a DeepSpeed checkpoint's EMA weights")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)

    import torch

    from data_pipeline import DataError, build_loaders
    from models.exported import load_exported
    from trainer.build import build_model
    from trainer.checkpoint import CheckpointError, consolidated_weights, find_checkpoint
    from trainer.config import ConfigError, config_from_dict, find_config, load_config, resolved
    from trainer.distributed import init_distributed, shutdown
    from trainer.evaluate import evaluate

    # evaluation keeps the per-rank batch, whatever the world size the run trained with
    overrides = ["train.global_batch=null", "train.grad_accum=1", *args.overrides]
    try:
        if args.checkpoint.suffix == ".safetensors":
            state, header = load_exported(args.checkpoint)
            name, source = header["model"], f"{args.checkpoint} (step {header.get('step')}, {header.get('weights')} weights)"
            cfg = load_config(find_config(args.config or name), [f"model.name={name}", *(
                f"model.{k}={v}" for k, v in header["model_args"].items()), *overrides])
        else:
            tag_dir = find_checkpoint(args.checkpoint)
            state, meta = consolidated_weights(tag_dir, args.ema)
            name, source = meta["model"], f"{tag_dir} ({'EMA' if args.ema else 'model'} weights)"
            cfg = config_from_dict(meta["config"], overrides, source=f"{tag_dir}/meta.json")
        env = init_distributed()
        cfg = resolved(cfg, env.world_size)
        model = build_model(cfg, drop_path=None)
        model.load_state_dict(state)
        _, val_loader = build_loaders(cfg, env.rank, env.world_size, env.device, train=False)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bf16 = args.precision == "bf16" or (args.precision == "auto" and env.device.type == "cuda")
    model = model.to(env.device).eval()
    with torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
        top1, top5 = evaluate(model, val_loader, env.device, torch.float32)
    if env.is_main:
        result = {"model": name, "checkpoint": source, "backend": cfg.data.backend, "root": cfg.data.root,
                  "img_size": cfg.model.img_size, "precision": "bf16" if bf16 else "fp32",
                  "top1": round(top1, 3), "top5": round(top5, 3)}
        print(f"{name} {source} on {cfg.data.backend}:{cfg.data.root} @ {cfg.model.img_size}px, "
              f"{result['precision']}: top1 {top1:.2f} top5 {top5:.2f}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
