"""Input-pipeline speed: every backend over the same JPEG set, side by side.

    python launch/bench_data.py                      # generates 2,000 JPEGs of 500x375 in a temp dir
    python launch/bench_data.py --root /data/imagenet-subset --workers 8 --json

Work per image, for every row: decode, RandomResizedCrop to 224 (antialiased bicubic, Pillow's
algorithm on every row), flip, normalise; with --auto-augment also that policy (the shared device stage, as in
training). No Mixup or erasing: the same device stage for all backends. Rows: our
loaders (folder, ffcv at max side 256 and at FFCV's ImageNet default 500, dali) and the bare
library loops doing the same work (FFCV Loader; DALI pipeline + iterator + device stage), with images/s and the
ratio to folder. Each row is timed over its second pass, after a warm-up pass (FFCV compiles its
pipeline with numba on the first). A benchmark, not a test: it prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline import build_loaders
from data_pipeline.folder import scan_split
from data_pipeline.prepare import verified_samples, write_ffcv, write_synthetic
from trainer.config import CONFIG_DIR, load_config, resolved

MEAN, STD = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255


def timed_pass(make_iter) -> tuple[float, int]:
    """Images per second over one full pass (the pass before it is the warm-up)."""
    for _ in make_iter():
        pass
    n, t0 = 0, time.perf_counter()
    for images, _ in make_iter():
        n += images.shape[0]
    return n / (time.perf_counter() - t0), n


def our_loader(root: Path, backend: str, batch: int, workers: int, size: int, classes: int,
               auto_augment: str = "none", device: torch.device = torch.device("cpu")):
    cfg = load_config(CONFIG_DIR / "cs_mixer_t.yaml", [
        f"data.backend={backend}", f"data.root={root}", f"data.workers={workers}", f"train.batch_size={batch}",
        "train.global_batch=null", "train.grad_accum=1", f"model.img_size={size}", f"model.num_classes={classes}",
        f"aug.auto_augment={auto_augment}", "aug.mixup=0", "aug.cutmix=0", "aug.reprob=0", "optim.lr=1e-3"])
    train, _ = build_loaders(resolved(cfg, 1), rank=0, world_size=1, device=device)
    return lambda: iter(train)


def bare_ffcv(beton: Path, batch: int, workers: int, size: int):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption

    from data_pipeline.ffcv_resize import pillow_resize_decoders

    rrc_decoder, _ = pillow_resize_decoders()  # the resize our loader uses (FFCV's own: INTER_AREA)
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    loader = Loader(str(beton), batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, drop_last=True,
                    os_cache=True, pipelines={
                        "image": [rrc_decoder((size, size)), RandomHorizontalFlip(),
                                  NormalizeImage(MEAN, STD, np.float32), ToTensor(), ToTorchImage()],
                        "label": [IntDecoder(), ToTensor(), Squeeze()]})
    return lambda: iter(loader)


def bare_dali(root: Path, batch: int, workers: int, size: int, auto_augment: str = "none",
              device: torch.device = torch.device("cpu")):
    """DALI's pipeline and iterator with the same work as our dali row: RandomResizedCrop, antialiased
    bicubic resize and flip to uint8 in DALI, then the shared device stage (auto-augment, normalise)
    called directly: no Loader, no sharded file lists, no positioning."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from data_pipeline.augment import DeviceAugment

    gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch, num_threads=workers, device_id=device.index or 0 if gpu else None, seed=0)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=str(root / "train"), random_shuffle=True, name="reader")
        images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW",
                                          mirror=fn.random.coin_flip())
        return images, labels

    it = DALIGenericIterator(pipe(), ["images", "labels"], reader_name="reader",
                             last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
    stage = DeviceAugment(auto_augment=auto_augment, mean=MEAN / 255, std=STD / 255, num_classes=1000, reprob=0,
                          mixup=0, cutmix=0, smoothing=0, device=device)

    def one_pass():
        for out in it:
            yield stage(out[0]["images"], out[0]["labels"].view(-1).long())
    return one_pass


VIEW_OPS = {"view", "_unsafe_view", "reshape", "expand", "slice", "select", "unsqueeze", "squeeze", "permute",
            "as_strided", "t", "transpose", "unbind", "split", "alias", "detach", "lift_fresh", "_reshape_alias",
            "unfold", "diagonal", "narrow", "view_as"}  # metadata only: no kernel


def stage_figures(batch: int = 128, size: int = 224, batches: int = 5, device: str = "meta") -> dict:
    """The shared augmentation stage with the recipe's augmentation (RandAugment m9 mstd0.5 inc1, erasing 0.25,
    Mixup 0.8 / CutMix 1.0, smoothing 0.1), per batch: the device ops it dispatches (kernels: view and
    metadata ops left out) and its host-to-device copies, counted on the meta device (nothing computed, nothing
    synchronised), and its host (dispatch) time on tiny images."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from data_pipeline.augment import DeviceAugment

    dev = torch.device(device)

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops, self.h2d = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            tensors = [t for t in (*args, *kwargs.values(), *(out if isinstance(out, (tuple, list)) else [out]))
                       if isinstance(t, torch.Tensor)]
            on_device = any(t.device == dev for t in tensors)
            if on_device and func.__name__.split(".")[0] not in VIEW_OPS:
                self.ops += 1
            if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" and \
                    torch.device(kwargs.get("device") or "cpu") == dev:
                self.h2d += 1
            elif func is torch.ops.aten.copy_.default and args[0].device == dev and args[1].device.type == "cpu":
                self.h2d += 1
            return out

    stage = DeviceAugment(auto_augment="rand-m9-mstd0.5-inc1", mean=MEAN / 255, std=STD / 255, num_classes=1000,
                          device=dev)
    images = torch.zeros(batch, 3, size, size, dtype=torch.uint8, device=dev)
    labels = torch.zeros(batch, dtype=torch.long, device=dev)
    stage(images, labels, seed=0)  # warm-up: constants moved to the device once
    with Count() as count:
        for i in range(batches):
            stage(images, labels, seed=1 + i)
    # host time: the same batch of tiny (16 px) images on the CPU, where the ops cost next to nothing (the meta
    # device's own bookkeeping is slower than a real dispatch)
    tiny = DeviceAugment(auto_augment="rand-m9-mstd0.5-inc1", mean=MEAN / 255, std=STD / 255, num_classes=1000)
    small, cpu_labels = torch.zeros(batch, 3, 16, 16, dtype=torch.uint8), torch.zeros(batch, dtype=torch.long)
    tiny(small, cpu_labels, seed=0)
    t0 = time.perf_counter()
    for i in range(4 * batches):
        tiny(small, cpu_labels, seed=100 + i)
    host_ms = 1000 * (time.perf_counter() - t0) / (4 * batches)
    return {"stage_ops_per_batch": round(count.ops / batches, 1), "stage_h2d_copies_per_batch": count.h2d / batches,
            "stage_host_ms_per_batch": round(host_ms, 2), "batch": batch, "img_size": size, "device": device,
            "augmentation": "rand-m9-mstd0.5-inc1, reprob 0.25 pixel, mixup 0.8, cutmix 1.0, smoothing 0.1"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="an ImageNet-layout tree (default: generate 2,000 JPEGs of 500x375)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--backends", default="folder,ffcv,dali", help="comma-separated subset")
    p.add_argument("--auto-augment", default="none", help="e.g. rand-m9-mstd0.5-inc1: our loaders apply it")
    p.add_argument("--images", type=int, default=2000, help="how many JPEGs to generate (without --root)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the loaders' device work runs: cuda = DALI's mixed (nvJPEG) decode and the "
                        "augmentation stage on the GPU")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--stage", action="store_true",
                   help="only the augmentation stage's own figures at batch 128, 224 px (ops, host-to-device copies "
                        "and host time per batch, on the meta device): no loaders")
    args = p.parse_args()
    if args.stage:
        figures = stage_figures()
        print(json.dumps(figures, indent=1) if args.json else "\n".join(f"{k:<30}{v}" for k, v in figures.items()))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    root = Path(args.root) if args.root else Path(tmp.name) / "jpegs"
    if not args.root:
        write_synthetic(root, args.images, 10, 500, 375, 0.05, seed=0, workers=os.cpu_count() or 1)
    backends = args.backends.split(",")
    rows: list[dict] = []

    def run(name: str, make_iter, library_loop: bool = False) -> None:
        ips, n = timed_pass(make_iter)
        rows.append(dict(name=name, images_per_s=round(ips, 1), images=n, bare_library_loop=library_loop))
        if not args.json:
            print(f"  {name:<34}{ips:>9.0f} img/s", flush=True)

    if not args.json:
        print(f"{root}: decode + RandomResizedCrop {args.img_size} + flip + normalise, batch {args.batch}, "
              f"{args.workers} workers")
    b, w, s, aa = args.batch, args.workers, args.img_size, args.auto_augment
    classes = len(scan_split(root, "train")[1])
    if "folder" in backends:
        run("folder (Pillow)", our_loader(root, "folder", b, w, s, classes, aa, device))
    if "ffcv" in backends:
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the table / JSON
            samples = verified_samples(root, w, skip_bad=False)
            for side in (256, 500):
                write_ffcv(samples, Path(tmp.name) / f"ffcv{side}", max_side=side, quality=90,
                           compress_fraction=0.5, workers=w)
        for side in (256, 500):
            out = Path(tmp.name) / f"ffcv{side}"
            run(f"ffcv, max side {side}", our_loader(out, "ffcv", b, w, s, classes, aa, device))
            run(f"  bare FFCV Loader, max side {side}", bare_ffcv(out / "train.beton", b, w, s), True)
    if "dali" in backends:
        run("dali (GPU decode)" if device.type == "cuda" else "dali (CPU mode)",
            our_loader(root, "dali", b, w, s, classes, aa, device))
        run("  bare DALI pipeline + device stage", bare_dali(root, b, w, s, aa, device), True)
    folder = next((r["images_per_s"] for r in rows if r["name"].startswith("folder")), None)
    for r in rows:
        r["ratio_to_folder"] = round(r["images_per_s"] / folder, 2) if folder else None
    env = dict(host=platform.node(), cpus=os.cpu_count(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
               root=str(root), workers=w, batch=b, img_size=s, device=args.device)
    if args.json:
        print(json.dumps(dict(env=env, rows=rows), indent=1))
    else:
        print(f"\n{'row':<36}{'img/s':>9}{'x folder':>10}")
        for r in rows:
            ratio = f"{r['ratio_to_folder']:.2f}" if r["ratio_to_folder"] else "–"
            print(f"{r['name']:<36}{r['images_per_s']:>9.0f}{ratio:>10}")


if __name__ == "__main__":
    main()
