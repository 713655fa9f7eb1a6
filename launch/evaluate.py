"""Validate a checkpoint as timm's validate.py does: top-1/top-5, per-class accuracy, ReaL labels.

    python launch/evaluate.py runs/cs_mixer_l-1234 data.root=/data/imagenet      # a DeepSpeed run/checkpoint
    python launch/evaluate.py runs/x/checkpoints/step_00050000 --ema               # its EMA weights
    python launch/evaluate.py cs_mixer_l.safetensors --config cs_mixer_l data.root=/data/imagenet
    python launch/evaluate.py cs_mixer_l.safetensors --data-dir /data/imagenet-v2/matched-frequency
    python launch/evaluate.py m.safetensors --filelist val_subset.txt --data-dir /data/imagenet/val
    python launch/evaluate.py m.safetensors data.root=/data/imagenet --real-labels real.json --hflip-tta \\
        --img-size 256 --crop-pct 1.0 --json result.json
    torchrun --nproc_per_node 8 launch/evaluate.py ...                             # the images split over ranks
    python launch/evaluate.py m.safetensors --suite /data/benchmarks --json suite.json --results-csv suite.csv \
        --plots plots/                                                             # the robustness suite

--suite ROOT evaluates every benchmark found under ROOT by its own protocol (trainer/benchmarks.py: val/ with
ReaL, imagenetv2-*/, sketch/, imagenet-a/ and imagenet-r/ with the logits restricted to their 200 classes,
imagenet-c/ with mCE), mapping classes by name through the model's class names (saved in checkpoints and
exported files; --class-names FILE for files without them): a table, --json (one entry per benchmark: top1,
top5, ece, nll, images), --results-csv (timm's results columns, one row per benchmark), --plots DIR (a
reliability diagram per benchmark) and --log-to RUN_ID (metrics suite/<benchmark>/<metric> and the plots, to
MLflow).

Images: data.root's val/ split (any backend), or --data-dir (an ImageNet-layout root with a val/ folder, or
a split folder of <class>/ folders itself; classes in sorted order as in training), or --filelist (lines
'relative/path label', relative to --data-dir or to the list's folder); the last two read JPEGs with the
folder or DALI backend. A DeepSpeed checkpoint brings its run's config (data, resolution, crop); an
exported file takes it from --config (default: configs/<model>.yaml). `section.key=value` overrides
apply on top. --img-size and --crop-pct change the eval resolution and centre crop (resize to
img_size / crop_pct, as timm); the weights must fit the model at that resolution. --hflip-tta averages
the logits of each image and its mirror. --real-labels: ImageNet-ReaL's real.json (a list in
ILSVRC2012_val_<n>.JPEG order) or a JSON object {file name: [labels]}; images with no label are left out
of the ReaL figures, as in the ReaL paper. Each image is counted once, whatever the number of processes.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path


def samples_from(data_dir: Path | None, filelist: Path | None, split: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs and class names for --data-dir / --filelist."""
    from data_pipeline.folder import scan_split

    if filelist is not None:
        if not filelist.is_file():
            raise FileNotFoundError(f"--filelist {filelist} does not exist")
        base = data_dir or filelist.parent
        samples = []
        for n, line in enumerate(filelist.read_text().splitlines(), 1):
            if not line.strip():
                continue
            rel, _, label = line.strip().rpartition(" ")
            if not rel or not label.isdigit():
                raise ValueError(f"{filelist}:{n}: expected 'relative/path label', got {line!r}")
            path = base / rel
            if not path.is_file():
                raise FileNotFoundError(f"{filelist}:{n}: {path} does not exist")
            samples.append((str(path), int(label)))
        if not samples:
            raise ValueError(f"--filelist {filelist} lists no images")
        return samples, [str(i) for i in range(max(label for _, label in samples) + 1)]
    folder = data_dir / split if (data_dir / split).is_dir() else data_dir
    return scan_split(folder.parent, folder.name, use_filelist=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="run dir, checkpoints/ dir, step_N dir, or an exported .safetensors")
    p.add_argument("--config", help="config for an exported file (default: configs/<model>.yaml)")
    p.add_argument("--ema", action="store_true", help="evaluate a DeepSpeed checkpoint's EMA weights")
    p.add_argument("--data-dir", type=Path, help="an ImageNet-layout root (with --split) or a split folder")
    p.add_argument("--split", default="val", help="the split folder under --data-dir (default val)")
    p.add_argument("--filelist", type=Path, help="'relative/path label' per line")
    p.add_argument("--img-size", type=int, help="eval resolution (default: the model's / the run's)")
    p.add_argument("--crop-pct", type=float, help="centre crop fraction (default: the model's / the run's)")
    p.add_argument("--hflip-tta", action="store_true", help="average the logits of each image and its mirror")
    p.add_argument("--real-labels", type=Path, help="ImageNet-ReaL real.json, or {file name: [labels]}")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--json", type=Path, help="also write the result (with per-class accuracy) as JSON")
    p.add_argument("--suite", type=Path, help="a folder of benchmarks (val/, imagenetv2-*/, sketch/, imagenet-a/, "
                   "imagenet-r/, imagenet-c/): evaluate them all")
    p.add_argument("--class-names", type=Path, help="with --suite: the model's class names, one per line in output "
                   "order (for files saved without them)")
    p.add_argument("--results-csv", type=Path, help="with --suite: rows in timm's results columns, one per benchmark")
    p.add_argument("--plots", type=Path, help="with --suite: a reliability diagram PNG per benchmark in this folder")
    p.add_argument("--log-to", metavar="RUN_ID", help="with --suite: log suite/<benchmark>/<metric> and the plots "
                   "to this MLflow run (tracking.uri or $MLFLOW_TRACKING_URI)")
    p.add_argument("--fit-crop", action="store_true", help="evaluate crop_pct 0.875/0.9/0.95/1.0 on minival "
                   "(data.minival_per_class of data.root's train/) and write the best into an exported file's header")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)

    import torch
    import torch.distributed as dist

    from data_pipeline import DataError, build_loaders
    from models.exported import load_exported
    from trainer.benchmarks import real_label_sets
    from trainer.build import build_model
    from trainer.checkpoint import CheckpointError, consolidated_weights, find_checkpoint, state_mismatch
    from trainer.config import ConfigError, config_from_dict, find_config, load_config, resolved
    from trainer.distributed import init_distributed, shutdown

    # evaluation keeps the per-rank batch, whatever the world size the run trained with
    overrides = ["train.global_batch=null", "train.grad_accum=1", *args.overrides]
    overrides += [f"model.img_size={args.img_size}"] if args.img_size else []
    overrides += [f"data.crop_pct={args.crop_pct}"] if args.crop_pct else []
    crop_given = bool(args.crop_pct) or any(o.startswith("data.crop_pct=") for o in args.overrides) or args.fit_crop
    if args.suite and (args.data_dir or args.filelist or args.real_labels):
        print("error: --suite finds its images (and real.json) under its folder: not with --data-dir, --filelist "
              "or --real-labels", file=sys.stderr)
        return 2
    try:
        if args.checkpoint.suffix == ".safetensors":
            state, header = load_exported(args.checkpoint)
            class_names, fitted_crop = header.get("class_names"), header.get("eval_crop_pct")
            name, source = header["model"], f"{args.checkpoint} (step {header.get('step')}, {header.get('weights')} weights)"
            fitted = [f"data.crop_pct={fitted_crop}"] if fitted_crop and not crop_given else []
            cfg = load_config(find_config(args.config or name), [f"model.name={name}", *(
                f"model.{k}={v}" for k, v in header["model_args"].items()), *fitted, *overrides])
        else:
            tag_dir = find_checkpoint(args.checkpoint)
            state, meta = consolidated_weights(tag_dir, args.ema)
            class_names, fitted_crop = meta.get("class_names"), meta["state"].get("eval_crop_pct")
            name, source = meta["model"], f"{tag_dir} ({'EMA' if args.ema else 'model'} weights)"
            fitted = [f"data.crop_pct={fitted_crop}"] if fitted_crop and not crop_given else []
            cfg = config_from_dict(meta["config"], [*fitted, *overrides], source=f"{tag_dir}/meta.json")
        if fitted:
            print(f"[crop] crop_pct {fitted_crop}: fitted on minival at the end of training (--crop-pct to override)")
        samples, classes, benchmarks = None, None, None
        if args.suite:
            from trainer.benchmarks import find_benchmarks
            if args.class_names:
                class_names = [line.strip() for line in args.class_names.read_text().splitlines() if line.strip()]
            if not class_names:
                raise ValueError(f"{args.checkpoint} carries no class names (saved before they were kept), and the "
                                 "suite maps classes by name: give --class-names FILE (one per line, in output order: "
                                 "the training tree's class folders, sorted)")
            if len(class_names) != cfg.model.num_classes:
                raise ValueError(f"{len(class_names)} class names for a model of {cfg.model.num_classes} classes")
            benchmarks, notes = find_benchmarks(args.suite, class_names)
            for note in notes:
                print(f"[suite] {note}")
            samples, classes = [s for b in benchmarks for s in b.samples], class_names
        elif args.data_dir or args.filelist:
            if args.data_dir and not args.data_dir.is_dir():
                raise FileNotFoundError(f"--data-dir {args.data_dir} does not exist")
            samples, classes = samples_from(args.data_dir, args.filelist, args.split)
            top = max(label for _, label in samples)
            if top >= cfg.model.num_classes:
                raise DataError(f"{args.filelist or args.data_dir}: label {top} (of {len(classes)} classes) but the "
                                f"model has {cfg.model.num_classes} classes")
        if args.real_labels and samples is None:  # the same images, in the order the labels are matched in
            samples, classes = _val_split(cfg)
        real = real_label_sets(args.real_labels, samples) if args.real_labels else None
        env = init_distributed()
        cfg = resolved(cfg, env.world_size)
        model = build_model(cfg, drop_path=None)
        problems = state_mismatch(model.state_dict(), state)
        if problems:
            raise ConfigError(f"{source} does not fit {name} at model.img_size={cfg.model.img_size}: {problems}")
        model.load_state_dict(state)
        _, val_loader = build_loaders(cfg, env.rank, env.world_size, env.device, train=False, val_samples=samples)
        if classes is None:
            classes = _val_classes(cfg)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError, ValueError) as e:  # SuiteError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    bf16 = args.precision == "bf16" or (args.precision == "auto" and env.device.type == "cuda")
    model = model.to(env.device).eval()
    if benchmarks is not None:
        run_suite(args, cfg, model, benchmarks, env, bf16, name)
        shutdown()
        return 0
    if args.fit_crop:
        try:
            fit_crop(args, cfg, model, env, bf16)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        shutdown()
        return 0
    top5s, labels = [], []
    with torch.no_grad(), torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
        for images, target in val_loader:
            logits = model(images.float()).float()
            if args.hflip_tta:
                logits = (logits + model(images.float().flip(3)).float()) / 2
            top5s.append(logits.topk(min(5, logits.shape[1]), dim=1).indices)
            labels.append(target)
    preds, labels = torch.cat(top5s), torch.cat(labels)
    if dist.is_initialized():  # each rank holds a contiguous block of the images, in order (val_shard)
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, (preds.cpu(), labels.cpu()))
        preds, labels = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
    if env.is_main:
        preds, labels = preds.cpu(), labels.cpu()
        hits = preds == labels[:, None]
        result = {"model": name, "checkpoint": source, "backend": cfg.data.backend,
                  "images": str(args.filelist or args.data_dir or cfg.data.root), "count": len(labels),
                  "img_size": cfg.model.img_size, "crop_pct": cfg.data.crop_pct, "hflip_tta": args.hflip_tta,
                  "precision": "bf16" if bf16 else "fp32",
                  "top1": round(100 * hits[:, 0].float().mean().item(), 3),
                  "top5": round(100 * hits.any(dim=1).float().mean().item(), 3)}
        per_class = {}
        for c, cname in enumerate(classes):
            mask = labels == c
            if mask.any():
                per_class[cname] = round(100 * hits[mask, 0].float().mean().item(), 3)
        result["per_class_top1"] = per_class
        line = (f"{name} {source} on {cfg.data.backend}:{result['images']} ({len(labels)} images) @ {cfg.model.img_size}px, "
                f"{result['precision']}{', hflip TTA' if args.hflip_tta else ''}: top1 {result['top1']:.2f} "
                f"top5 {result['top5']:.2f}")
        if real is not None:
            keep = [i for i, r in enumerate(real) if r]
            real_top1 = sum(int(preds[i, 0]) in real[i] for i in keep) / len(keep)
            real_top5 = sum(any(int(p) in real[i] for p in preds[i]) for i in keep) / len(keep)
            result.update(real_top1=round(100 * real_top1, 3), real_top5=round(100 * real_top5, 3), real_count=len(keep))
            line += f"; ReaL top1 {100 * real_top1:.2f} top5 {100 * real_top5:.2f} ({len(keep)} labelled)"
        worst = sorted(per_class.items(), key=lambda kv: kv[1])[:3]
        print(line)
        print("lowest per-class top1: " + ", ".join(f"{c} {a:.1f}" for c, a in worst))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    shutdown()
    return 0


