"""The robustness suite papers report beside ImageNet top-1, found under one root and scored by each benchmark's
own protocol, with classes mapped by name (the model's class names, the training tree's wnids):

    val/                 ImageNet layout (wnid folders); ReaL with real.json beside it (ROOT/real.json or val/..)
    imagenetv2-*/        ImageNet-V2 (any variant): folders 0..999, the class index by value (not string order)
    sketch/, imagenet-sketch/  wnid folders, all 1,000 classes
    imagenet-a/, imagenet-r/   200-class subsets: top-1 with the logits restricted to the classes present
    imagenet-c/          <corruption>/<severity>/<wnid>/ (a category level above, noise/blur/..., is allowed):
                         error per corruption (mean over severities) and mCE against AlexNet's errors

Every image of every benchmark goes through one loader pass; each rank sums its images' statistics per benchmark
(hits, NLL, calibration bins), so under torchrun each image is counted once and nothing per image is gathered.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

ECE_BINS = 15
# ImageNet-C: AlexNet's top-1 error per corruption, averaged over severities 1-5 (Hendrycks & Dietterich, 2019);
# a model's CE is its mean error over the severities divided by these, mCE the mean CE over the 15.
ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
LAYOUTS = ("val/ (with real.json beside it for ReaL), imagenetv2-*/, sketch/ or imagenet-sketch/, imagenet-a/, "
           "imagenet-r/, imagenet-c/")


class SuiteError(ValueError):
    """A folder that matches no benchmark layout, or classes the model does not know."""


@dataclass
class Benchmark:
    key: str                               # as in --json: val, imagenetv2-matched-frequency, imagenet-c/fog/3, ...
    samples: list[tuple[str, int]]         # (path, the model's output index)
    subset: list[int] | None = None        # output indices the logits are restricted to (A, R)
    real: Path | None = None               # ReaL labels (val)
    corruption: str | None = None
    severity: int | None = None


def _class_folders(folder: Path) -> list[tuple[str, int]]:
    """(path, folder index) pairs and the folder names of one class-per-folder tree, as the loaders scan it."""
    from data_pipeline.folder import scan_split

    samples, classes = scan_split(folder.parent, folder.name, use_filelist=False)
    return [(p, label) for p, label in samples], classes


def _by_name(folder: Path, class_names: list[str], key: str) -> tuple[list[tuple[str, int]], list[str]]:
    samples, folders = _class_folders(folder)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise SuiteError(f"{folder}: class folder(s) {', '.join(unknown[:3])} are not among the model's "
                         f"{len(class_names)} classes (e.g. {class_names[0]}); {key} expects the training tree's names")
    to_model = [index[f] for f in folders]
    return [(p, to_model[label]) for p, label in samples], folders


def _v2(folder: Path, class_names: list[str]) -> list[tuple[str, int]]:
    samples, folders = _class_folders(folder)
    bad = [f for f in folders if not f.isdigit() or int(f) >= len(class_names)]
    if bad:
        raise SuiteError(f"{folder}: ImageNet-V2 class folders are 0..{len(class_names) - 1} (the class index), "
                         f"found {', '.join(bad[:3])}")
    return [(p, int(folders[label])) for p, label in samples]  # by value: '10' is class 10, not the 3rd folder


def _corruptions(folder: Path) -> list[tuple[str, int, Path]]:
    """(corruption, severity, folder) under imagenet-c/, with or without a category level (noise/, blur/, ...)."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_dir() and re.fullmatch(r"[1-5]", p.name)):
        found.append((path.parent.name, int(path.name), path))
    if not found:
        raise SuiteError(f"{folder}: expected <corruption>/<severity 1-5>/<wnid>/ folders (ImageNet-C's layout)")
    return found


def find_benchmarks(root: str | Path, class_names: list[str]) -> tuple[list[Benchmark], list[str]]:
    """The benchmarks under `root` in a fixed order, and the notes on folders left out (train/)."""
    root = Path(root)
    if not root.is_dir():
        raise SuiteError(f"--suite {root} is not a folder")
    benchmarks, notes = [], []
    order = ("val", "imagenetv2", "sketch", "imagenet-sketch", "imagenet-a", "imagenet-r", "imagenet-c")
    rank = lambda p: (next((i for i, o in enumerate(order) if p.name.startswith(o)), len(order)), p.name)
    for sub in sorted((p for p in root.iterdir() if p.is_dir()), key=rank):  # val first, as papers' tables
        name = sub.name
        if name == "val":
            samples, _ = _by_name(sub, class_names, "val/")
            real = next((p for p in (root / "real.json", sub / "real.json") if p.is_file()), None)
            benchmarks.append(Benchmark("val", samples, real=real))
        elif name.startswith("imagenetv2"):
            benchmarks.append(Benchmark(name, _v2(sub, class_names)))
        elif name in ("sketch", "imagenet-sketch"):
            benchmarks.append(Benchmark(name, _by_name(sub, class_names, name)[0]))
        elif name in ("imagenet-a", "imagenet-r"):
            samples, folders = _by_name(sub, class_names, name)
            benchmarks.append(Benchmark(name, samples, subset=sorted({i for _, i in samples})))
        elif name == "imagenet-c":
            for corruption, severity, folder in _corruptions(sub):
                samples, _ = _by_name(folder, class_names, "imagenet-c")
                benchmarks.append(Benchmark(f"imagenet-c/{corruption}/{severity}", samples, corruption=corruption,
                                            severity=severity))
        elif name == "train":
            notes.append(f"{sub}: training images, not a benchmark: left out")
        else:
            raise SuiteError(f"{sub} matches no benchmark layout; the suite's folders are named as the public "
                             f"archives extract: {LAYOUTS}")
    if not benchmarks:
        raise SuiteError(f"--suite {root} holds none of the benchmark folders: {LAYOUTS}")
    empty = [b.key for b in benchmarks if not b.samples]
    if empty:
        raise SuiteError(f"--suite {root}: no images in {', '.join(empty)}")
    return benchmarks, notes


