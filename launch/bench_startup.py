"""Start-up on an ImageNet-shaped tree: the file-list read, each rank's loader build, and the memory of the
folder backend's DataLoader workers over time.

    python launch/bench_startup.py --root /data/imagenet-shaped          # 1,000 classes x 1,281 + 50 small JPEGs
    python launch/bench_startup.py --root /tmp/t --train-per-class 100 --json   # a smaller tree

The tree (generated once under --root, reused after: every file the same 16x16 JPEG, with the file lists
`launch/prepare_data.py verify` writes) has ImageNet's shape, not its pixels: what is measured is the
per-file bookkeeping. Figures: `read_lines_s` (reading the train file list's lines, the floor),
`scan_split_s` (our parse of it into samples) and their ratio; `build_loaders_s` at 1 rank and at 2 ranks
started together (each rank reads the lists itself); `worker_pss_mb` of each of the 2 workers after the
first batch and after --seconds of reading (copy-on-read: worker memory that grows with the samples touched).
A benchmark, not a test: it prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_tree(root: Path, classes: int, train_per_class: int, val_per_class: int) -> None:
    """ROOT/{train,val}/<wnid-like>/<name>.JPEG and ROOT/{train,val}_filelist.txt; once (ROOT/.complete)."""
    marker = root / ".complete"
    shape = f"{classes} {train_per_class} {val_per_class}\n"
    if marker.is_file() and marker.read_text() == shape:
        return
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(buf, "JPEG", quality=80)
    jpeg = buf.getvalue()
    t0 = time.perf_counter()
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        lines = []
        for c in range(classes):
            wnid = f"n{c:08d}"
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * per_class + i + 1:08d}.JPEG"
                fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fd, jpeg)
                os.close(fd)
                lines.append(f"{split}/{wnid}/{name} {c}\n")
            if c % 100 == 99:
                print(f"  {split}: {c + 1}/{classes} classes ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        (root / f"{split}_filelist.txt").write_text("".join(lines))
    marker.write_text(shape)


def cfg_for(root: Path, workers: int, batch: int):
    from trainer.config import CONFIG_DIR, load_config, resolved

    classes = sum(1 for p in (root / "val").iterdir() if p.is_dir())
    cfg = load_config(CONFIG_DIR / "cs_mixer_t.yaml", [
        "data.backend=folder", f"data.root={root}", f"data.workers={workers}", f"train.batch_size={batch}",
        "train.global_batch=null", "train.grad_accum=1", "model.img_size=32", f"model.num_classes={classes}",
        "aug.auto_augment=none", "aug.mixup=0", "aug.cutmix=0", "aug.reprob=0", "optim.lr=1e-3"])
    return resolved(cfg, 1)


def child_build(root: Path, rank: int, world: int) -> dict:
    """One rank's build_loaders (the file lists exist: no collective needed), timed."""
    import torch

    from data_pipeline import build_loaders

    t0 = time.perf_counter()
    train, val = build_loaders(cfg_for(root, 0, 64), rank=rank, world_size=world, device=torch.device("cpu"))
    return {"rank": rank, "build_loaders_s": round(time.perf_counter() - t0, 2), "train_samples": train.num_samples}


def child_memory(root: Path, seconds: float) -> dict:
    """Read the train split with 2 workers for `seconds`; each worker's PSS after the first batch and at the end."""
    import psutil
    import torch

    from data_pipeline import build_loaders

    train, _ = build_loaders(cfg_for(root, 2, 64), rank=0, world_size=1, device=torch.device("cpu"))
    train.set_window(0, 0, None)
    batches, images = iter(train), 0

    def worker_pss() -> list[float]:
        kids = psutil.Process().children()
        return sorted(round(k.memory_full_info().pss / 2 ** 20, 1) for k in kids)

    images += next(batches)[0].shape[0]
    first = worker_pss()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        images += next(batches)[0].shape[0]
    return {"worker_pss_mb_first_batch": first, "worker_pss_mb_end": worker_pss(), "seconds": round(seconds),
            "images_read": images, "main_rss_mb": round(psutil.Process().memory_info().rss / 2 ** 20, 1)}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise SystemExit(f"bench_startup child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="where the tree is (generated there if missing)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--train-per-class", type=int, default=1281)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--seconds", type=float, default=45, help="how long the workers read for the memory figure")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_build(args.root, int(rest[0]), int(rest[1])) if kind == "build" else \
            child_memory(args.root, args.seconds)
        print(json.dumps(result))
        return 0
    make_tree(args.root, args.classes, args.train_per_class, args.val_per_class)
    from data_pipeline.folder import scan_split

    listed = args.root / "train_filelist.txt"
    t0 = time.perf_counter()
    with open(listed) as f:
        n_lines = len(f.read().splitlines())
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples, _ = scan_split(args.root, "train")
    scan_s = time.perf_counter() - t0
    assert len(samples) == n_lines
    one = run_child("--root", str(args.root), "--child", "build", "0", "1")
    procs = [subprocess.Popen([sys.executable, __file__, "--root", str(args.root), "--child", "build", str(r), "2"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    two = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
    memory = run_child("--root", str(args.root), "--seconds", str(args.seconds), "--child", "memory")
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "cpus": os.cpu_count(),
              "train_files": n_lines, "read_lines_s": round(read_s, 3), "scan_split_s": round(scan_s, 3),
              "scan_over_read": round(scan_s / read_s, 2), "build_loaders_s_1_rank": one["build_loaders_s"],
              "build_loaders_s_2_ranks": [r["build_loaders_s"] for r in two], **memory}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for k, v in report.items():
            print(f"{k:<28}{v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
