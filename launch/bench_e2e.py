"""End to end: training images/s with each data backend against the synthetic backend, same model.

    python launch/bench_e2e.py                                   # cs_mixer_t, batch 16, generated JPEGs
    python launch/bench_e2e.py --model cs_mixer_tiny --img-size 64 --batch 64 --steps 60 --json e2e.json
    torchrun --standalone --nproc_per_node 8 launch/bench_e2e.py --root /data/imagenet \\
        --ffcv-root /data/imagenet-ffcv --model cs_mixer_l --batch 128 --steps 200 --workers 8

Every row is the trainer itself (`trainer.trainer.train`) for --steps optimizer steps with the variant's
recipe: the backend's loader with the recipe's augmentation (RandAugment, Mixup/CutMix, random
erasing), the DeepSpeed engine from the generated config (ZeRO-2, bf16), and the loop's own img/s
in steady state (the first log window, which holds start-up, is left out; evaluation and
checkpoints are not counted). The synthetic row is the model's speed with no input work; each
backend's share of it is how much of the model's speed the input pipeline keeps. The goal on a GPU
machine is >= 95 % for DALI. On a CPU machine decoding competes with the model for the same cores,
so shares there are a lower bound. A benchmark, not a test: it prints figures and asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from data_pipeline.folder import scan_split
from data_pipeline.prepare import verified_samples, write_ffcv, write_synthetic
from trainer.config import find_config, load_config

BACKENDS = ("synthetic", "folder", "ffcv", "dali")


def versions() -> dict[str, str]:
    """Installed versions (from the package metadata: ffcv's own __version__ says 0.0.3rc1 for 1.0.2)."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name, dists in (("deepspeed", ["deepspeed"]), ("ffcv", ["ffcv"]),
                        ("dali", ["nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"])):
        for dist_name in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                found[name] = metadata.version(dist_name)
                break
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cs_mixer_t", help="a variant; its recipe in configs/ is used")
    p.add_argument("--root", help="an ImageNet-layout JPEG tree (default: generate 2,000 JPEGs of 500x375)")
    p.add_argument("--ffcv-root", help="a folder with train.beton/val.beton (default: written from --root, "
                                       "max side 256)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset")
    p.add_argument("--batch", type=int, default=16, help="per-process batch")
    p.add_argument("--img-size", type=int, help="input side (default: the recipe's)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per backend")
    p.add_argument("--log-every", type=int, default=5, help="img/s window, in steps")
    p.add_argument("--workers", type=int, default=2, help="data.workers")
    p.add_argument("--out", default="runs/bench_e2e", help="where the rows' runs go (removed after each row)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="more config overrides for every row")
    args = p.parse_intermixed_args()
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or "synthetic" not in backends:
        p.error(f"--backends: {unknown or 'synthetic'} {'unknown' if unknown else 'is the baseline and must be in'}"
                f" (choose from {', '.join(BACKENDS)})")
    if args.steps < 2 * args.log_every:
        p.error(f"--steps {args.steps}: give at least 2 x --log-every ({2 * args.log_every}); the first window "
                "holds start-up and is not counted")
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1 and (not args.root or ("ffcv" in backends and not args.ffcv_root)):
        p.error("with several processes give --root (and --ffcv-root for ffcv): every rank must read the same files")
    work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))  # generated inputs, removed at the end
    root = Path(args.root) if args.root else work / "jpegs"
    if not args.root:
        write_synthetic(root, 2000, 10, 500, 375, 0.05, seed=0, workers=os.cpu_count() or 1)
    ffcv_root = Path(args.ffcv_root) if args.ffcv_root else work / "ffcv"
    if "ffcv" in backends and not args.ffcv_root:
        with contextlib.redirect_stdout(sys.stderr):
            write_ffcv(verified_samples(root, args.workers, skip_bad=False), ffcv_root, max_side=256, quality=90,
                       compress_fraction=0.5, workers=args.workers)
    classes = len(scan_split(root, "train")[1])

    import torch.distributed as dist

    from trainer.distributed import shutdown
    from trainer.trainer import train

    rows: list[dict] = []
    for backend in backends:
        overrides = [
            f"data.backend={backend}", f"data.root={ffcv_root if backend == 'ffcv' else root}",
            f"data.workers={args.workers}", f"train.batch_size={args.batch}", "train.global_batch=null",
            "train.grad_accum=1", f"train.max_steps={args.steps}", "train.epochs=1000",
            f"train.log_every={args.log_every}", f"data.synthetic_size={args.batch * world * args.steps}",
            f"model.num_classes={classes}", "checkpoint.every_steps=0", "checkpoint.keep_last=1",
            "tracking.enabled=false", f"train.output_dir={args.out}", f"train.run_name={backend}",
            *([f"model.img_size={args.img_size}"] if args.img_size else []), *args.overrides]
        cfg = load_config(find_config(args.model), overrides)
        result = train(cfg)
        rows.append(dict(backend=backend, images_per_s=round(result.images_per_sec, 1)))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(Path(args.out) / backend, ignore_errors=True)
    shutdown()
    shutil.rmtree(work, ignore_errors=True)
    baseline = rows[0]["images_per_s"]
    for r in rows:
        r["share_of_synthetic"] = round(r["images_per_s"] / baseline, 3) if baseline else None
    if rank:
        return
    env = dict(date=time.strftime("%Y-%m-%d"), host=platform.node(), cpus=os.cpu_count(),
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               world_size=world, **versions())
    setup = dict(model=cfg.model.name, img_size=cfg.model.img_size, batch_per_process=args.batch, steps=args.steps,
                 workers=args.workers, zero_stage=cfg.deepspeed.zero_stage, bf16=cfg.deepspeed.bf16,
                 auto_augment=cfg.aug.auto_augment, mixup=cfg.aug.mixup, cutmix=cfg.aug.cutmix, reprob=cfg.aug.reprob,
                 root=str(root), ffcv_root=str(ffcv_root) if "ffcv" in backends else None)
    print(f"\n{cfg.model.name} {cfg.model.img_size}px, batch {args.batch} x {world} processes, "
          f"{env['device']}, {args.steps} steps per row")
    print(f"{'backend':<12}{'img/s':>9}{'share of synthetic':>20}")
    for r in rows:
        print(f"{r['backend']:<12}{r['images_per_s']:>9.1f}{100 * (r['share_of_synthetic'] or 0):>19.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(env=env, setup=setup, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
