"""Input pipelines on real JPEG files: the folder (Pillow), FFCV (.beton) and DALI (CPU mode) backends,
the shared sharding, positioning, and data preparation with its bad-input handling."""
from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_script
from data_pipeline import DataError, build_loaders
from data_pipeline.folder import SampleList, scan_split
from data_pipeline.sharding import epoch_permutation, train_shard, val_shard
from trainer.config import CONFIG_DIR, ConfigError, load_config, plan_run, resolved

PREPARE = str(REPO / "launch/prepare_data.py")
BACKENDS = ["folder", "ffcv", "dali"]


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    """4 classes of 64x48 JPEGs (+ FFCV files), and an odd-format image or two among them."""
    root = tmp_path_factory.mktemp("jpegs")
    result = run_script(PREPARE, "synthetic", "--out", str(root), "--count", "120", "--classes", "4",
                        "--width", "64", "--height", "48", "--val-fraction", "0.25", "--workers", "2")
    assert result.returncode == 0, result.stderr
    # Grayscale and CMYK JPEGs must come out as RGB like the rest.
    gray, cmyk = (next((root / f"train/class_00{c}").glob("*.JPEG")) for c in (1, 2))
    Image.open(gray).convert("L").save(gray)
    Image.open(cmyk).convert("CMYK").save(cmyk)
    result = run_script(PREPARE, "ffcv", "--root", str(root), "--max-side", "64", "--workers", "2")
    assert result.returncode == 0, result.stderr
    return root


def make_cfg(root, backend: str, **extra):
    overrides = [f"data.backend={backend}", f"data.root={root}", "model.num_classes=4", "model.img_size=32",
                 "train.batch_size=8", "data.workers=1", "aug.auto_augment=none", "aug.mixup=0", "aug.cutmix=0",
                 "aug.reprob=0", "aug.smoothing=0", "data.hflip=0.5", *[f"{k}={v}" for k, v in extra.items()]]
    return resolved(load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", overrides), world_size=1)


def labels_of(loader) -> list[int]:
    return [int(t) for _, targets in loader for t in (targets.argmax(1) if targets.ndim == 2 else targets)]


# ----------------------------------------------------------------------------- sharding

def test_train_shards_are_disjoint_cover_the_set_and_reshuffle():
    n, world, bs = 103, 2, 8
    shards = [train_shard(n, r, world, bs, seed=0, epoch=0) for r in range(world)]
    assert all(len(s) == 48 for s in shards)                     # 103 // 16 * 8: same full batches per rank
    union = np.concatenate(shards)
    assert len(set(union.tolist())) == 96 and set(union.tolist()) <= set(range(n))
    assert not (train_shard(n, 0, world, bs, 0, 1) == shards[0]).all()   # another epoch, another order
    assert (train_shard(n, 0, world, bs, 0, 0) == shards[0]).all()       # same seed, same order
    assert not (train_shard(n, 0, world, bs, 1, 0) == shards[0]).all()   # another seed, another order
    assert sorted(epoch_permutation(n, 0, 3).tolist()) == list(range(n))


def test_repeated_augmentation_reads_each_image_r_times_on_different_ranks_across_a_resize():
    """aug.repeats=3 (DeiT's RASampler): an epoch of 1442 samples read as 480 images x 3 (the epoch length kept);
    at 2 ranks each image's copies are on both ranks; stopped after 5 steps of 96 and resumed at 3 ranks, the
    rest of the epoch is read exactly once: still every image exactly 3 times."""
    from data_pipeline.sharding import resumed_epoch_end, train_shard

    n, seed, epoch = 1442, 0, 4
    full = {r: train_shard(n, r, 2, 48, seed, epoch, repeats=3) for r in range(2)}
    counts = Counter(np.concatenate(list(full.values())).tolist())
    assert len(counts) == 480 and set(counts.values()) == {3}
    ranks = {i: {r for r in full if i in set(full[r].tolist())} for i in counts}
    assert all(rs == {0, 1} for rs in ranks.values())  # 3 copies on 2 ranks: both hold some
    start = 5 * 96
    end = resumed_epoch_end(n, start, 1440, 96)
    before = [train_shard(n, r, 2, 48, seed, epoch, 0, start, repeats=3) for r in range(2)]
    after = [train_shard(n, r, 3, 32, seed, epoch, start, end, repeats=3) for r in range(3)]
    resumed = Counter(np.concatenate(before + after).tolist())
    assert resumed == counts
    assert not np.array_equal(train_shard(n, 0, 2, 48, seed, epoch), full[0])  # repeats=1: the plain permutation


def test_val_shards_cover_every_image_once():
    for n, world in [(355, 2), (10, 3), (7, 8)]:
        parts = [val_shard(n, r, world) for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))


