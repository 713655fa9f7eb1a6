"""What the model sees, before a week of GPUs is spent on it.

    python launch/preview_augment.py --config configs/cs_mixer_l.yaml data.root=/data/imagenet
    python launch/preview_augment.py --config cs_mixer_l data.backend=folder --json --images 2000

For a config (any backend; overrides as in training) it writes two PNG grids of training samples
through the run's own input pipeline: after augmentation (RandAugment/AutoAugment, random erasing)
and, from the same draws, after Mixup/CutMix. It also runs the pipeline over --images samples and
reports its own draws: ops applied per image (mean, histogram), the fraction left untouched, each
op's share of all applied ops and its mean magnitude, the erased fraction and the Mixup/CutMix mix.
--json prints that JSON to stdout. Without data.root (or when it does not exist) the preview runs on
generated JPEGs and says so: the statistics do not depend on the pictures.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from data_pipeline import DataError, build_loaders
from data_pipeline.preview import draw_statistics, sample_grids
from models import model_info
from trainer.config import ConfigError, find_config, load_config, resolved


def generated_root(tmp: Path, backend: str, workers: int) -> tuple[Path, int]:
    """A small ImageNet-layout tree of 500x375 JPEGs (and .beton files for ffcv)."""
    from data_pipeline.prepare import verified_samples, write_ffcv, write_synthetic

    root, classes = tmp / "jpegs", 4
    write_synthetic(root, 256, classes, 500, 375, 0.25, seed=0, workers=workers)
    if backend == "ffcv":
        write_ffcv(verified_samples(root, workers, skip_bad=False), root, max_side=256, quality=90,
                   compress_fraction=0.5, workers=workers)
    return root, classes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a YAML file, or a name from configs/")
    p.add_argument("--images", type=int, default=2000, help="samples drawn for the statistics (default 2000)")
    p.add_argument("--grid", type=int, default=32, help="samples in each PNG grid (default 32)")
    p.add_argument("--out", default="previews", help="folder for the PNGs and the JSON (default ./previews)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON on stdout")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    try:
        cfg = load_config(find_config(args.config), args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backend = cfg.data.backend
    if backend == "synthetic":
        print("error: data.backend=synthetic has no augmentation to preview (it measures model speed)",
              file=sys.stderr)
        return 2
    workers = max(1, min(cfg.data.workers, os.cpu_count() or 1))
    tmp = tempfile.TemporaryDirectory(prefix="preview_augment_")
    extra = [f"data.workers={workers}", "train.batch_size=64", "train.global_batch=null", "train.grad_accum=1",
             "optim.lr=1e-3"]
    root = cfg.data.root
    if not root or not Path(root).exists():
        say(f"[preview] data.root={root} {'is not set' if not root else 'does not exist'}: previewing the "
            f"{backend} pipeline on 256 generated JPEGs (the draw statistics do not depend on the pictures)")
        with contextlib.redirect_stdout(sys.stderr):
            root, classes = generated_root(Path(tmp.name), backend, workers)
        extra += [f"data.root={root}", f"model.num_classes={classes}"]
    try:
        cfg = resolved(load_config(find_config(args.config), [*args.overrides, *extra]), world_size=1)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        train, _ = build_loaders(cfg, rank=0, world_size=1, device=device)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = model_info(cfg.model.name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(args.config).stem}_{backend}"
    augmented, mixed = sample_grids(train, args.grid, info.mean, info.std, out, stem)
    stats = draw_statistics(train, args.images)
    report = dict(config=args.config, backend=backend, auto_augment=cfg.aug.auto_augment,
                  interpolation=cfg.data.interpolation, data_root=str(root), img_size=cfg.model.img_size,
                  grids=dict(augment=str(augmented), mixed=str(mixed)), **stats)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"[preview] {backend}, {cfg.aug.auto_augment}: {stats['images']} samples drawn")
    print(f"  ops per image {stats['ops_per_image_mean']:.3f} (histogram {stats['ops_per_image_histogram']}), "
          f"untouched {stats['untouched_fraction']:.3f}, mean magnitude {stats['magnitude_mean']}")
    for op, share in stats["op_frequency"].items():
        print(f"  {op:<22}{share:>7.3f}   magnitude {stats['op_magnitude_mean'][op]:.2f}")
    for key in ("erasing", "mixing"):
        if key in stats:
            print(f"  {key}: {stats[key]}")
    print(f"  grids: {augmented}  {mixed}\n  JSON: {out / f'{stem}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