class SuiteMeter:
    """Per-benchmark sums over the images a rank sees: images, top-1 and top-5 hits, NLL, and per calibration bin
    (15 equal-width bins of the top-1 confidence) the images, confidence and hits. One (B, 5 + 3*15) tensor:
    one all_reduce makes it global."""

    def __init__(self, benchmarks: list[Benchmark], num_classes: int, device: torch.device) -> None:
        self.offsets = torch.tensor([0] + [len(b.samples) for b in benchmarks]).cumsum(0)
        self.allowed = torch.ones(len(benchmarks), num_classes, dtype=torch.bool)
        for i, b in enumerate(benchmarks):
            if b.subset is not None:
                self.allowed[i] = False
                self.allowed[i, b.subset] = True
        self.allowed = self.allowed.to(device)
        self.sums = torch.zeros(len(benchmarks), 4 + 3 * ECE_BINS, dtype=torch.float64, device=device)
        self.offsets_d = self.offsets.to(device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, first_index: int) -> torch.Tensor:
        """Add a batch whose images are global indices first_index.. (in the concatenated benchmarks); returns
        the top-5 predictions (restricted where the benchmark is a subset)."""
        n = logits.shape[0]
        index = torch.arange(first_index, first_index + n, device=logits.device)
        bench = torch.bucketize(index, self.offsets_d[1:], right=True)
        logits = logits.float().masked_fill(~self.allowed[bench], float("-inf"))
        logp = logits.log_softmax(1)
        conf, top5 = logp.exp().topk(min(5, logits.shape[1]), dim=1)
        hit1 = (top5[:, 0] == labels).double()
        hit5 = (top5 == labels[:, None]).any(1).double()
        nll = -logp.gather(1, labels[:, None]).squeeze(1).double()
        bins = (conf[:, 0] * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1  # (k/15, (k+1)/15]
        rows = torch.stack([torch.ones_like(hit1), hit1, hit5, nll], 1)
        self.sums[:, :4].index_add_(0, bench, rows)
        for k, value in enumerate((torch.ones_like(hit1), conf[:, 0].double(), hit1)):  # bin images, conf, hits
            self.sums.index_put_((bench, 4 + k * ECE_BINS + bins), value, accumulate=True)
        return top5

    def results(self) -> list[dict]:
        """Per benchmark: images, top1, top5 (%), nll, ece (%), and the reliability bins."""
        return [summarise(row) for row in self.sums.cpu()]


def summarise(row: torch.Tensor) -> dict:
    """One benchmark's figures from its sums (or pooled sums of several, as ImageNet-C's)."""
    count, hit1, hit5, nll = row[:4].tolist()
    images, conf, hits = row[4:].view(3, ECE_BINS)
    n = max(count, 1)
    ece = float((conf - hits).abs().sum() / n)  # sum_b |B|/n * |acc_b - conf_b| = sum_b |sum conf - sum hits| / n
    return {"images": int(count), "top1": round(100 * hit1 / n, 3), "top5": round(100 * hit5 / n, 3),
            "nll": round(nll / n, 4), "ece": round(100 * ece, 3),
            "bins": {"images": images.long().tolist(), "confidence": conf.tolist(), "hits": hits.tolist()}}


def evaluate_suite(model, loader, benchmarks: list[Benchmark], num_classes: int, env, hflip: bool = False,
                   autocast=None) -> dict | None:
    """One pass of `loader` (every benchmark's samples, concatenated in order, sharded as val is) through `model`;
    per-benchmark sums all-reduced. Rank 0 gets the table: one entry per benchmark (ImageNet-C pooled, with its
    corruptions, CE and mCE), ReaL figures on val where real.json is; other ranks get None."""
    import contextlib

    import torch.distributed as dist

    from data_pipeline.sharding import val_shard

    n = sum(len(b.samples) for b in benchmarks)
    meter = SuiteMeter(benchmarks, num_classes, env.device)
    seen = int(val_shard(n, env.rank, env.world_size)[:1].sum()) if n else 0
    val = next((i for i, b in enumerate(benchmarks) if b.key == "val" and b.real), None)
    val_top5 = []
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for images, target in loader:
            logits = model(images.float()).float()
            if hflip:
                logits = (logits + model(images.float().flip(3)).float()) / 2
            top5 = meter.update(logits, target.to(logits.device).long(), seen)
            if val is not None:  # ReaL scores the val images' top-5 against their label sets
                lo, hi = int(meter.offsets[val]), int(meter.offsets[val + 1])
                for k in range(max(lo, seen), min(hi, seen + len(target))):
                    val_top5.append((k - lo, top5[k - seen].tolist()))
            seen += len(target)
    if dist.is_initialized():
        dist.all_reduce(meter.sums)
        if val is not None:
            gathered = [None] * env.world_size
            dist.all_gather_object(gathered, val_top5)
            val_top5 = [x for part in gathered for x in part]
    if not env.is_main:
        return None
    rows = {b.key: r for b, r in zip(benchmarks, meter.results())}
    table = {k: r for k, r in rows.items() if not k.startswith("imagenet-c/")}
    if val is not None:
        real = real_label_sets(benchmarks[val].real, benchmarks[val].samples)
        keep = [(i, p) for i, p in val_top5 if real[i]]
        table["val"]["real_top1"] = round(100 * sum(p[0] in real[i] for i, p in keep) / max(len(keep), 1), 3)
        table["val"]["real_top5"] = round(100 * sum(any(x in real[i] for x in p) for i, p in keep) / max(len(keep), 1), 3)
    c_rows = [i for i, b in enumerate(benchmarks) if b.corruption]
    if c_rows:
        table["imagenet-c"] = {**summarise(meter.sums[c_rows].sum(0).cpu()), **corruption_summary(rows),
                               "severities": {k: {m: v for m, v in r.items() if m != "bins"}
                                              for k, r in rows.items() if k.startswith("imagenet-c/")}}
    return table


def real_label_sets(path: Path, samples: list[tuple[str, int]]) -> list[list[int]]:
    """The ReaL label set of each sample, by file name."""
    data = json.loads(path.read_text())
    if isinstance(data, list):  # real.json: image i is ILSVRC2012_val_{i+1:08d}.JPEG
        data = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": labels for i, labels in enumerate(data)}
    if not isinstance(data, dict):
        raise ValueError(f"--real-labels {path}: expected a JSON list (real.json) or object {{file name: [labels]}}")
    missing = [Path(p).name for p, _ in samples if Path(p).name not in data]
    if missing:
        raise ValueError(f"--real-labels {path} has no entry for {len(missing)} of the {len(samples)} images, "
                         f"e.g. {missing[0]}")
    return [list(data[Path(p).name]) for p, _ in samples]



def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE over equal-width confidence bins (k/bins, (k+1)/bins]: sum over bins of |B|/n * |accuracy - mean
    confidence|, as a fraction."""
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    total = 0.0
    for k in range(bins):
        mask = index == k
        if mask.any():
            total += mask.sum().item() / len(confidence) * abs(correct[mask].double().mean().item() -
                                                                 confidence[mask].double().mean().item())
    return total


def corruption_summary(results: dict[str, dict]) -> dict:
    """ImageNet-C: error per corruption (mean over its severities, %), its CE against AlexNet, and the mCE over
    the 15 standard corruptions present (None unless all 15 are)."""
    by_corruption: dict[str, list[float]] = {}
    for key, r in results.items():
        if key.startswith("imagenet-c/"):
            _, corruption, _ = key.split("/")
            by_corruption.setdefault(corruption, []).append(100 - r["top1"])
    summary = {}
    for corruption, errors in sorted(by_corruption.items()):
        error = sum(errors) / len(errors)
        alexnet = ALEXNET_ERRORS.get(corruption)
        summary[corruption] = {"error": round(error, 3), "severities": len(errors),
                               "ce": round(error / (100 * alexnet) * 100, 3) if alexnet else None}
    standard = [v["ce"] for k, v in summary.items() if k in ALEXNET_ERRORS]
    return {"corruptions": summary,
            "mce": round(sum(standard) / len(standard), 3) if len(standard) == len(ALEXNET_ERRORS) else None,
            "mce_partial": round(sum(standard) / len(standard), 3) if standard else None}


def reliability_plot(result: dict, title: str, path: Path) -> None:
    """The reliability diagram of one benchmark: accuracy per confidence bin against the diagonal, with the gap
    shaded and the ECE in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = result["bins"]
    width = 1 / ECE_BINS
    centers = [(k + 0.5) * width for k in range(ECE_BINS)]
    acc = [h / n if n else 0.0 for h, n in zip(bins["hits"], bins["images"])]
    conf = [c / n if n else 0.0 for c, n in zip(bins["confidence"], bins["images"])]
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.bar(centers, acc, width=width, edgecolor="black", label="accuracy")
    ax.bar(centers, [c - a for c, a in zip(conf, acc)], bottom=acc, width=width, color="tab:red", alpha=0.3,
           label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{title}: ECE {result['ece']:.2f} %, {result['images']} images")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