# ----------------------------------------------------------------------------- backends

@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_shapes_ranges_and_labels(jpeg_root, backend):
    cfg = make_cfg(jpeg_root, backend)
    train, val = build_loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"))
    samples, classes = scan_split(jpeg_root, "train")
    assert classes == ["class_000", "class_001", "class_002", "class_003"]
    assert len(train) == len(samples) // 8
    images, targets = next(iter(train))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert -2.2 < images.min() < -1.0 and 1.5 < images.max() < 2.7   # normalised with ImageNet mean/std
    assert targets.shape == (8, 4) and torch.allclose(targets.sum(1), torch.ones(8))
    # Train reads our order for epoch 0: the labels follow the folder of each file.
    train.set_window(0)
    expected = [samples[i][1] for i in train_shard(len(samples), 0, 1, 8, 0, 0)]
    assert labels_of(train) == expected
    val_samples, _ = scan_split(jpeg_root, "val")
    assert labels_of(val) == [label for _, label in val_samples]   # every val image once, in order


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_split_train_and_val(jpeg_root, backend):
    cfg = make_cfg(jpeg_root, backend)
    samples, _ = scan_split(jpeg_root, "train")
    val_samples, _ = scan_split(jpeg_root, "val")
    val_labels, train_counts = [], 0
    for rank in range(2):
        train, val = build_loaders(cfg, rank=rank, world_size=2, device=torch.device("cpu"))
        got = labels_of(train)
        assert got == [samples[i][1] for i in train_shard(len(samples), rank, 2, 8, 0, 0)]
        train_counts += len(got)
        val_labels += labels_of(val)
    assert train_counts == len(samples) // 16 * 16
    assert val_labels == [label for _, label in val_samples]


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_reshuffle_and_positioning_reproduces_the_stream(jpeg_root, backend):
    cfg = make_cfg(jpeg_root, backend)
    train, _ = build_loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"))
    epoch0 = list(train)
    epoch1 = list(train)  # iterating again continues with the next epoch
    labels0 = [int(t) for _, y in epoch0 for t in y.argmax(1)]
    labels1 = [int(t) for _, y in epoch1 for t in y.argmax(1)]
    assert sorted(labels0) == sorted(labels1) and labels0 != labels1
    train.set_window(1, 4 * 8)  # resume after 4 batches of 8 samples
    resumed = list(train)
    assert len(resumed) == len(epoch1) - 4
    for (a, ya), (b, yb) in zip(resumed, epoch1[4:]):
        assert torch.equal(ya, yb)
        # folder: crops drawn from (seed, epoch, index); DALI: its pipeline replayed to the resume point.
        # Both give the very same pixels (FFCV's crop randomness cannot be seeded per sample).
        if backend in ("folder", "dali"):
            assert torch.equal(a, b)


def test_folder_crops_are_independent_of_worker_count(jpeg_root):
    """Also: start_workers() forks the workers up front (the trainer does it before its threads start) without
    reading a batch, and the epoch after it is whole."""
    import multiprocessing

    a, _ = build_loaders(make_cfg(jpeg_root, "folder", **{"data.workers": 0}), 0, 1, torch.device("cpu"))
    b, _ = build_loaders(make_cfg(jpeg_root, "folder", **{"data.workers": 2}), 0, 1, torch.device("cpu"))
    before = set(multiprocessing.active_children())
    b.source.start_workers()
    assert len(set(multiprocessing.active_children()) - before) == 2
    assert b.source.loader._iterator._send_idx == 0  # no batch was asked of them
    batches = list(b)
    assert len(batches) == len(a) and all(torch.equal(x, y) for (x, _), (y, _) in zip(a, batches))
    # aug.repeats: an image's copies in one epoch get crops of their own
    r, _ = build_loaders(make_cfg(jpeg_root, "folder", **{"data.workers": 0, "aug.repeats": 3}), 0, 1,
                         torch.device("cpu"))
    keys = r.source.sampler.order_fn(0, 0, None)
    n = len(r.source.dataset)
    first = keys[0] % n
    copies = [k for k in keys.tolist() if k % n == first]
    assert len(copies) == 3 and sorted(k // n for k in copies) == [0, 1, 2]
    crops = [r.source.dataset[(0, k)][0] for k in copies]
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[1], crops[2])