def fit_crop(args, cfg, model, env, bf16: bool) -> None:
    """minival top-1 at each candidate crop; the best (ties: the one nearest the configured crop) printed and, for an
    exported file, written into its header (the file is rewritten whole, atomically)."""
    import torch

    from data_pipeline import CROP_CANDIDATES, minival_loader
    from trainer.evaluate import evaluate

    scores = {}
    for crop in CROP_CANDIDATES:
        loader = minival_loader(cfg, env.rank, env.world_size, env.device, crop)
        with torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            scores[crop] = evaluate(model, loader, env.device, torch.float32)[0]
    from models import model_info

    usual = cfg.data.crop_pct or model_info(cfg.model.name).crop_pct  # ties: the crop it would use anyway
    best = max(CROP_CANDIDATES, key=lambda c: (scores[c], -abs(c - usual)))
    if not env.is_main:
        return
    print("minival top1 by crop_pct: " + ", ".join(f"{c} {v:.2f}" for c, v in scores.items())
          + f"; recommended crop_pct {best}")
    if args.checkpoint.suffix == ".safetensors":
        from models.exported import load_exported, save_exported
        state, header = load_exported(args.checkpoint)
        extra = {k: v for k, v in header.items() if k not in ("format", "model", "model_args")}
        tmp = args.checkpoint.with_name(f".{args.checkpoint.name}.tmp")
        save_exported(tmp, header["model"], state, header["model_args"], **{**extra, "eval_crop_pct": best})
        tmp.replace(args.checkpoint)
        print(f"{args.checkpoint}: eval_crop_pct {best} written into its header; evaluate.py uses it unless told "
              "otherwise")
    if args.json:
        args.json.write_text(json.dumps({"minival_top1_by_crop_pct": scores, "eval_crop_pct": best}, indent=1))