def test_dali_pipeline_build_survives_gc_finalizers_that_parse_code(jpeg_root, tmp_path):
    """CPython 3.11.7 bug (python/cpython#106905): a GC pass inside DALI's AST work (its first
    import parses signatures) whose finalizers parse code broke CI once. Force that: collect on almost every allocation,
    and parse code in a GC callback."""
    script = tmp_path / "gc_reentry.py"
    script.write_text(f"""
import ast, gc, torch
from data_pipeline.dali_source import DaliSource
from data_pipeline.folder import scan_split
samples = scan_split({str(jpeg_root)!r}, "train")[0]
gc.set_threshold(1)
gc.callbacks.append(lambda phase, info: ast.parse("a = (1, [2, {{3: 4}}])") if phase == "start" else None)
src = DaliSource(samples, "train", 0, 1, 8, True, 1, 0, 32, torch.device("cpu"), scale=(1.0, 1.0),
                 ratio=(4 / 3, 4 / 3), hflip=0.0)
images, _ = next(src.batches(0, 0, None))
print("batch", tuple(images.shape))
""")
    proc = run_script(str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch (8, 3, 32, 32)" in proc.stdout


def test_ffcv_leaves_the_training_thread_count_alone(jpeg_root):
    """FFCV sets torch's thread count to its worker count on import, Loader and every epoch."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        train, val = build_loaders(make_cfg(jpeg_root, "ffcv", **{"data.workers": 2}), 0, 1, torch.device("cpu"))
        assert torch.get_num_threads() == 3
        assert labels_of(train) and labels_of(val)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_bad_backend_settings_fail_clearly(jpeg_root, tmp_path):
    with pytest.raises(DataError, match="has 4 classes but model.num_classes=10"):
        build_loaders(make_cfg(jpeg_root, "folder", **{"model.num_classes": 10}), 0, 1, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/train.beton does not exist"):
        build_loaders(make_cfg(tmp_path, "ffcv"), 0, 1, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/train does not exist"):
        build_loaders(make_cfg(tmp_path, "dali"), 0, 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match="even per-rank batch, but train.batch_size resolves to 7"):
        plan_run(make_cfg(jpeg_root, "folder", **{"train.batch_size": 7, "aug.mixup": 0.8}), 1)


@pytest.mark.parametrize("backend, module", [("ffcv", "ffcv"), ("dali", "nvidia.dali")])
def test_a_missing_backend_library_is_named_with_how_to_install_it(jpeg_root, monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is not installed
    with pytest.raises(DataError, match=rf"data.backend={backend} needs the {module} package.*pip install"):
        build_loaders(make_cfg(jpeg_root, backend), 0, 1, torch.device("cpu"))


# ----------------------------------------------------------------------------- preparation

@pytest.fixture
def small_tree(tmp_path):
    root = tmp_path / "tree"
    result = run_script(PREPARE, "synthetic", "--out", str(root), "--count", "24", "--classes", "3",
                        "--width", "40", "--height", "30", "--val-fraction", "0.25", "--workers", "1")
    assert result.returncode == 0, result.stderr
    return root


def test_verify_reports_counts_and_writes_file_lists(small_tree):
    Image.new("RGBA", (40, 30), (10, 200, 30, 128)).save(small_tree / "train/class_000/alpha.png")
    result = run_script(PREPARE, "verify", "--root", str(small_tree), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "[train] 19 images in 3 classes" in result.stdout and "[val] 6 images in 3 classes" in result.stdout
    assert "per class: min 6, median 6, max 7 (fewest: class_001 6, class_002 6, class_000 7; most: class_000 7" \
        in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) < 300  # not one line per class list
    listed = (small_tree / "train_filelist.txt").read_text().splitlines()
    assert len(listed) == 19 and "train/class_000/alpha.png 0" in listed


@pytest.mark.parametrize("content, what", [(b"", "zero-byte"), (b"not an image at all" * 10, "garbage")])
def test_unreadable_files_fail_with_their_path_or_are_skipped(small_tree, content, what):
    bad = small_tree / "train/class_001/broken.JPEG"
    bad.write_bytes(content)
    truncated = small_tree / "val/class_002/truncated.JPEG"
    good = next((small_tree / "val/class_002").glob("*.JPEG")).read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    result = run_script(PREPARE, "verify", "--root", str(small_tree), "--workers", "1")
    assert result.returncode != 0
    assert str(bad) in result.stderr and "--skip-bad" in result.stderr and "Traceback" not in result.stderr
    result = run_script(PREPARE, "ffcv", "--root", str(small_tree), "--skip-bad", "--workers", "1",
                        "--max-side", "40")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable image(s)" in result.stdout and str(bad) in result.stdout
    assert str(truncated) in result.stdout
    assert "[train] wrote" in result.stdout and (small_tree / "train.beton").is_file()
    assert not list(small_tree.glob(".*.tmp-*"))


def test_ranks_share_the_screening_of_an_unverified_tree(small_tree, tmp_path):
    """Two gloo ranks each read every second file's header and exchange what they left out: each file is
    read once per job, and both ranks get the single-process answer (kept list and bad files, in order)."""
    for name, data in {"empty": b"", "notimage": b"<html>404</html>"}.items():
        (small_tree / f"train/class_001/zz_{name}.JPEG").write_bytes(data)
    script = tmp_path / "screen_ranks.py"
    script.write_text(f"""
import json, torch.distributed as dist
from data_pipeline import folder
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
read, sniff = [], folder.sniff_image
folder.sniff_image = lambda path: read.append(path) or sniff(path)
samples = folder.scan_split({str(small_tree)!r}, "train")[0]
kept, bad = folder.screen(samples, rank=rank, world_size=world)
open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w").write(json.dumps(dict(read=read, kept=list(kept), bad=bad)))
dist.destroy_process_group()
""")
    result = run_script(str(script), nproc=2, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]  # stdout: lines > 4 KB interleave
    from data_pipeline.folder import scan_split, screen
    samples = scan_split(small_tree, "train")[0]
    kept, bad = screen(samples)
    assert [b[0].rsplit("/", 1)[1] for b in bad] == ["zz_empty.JPEG", "zz_notimage.JPEG"], bad
    for r in ranks:
        assert r["kept"] == [list(s) for s in kept] and r["bad"] == [list(b) for b in bad], r
    assert sorted(ranks[0]["read"] + ranks[1]["read"]) == sorted(p for p, _ in samples)
    assert len(ranks[0]["read"]) == (len(samples) + 1) // 2


def test_structural_problems_fail_at_start(small_tree, tmp_path):
    (small_tree / "train/class_009").mkdir()
    result = run_script(PREPARE, "verify", "--root", str(small_tree))
    assert result.returncode == 2 and "class folder" in result.stderr and "class_009 has no images" in result.stderr
    (small_tree / "train/class_009/x.JPEG").write_bytes(
        next((small_tree / "train/class_000").glob("*.JPEG")).read_bytes())
    result = run_script(PREPARE, "verify", "--root", str(small_tree))
    assert result.returncode == 2 and "different class folders" in result.stderr and "class_009" in result.stderr
    result = run_script(PREPARE, "verify", "--root", str(tmp_path / "missing"))
    assert result.returncode == 2 and f"{tmp_path}/missing/train does not exist" in result.stderr


@pytest.mark.slow
def test_data_benchmark_runs_every_backend(jpeg_root):
    result = run_script(str(REPO / "launch/bench_data.py"), "--root", str(jpeg_root), "--batch", "8",
                        "--img-size", "32", "--workers", "1", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    rows = {r["name"].strip(): r for r in json.loads(result.stdout)["rows"]}
    assert set(rows) == {"folder (Pillow)", "ffcv, max side 256", "bare FFCV Loader, max side 256",
                         "ffcv, max side 500", "bare FFCV Loader, max side 500", "dali (CPU mode)",
                         "bare DALI pipeline + device stage"}
    assert all(r["images_per_s"] > 0 and r["images"] > 0 for r in rows.values())
    assert rows["folder (Pillow)"]["ratio_to_folder"] == 1.0


def test_end_to_end_benchmark_trains_with_every_backend(jpeg_root, tmp_path):
    out = tmp_path / "e2e.json"
    result = run_script(str(REPO / "launch/bench_e2e.py"), "--model", "cs_mixer_tiny", "--root", str(jpeg_root),
                        "--ffcv-root", str(jpeg_root), "--batch", "8", "--steps", "4", "--log-every", "2",
                        "--workers", "1", "--out", str(tmp_path / "runs"), "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    report = json.loads(out.read_text())
    rows = {r["backend"]: r for r in report["rows"]}
    assert list(rows) == ["synthetic", "folder", "ffcv", "dali"]
    assert all(r["images_per_s"] > 0 for r in rows.values())  # the loop's steady-state figure was measured
    assert rows["synthetic"]["share_of_synthetic"] == 1.0
    assert rows["dali"]["share_of_synthetic"] == round(rows["dali"]["images_per_s"] / rows["synthetic"]["images_per_s"], 3)
    assert report["setup"]["model"] == "cs_mixer_tiny" and report["env"]["ffcv"] == "1.0.2"
    assert "share of synthetic" in result.stdout
    assert not list((tmp_path / "runs").iterdir())  # each row's run was removed


# ----------------------------------------------------------------------------- recipe fidelity

def preview_json(root, backend: str, *extra: str) -> dict:
    import json
    result = run_script(str(REPO / "launch/preview_augment.py"), "--config", "cs_mixer_tiny", "--json", "--images",
                        "2000", "--out", str(root / f"previews_{backend}"), f"data.backend={backend}",
                        f"data.root={root}", "model.num_classes=4", "model.img_size=32", "data.workers=1",
                        "aug.auto_augment=rand-m9-mstd0.5-inc1", "aug.reprob=0.25", "aug.mixup=0.8", "aug.cutmix=1.0",
                        "aug.mixup_prob=1.0", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_preview_statistics_are_the_recipe_and_the_same_on_every_backend(jpeg_root):
    """rand-m9-mstd0.5-inc1 over >= 2,000 draws through each backend's own pipeline: timm's
    RandAugment applies each of its 2 ops with p=0.5 (1.0 op per image, 1/4 untouched), all 15 ops
    equally often, magnitude ~ N(9, 0.5); and DALI, FFCV and folder draw the very same."""
    reports = {b: preview_json(jpeg_root, b) for b in BACKENDS}
    for backend, r in reports.items():
        assert r["images"] >= 2000 and r["auto_augment"] == "rand-m9-mstd0.5-inc1"
        assert abs(r["ops_per_image_mean"] - 1.0) <= 0.05, (backend, r["ops_per_image_mean"])
        assert abs(r["untouched_fraction"] - 0.25) <= 0.03, (backend, r["untouched_fraction"])
        assert len(r["op_frequency"]) == 15
        assert all(abs(share - 1 / 15) <= 0.015 for share in r["op_frequency"].values()), r["op_frequency"]
        assert abs(r["magnitude_mean"] - 9.0) < 0.1
        assert abs(r["erasing"]["erased_fraction"] - 0.25) <= 0.03
        assert r["mixing"]["none_fraction"] == 0 and 0.3 < r["mixing"]["cutmix_fraction"] < 0.7
        for grid in r["grids"].values():
            with Image.open(grid) as img:
                assert img.width > 8 * 32 and img.height > 32
    strip = lambda r: {k: v for k, v in r.items() if k not in ("backend", "grids")}
    assert strip(reports["dali"]) == strip(reports["folder"]) == strip(reports["ffcv"])


def test_mixup_is_on_before_mixup_off_epoch_and_off_from_it_on(jpeg_root):
    """timm's meaning of mixup_off_epoch=N: Mixup/CutMix in epochs 0..N-1, plain targets from epoch N on."""
    cfg = make_cfg(jpeg_root, "folder", **{"aug.mixup": 0.8, "aug.cutmix": 1.0, "aug.mixup_off_epoch": 2,
                                          "train.epochs": 5})
    train, _ = build_loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"))
    mixed = []
    for _epoch in range(5):  # iterating again continues with the next epoch
        targets = torch.cat([y for _, y in train])
        one_hot = bool(((targets == 0) | (targets == 1)).all())
        mixed.append(not one_hot)
    assert mixed == [True, True, False, False, False]  # not "the last 2 epochs" (that was [T, T, T, F, F])


@pytest.fixture(scope="module")
def one_image_root(tmp_path_factory):
    """Every train and val file is the same 96x96 noisy JPEG, and FFCV files at full size, stored raw."""
    root = tmp_path_factory.mktemp("one_image")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    for split, copies in (("train", 8), ("val", 1)):
        for c in range(2):
            (root / split / f"class_{c}").mkdir(parents=True)
            for i in range(copies):
                img.save(root / split / f"class_{c}" / f"img_{i}.JPEG", quality=95)
    result = run_script(PREPARE, "ffcv", "--root", str(root), "--max-side", "96", "--workers", "1",
                        "--compress-fraction", "0")
    assert result.returncode == 0, result.stderr
    return root


def first_train_and_val_image(root, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = make_cfg(root, backend, **{"model.num_classes": 2, "data.scale": "[1.0,1.0]", "data.ratio": "[1.0,1.0]",
                                     "data.hflip": 0, "data.crop_pct": 1.0})
    train, val = build_loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"))
    return next(iter(train))[0][0], next(iter(val))[0][0]


def test_train_resize_resamples_like_the_eval_resize_on_every_backend(one_image_root):
    """A whole-image train crop (scale 1, ratio 1) and the eval resize (crop_pct 1) of the same 96 px
    image, both to 32 px: the same antialiased downscale. DALI's train resize ran with antialias=False
    before: aliased, like the plain bicubic reference below, far from its eval image."""
    import torch.nn.functional as F

    images = {b: first_train_and_val_image(one_image_root, b) for b in BACKENDS}
    folder_train, folder_val = images["folder"]
    assert torch.equal(folder_train, folder_val)  # Pillow: one resize, both paths
    dali_train, dali_val = images["dali"]
    assert (dali_train - dali_val).abs().mean() < 0.01 and (dali_train - folder_train).abs().mean() < 0.02
    # FFCV: its decoders resize with Pillow's algorithm ported to numba (with FFCV's own INTER_AREA
    # resize this was 0.118 from Pillow's bicubic); the same pixels as Pillow from raw-stored images
    ffcv_train, ffcv_val = images["ffcv"]
    # (FFCV normalises inside its float32 pipeline on the CPU: equal to float rounding)
    torch.testing.assert_close(ffcv_train, folder_train, rtol=0, atol=1e-5)
    torch.testing.assert_close(ffcv_val, folder_val, rtol=0, atol=1e-5)
    with Image.open(next((one_image_root / "train/class_0").iterdir())) as f:
        pixels = torch.from_numpy(np.asarray(f.convert("RGB")).copy()).permute(2, 0, 1)[None].float()
    aliased = F.interpolate(pixels, size=(32, 32), mode="bicubic", antialias=False).clamp(0, 255).round()[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    aliased = (aliased / 255 - mean) / std
    for train_img in (folder_train, dali_train, ffcv_train):
        assert (train_img - aliased).abs().mean() > 0.3  # what a resize without antialiasing gives


def test_file_list_parses_like_line_by_line_and_names_a_bad_line(tmp_path):
    """The verified file list, parsed by vectorised passes over its bytes (ImageNet's 1.28 M lines in about
    2x the time of reading them, against 30x a Path per line): the same (path, label) pairs as a plain
    line-by-line parse, with spaces and non-ASCII in names, \\r\\n endings and blank lines; a bad line is
    named by number."""
    lines = ["train/n01/a b.JPEG 0", "train/n02/é.jpeg 12", "", "train/n03/c.png 999\r", "train/n04/d.JPEG 7"]
    listed = tmp_path / "train_filelist.txt"
    listed.write_text("\n".join(lines))  # and no final newline
    got = SampleList.from_filelist(listed, f"{tmp_path}/")
    expected = [(f"{tmp_path}/{rel}", int(label)) for rel, label in (ln.strip().rsplit(" ", 1) for ln in lines if ln)]
    assert list(got) == expected and len(got) == 4 and got[-1] == expected[-1]
    assert got.subset([3, 0]).paths() == [expected[3][0], expected[0][0]]
    assert list(SampleList.from_pairs(expected)) == expected
    for bad in ("train/x.JPEG 1\ntrain/y.JPEG 1a\n", "train/x.JPEG 1\nno-label\n", "a 1\nb -2\n"):
        listed.write_text(bad)
        with pytest.raises(DataError, match=f"{listed}:2: expected 'relative/path label'"):
            SampleList.from_filelist(listed, "")


def test_forked_workers_do_not_copy_the_sample_list(tmp_path):
    """A forked DataLoader worker that reads every sample: with the samples in numpy buffers its private
    memory stays flat; a Python list of tuples of the same 300,000 samples is copied into it as the
    reference counts change (copy-on-read)."""
    import multiprocessing

    import psutil

    listed = tmp_path / "train_filelist.txt"
    listed.write_text("".join(f"train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG {i % 1000}\n" for i in range(300_000)))

    def private_growth_mb(samples) -> float:
        def touch(queue):
            before = psutil.Process().memory_full_info().uss
            sum(label for _, label in samples)
            queue.put((psutil.Process().memory_full_info().uss - before) / 2 ** 20)
        queue = multiprocessing.get_context("fork").Queue()
        child = multiprocessing.get_context("fork").Process(target=touch, args=(queue,))
        child.start()
        grew = queue.get(timeout=120)
        child.join()
        return grew

    compact = SampleList.from_filelist(listed, "/data/")
    as_tuples = list(compact)
    flat, copied = private_growth_mb(compact), private_growth_mb(as_tuples)
    print(f"worker private memory after reading 300k samples: SampleList +{flat:.1f} MB, list of tuples "
          f"+{copied:.1f} MB")
    assert copied > 10 and flat < 3


@pytest.mark.parametrize("train", [True, False])
def test_dali_gpu_pipeline_sizes_nvjpeg_for_imagenet_and_upsamples_like_the_cpu(jpeg_root, train):
    """The GPU pipeline's graph, built here without a GPU: the mixed (nvJPEG) decoder with its buffers sized
    for ImageNet's largest image and fancy chroma upsampling (the CPU decoders' default); the CPU pipeline
    keeps DALI's defaults."""
    from data_pipeline.dali_source import DaliSource

    samples, _ = scan_split(jpeg_root, "train")

    def decoder_spec(device: torch.device) -> str:
        src = DaliSource(samples, "train", 0, 1, 4, train, 1, 0, 32, device)
        pipe = src._pipeline(src.files, src.labels.tolist(), 0)
        pipe._build_graph()
        return next(str(op.spec) for op in pipe._ops if "decoders__Image" in str(op.spec).splitlines()[0])

    gpu, cpu = decoder_spec(torch.device("cuda", 0)), decoder_spec(torch.device("cpu"))
    for arg in ("device: mixed", "device_memory_padding: 211025920", "host_memory_padding: 140544512",
                "preallocate_width_hint: 5980", "preallocate_height_hint: 6430", "jpeg_fancy_upsampling: True"):
        assert arg in gpu, gpu
    assert "device: cpu" in cpu and "device_memory_padding" not in cpu


@pytest.mark.parametrize("backend", BACKENDS)
def test_minival_holds_the_same_images_out_of_train_on_every_backend(jpeg_root, backend):
    """data.minival_per_class=3: 3 train images per class, the same on folder, DALI and FFCV (the .beton keeps
    the tree's order), at 1 and 2 ranks; the train loader's epoch never reads them, the minival loader reads
    them all, once, with val's transform."""
    from data_pipeline.sharding import minival_split

    samples, _ = scan_split(jpeg_root, "train")
    kept, held = minival_split(samples.labels, 3, 0)
    assert len(held) == 12 and sorted(Counter(samples.labels[held].tolist()).values()) == [3] * 4
    minival_labels, trained = [], []
    for rank in range(2):
        train, _ = build_loaders(make_cfg(jpeg_root, backend, **{"data.minival_per_class": 3}), rank, 2,
                                 torch.device("cpu"))
        assert train.num_samples == len(kept) and train.minival.num_samples == 12
        src, mini = train.source, train.minival.source
        if backend == "folder":
            reads = [src.dataset.samples[i][0] for _, i in (b for batch in src.sampler for b in batch)]
            minival = [mini.dataset.samples[i][0] for _, i in (b for batch in mini.sampler for b in batch)]
        elif backend == "dali":
            reads, minival = list(src.files), list(mini.files)
        else:  # FFCV: the sample indices of the file each epoch reads
            reads = [samples[int(i)][0] for i in src.order.order_fn(0, 0, None)]
            minival = [samples[int(i)][0] for i in mini.order.order_fn(0, 0, None)]
        trained += reads
        minival_labels += labels_of(train.minival)
        held_paths = {samples[int(i)][0] for i in held}
        assert not held_paths & set(reads) and set(minival) <= held_paths
    assert sorted(minival_labels) == sorted(samples.labels[held].tolist())  # each held image once over 2 ranks