def run_suite(args, cfg, model, benchmarks, env, bf16: bool, name: str) -> None:
    """One pass over every benchmark's images; per-benchmark sums all-reduced; the table, JSON, CSV, plots and
    MLflow metrics from rank 0."""
    import time

    import torch

    from data_pipeline import build_loaders
    from models import model_info
    from trainer.benchmarks import evaluate_suite, reliability_plot

    crop_pct = cfg.data.crop_pct or model_info(name).crop_pct
    samples = [s for b in benchmarks for s in b.samples]
    _, loader = build_loaders(cfg, env.rank, env.world_size, env.device, train=False, val_samples=samples)
    start = time.perf_counter()
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    table = evaluate_suite(model, loader, benchmarks, cfg.model.num_classes, env, args.hflip_tta, autocast)
    seconds = time.perf_counter() - start
    if table is None:
        return
    params = sum(p.numel() for p in model.parameters())
    print(f"{name} ({params / 1e6:.2f} M params) @ {cfg.model.img_size}px, crop_pct {crop_pct}, "
          f"{'bf16' if bf16 else 'fp32'}{', hflip TTA' if args.hflip_tta else ''}: {len(samples)} images in "
          f"{len(table)} benchmarks, {seconds:.1f} s")
    print(f"{'benchmark':<32} {'images':>7} {'top1':>7} {'top5':>7} {'ECE %':>6} {'NLL':>7}  notes")
    for key, r in table.items():
        notes = []
        if "real_top1" in r:
            notes.append(f"ReaL top1 {r['real_top1']:.2f} top5 {r['real_top5']:.2f}")
        if key in ("imagenet-a", "imagenet-r"):
            notes.append(f"logits restricted to its {len(next(b for b in benchmarks if b.key == key).subset)} classes")
        if key == "imagenet-c":
            notes.append(f"mCE {r['mce']:.2f}" if r["mce"] is not None else
                         f"mCE over the {len(r['corruptions'])} corruptions present {r['mce_partial']}")
        print(f"{key:<32} {r['images']:>7} {r['top1']:>7.2f} {r['top5']:>7.2f} {r['ece']:>6.2f} {r['nll']:>7.4f}  "
              + "; ".join(notes))
    if args.json:
        args.json.write_text(json.dumps({"model": name, "img_size": cfg.model.img_size, "crop_pct": crop_pct,
                                         "seconds": round(seconds, 2),
                                         **{k: {m: v for m, v in r.items() if m != "bins"} for k, r in table.items()}},
                                        indent=1))
    if args.results_csv:
        import csv
        with open(args.results_csv, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["benchmark", "model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size",
                          "crop_pct", "interpolation"])
            for key, r in table.items():
                out.writerow([key, name, f"{r['top1']:.3f}", f"{100 - r['top1']:.3f}", f"{r['top5']:.3f}",
                              f"{100 - r['top5']:.3f}", f"{params / 1e6:.2f}", cfg.model.img_size,
                              f"{crop_pct}", cfg.data.interpolation])
    plots = []
    if args.plots:
        for key, r in table.items():
            path = args.plots / f"reliability-{key.replace('/', '-')}.png"
            reliability_plot(r, key, path)
            plots.append(path)
        print(f"reliability diagrams: {args.plots}")
    if args.log_to:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=cfg.tracking.uri or None)
        for key, r in table.items():
            for metric in ("top1", "top5", "ece", "nll", "real_top1", "mce"):
                if r.get(metric) is not None:
                    client.log_metric(args.log_to, f"suite/{key}/{metric}", float(r[metric]))
        for path in plots:
            client.log_artifact(args.log_to, str(path), artifact_path="suite")
        print(f"logged to MLflow run {args.log_to}")


def _val_split(cfg) -> tuple[list[tuple[str, int]], list[str]]:
    from data_pipeline.folder import scan_split
    from trainer.config import ConfigError
    if not cfg.data.root:
        raise ConfigError("data.root is not set (or give --data-dir / --filelist)")
    return scan_split(cfg.data.root, "val")


def _val_classes(cfg) -> list[str]:
    if cfg.data.backend in ("folder", "dali") and cfg.data.root:
        return _val_split(cfg)[1]
    return [str(i) for i in range(cfg.model.num_classes)]


if __name__ == "__main__":
    sys.exit(main())
