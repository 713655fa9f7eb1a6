"""After training, as timm users work: starting from trained weights (train.init_from), layer-wise lr
decay, the resolution and trust checks around them; validation (launch/evaluate.py: other trees, file
lists, flip TTA, per-class and ReaL accuracy); ONNX export and the inference benchmark."""
from __future__ import annotations

import json
import random
import re
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from models import create_model
from models.exported import save_exported
from trainer.build import init_from
from trainer.checkpoint import load_rng_state, rng_state, set_rng_state
from trainer.config import ConfigError, find_config, load_config, plan_run
from trainer.optim import build_scheduler, param_groups

TRAIN = str(REPO / "launch/train.py")
EVALUATE = str(REPO / "launch/evaluate.py")
EXPORT = str(REPO / "launch/export.py")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_root):
    """A short cs_mixer_tiny digits run (one process, ZeRO-2, fp32 weights under autocast): its checkpoint
    starts the fine-tune and is what evaluate and export read."""
    out = tmp_path_factory.mktemp("digits_run")
    run = run_script(TRAIN, "--config", "cs_mixer_tiny", f"data.root={digits_root}", f"train.output_dir={out}",
                     "train.run_name=digits", "train.max_steps=30", "tracking.enabled=false", "data.workers=1",
                     "aug.mixup=0", "aug.cutmix=0", cwd=out)
    assert run.returncode == 0, run.stderr[-3000:]
    top1 = float(re.search(r"^val_top1=([0-9.]+)$", run.stdout, re.M).group(1))
    return out / "digits", top1


def exported(tmp_path, name: str, num_classes: int, seed: int = 1):
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes)
    path = tmp_path / f"{name}-{num_classes}.safetensors"
    save_exported(path, name, model.state_dict(), {"num_classes": num_classes, "img_size": 32}, step=7)
    return path, model.state_dict()


def test_init_from_loads_by_name_and_reinitialises_another_head(tmp_path):
    path, trained = exported(tmp_path, "cs_mixer_tiny", 10)
    torch.manual_seed(2)
    model = create_model("cs_mixer_tiny", num_classes=3)
    fresh_head = model.head.weight.detach().clone()
    lines = []
    init_from(model, str(path), lines.append)
    state = model.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in state if not k.startswith("head."))
    assert torch.equal(state["head.weight"], fresh_head) and state["head.weight"].shape == (3, 256)
    assert lines == [f"[init] {len(state) - 2} tensors from {path} (cs_mixer_tiny; safetensors); "
                     "classifier 10 -> 3 classes, re-initialised: head.bias, head.weight"]


def test_init_from_weights_that_do_not_fit_is_an_error_naming_the_tensors(tmp_path):
    path, _ = exported(tmp_path, "s2mlpv2_tiny", 10)
    with pytest.raises(ConfigError, match=r"\(s2mlpv2_tiny\) does not fit model cs_mixer_tiny: \d+ missing: stages\.") as e:
        init_from(create_model("cs_mixer_tiny", num_classes=10), str(path), print)
    assert "unexpected: " in str(e.value) and "patch_embed.weight" in str(e.value)
    # the same family, another width: shapes named, not a load_state_dict traceback
    torch.manual_seed(0)
    other = create_model("cs_mixer_tiny", num_classes=10, embed_dim=16)
    save_exported(tmp_path / "narrow.safetensors", "cs_mixer_tiny", other.state_dict(), {"num_classes": 10})
    with pytest.raises(ConfigError, match=r"fit model cs_mixer_tiny: norm.bias \(128,\) vs \(256,\), .* \(\+101 more\)"):
        init_from(create_model("cs_mixer_tiny", num_classes=10), str(tmp_path / "narrow.safetensors"), print)


@pytest.mark.parametrize("config, img_size, ok", [
    ("cs_mixer_t", 448, True),        # 7x7 windows: multiples of 224
    ("cs_mixer_t", 336, False),       # stage 4 would downsample an odd side
    ("s2mlpv2_small", 336, True),     # any multiple of the patch size (7) that halves evenly
    ("s2mlpv2_small", 330, False),
])
def test_resolutions_the_architecture_cannot_take_fail_at_start(config, img_size, ok):
    cfg = load_config(find_config(config), [f"model.img_size={img_size}"])
    if ok:
        plan_run(cfg, 8, check_data=False)
    else:
        with pytest.raises(ConfigError, match=rf"model.img_size={img_size}.*(odd|not divisible)"):
            plan_run(cfg, 8, check_data=False)


def test_init_from_a_missing_path_fails_at_start(tmp_path):
    cfg = load_config(find_config("cs_mixer_tiny"), [f"train.init_from={tmp_path}/none.safetensors"])
    with pytest.raises(ConfigError, match="train.init_from=.*none.safetensors: no such file"):
        plan_run(cfg, 1, check_data=False)


def test_layer_decay_scales_each_depth_and_the_schedule_keeps_the_ratios():
    model = create_model("s2mlpv2_tiny")  # depths (2, 2): ids 0 (patch embed), 1-4 (blocks), 5 (norm, head);
    # stages.1.0 is stage 2's downsample, with its first block (stages.1.1)
    groups = param_groups(model, 0.05, 1e-3, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["head.weight"])]["lr"] == pytest.approx(1e-3)
    assert by_param[id(named["patch_embed.weight"])]["lr"] == pytest.approx(1e-3 * 0.5 ** 5)
    assert by_param[id(named["stages.0.2.proj.weight"])]["lr"] == pytest.approx(1e-3 * 0.5 ** 3)  # block 2
    assert by_param[id(named["stages.1.0.weight"])]["lr"] == pytest.approx(1e-3 * 0.5 ** 2)  # with block 3
    assert by_param[id(named["stages.1.1.proj.weight"])]["lr"] == pytest.approx(1e-3 * 0.5 ** 2)
    assert by_param[id(named["stages.0.1.norm1.weight"])]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)
    cfg = load_config(find_config("s2mlpv2_tiny"), ["optim.layer_decay=0.5"])
    opt = torch.optim.AdamW(groups)
    sched = build_scheduler(cfg, opt, 1e-3, steps_per_epoch=10, total_steps=100)
    for _ in range(37):
        opt.step()
        sched.step()
    lrs = sched.get_last_lr()
    assert all(lr / g["lr_scale"] == pytest.approx(max(lrs)) for lr, g in zip(lrs, groups))
    # without layer decay: the two groups of before, at the full lr
    assert [g["lr"] for g in param_groups(model, 0.05, 1e-3)] == [1e-3, 1e-3]


def test_rng_state_reads_back_without_unpickling_code(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    torch.load(tmp_path / "rng.pt", weights_only=True)  # plain tensors and values only
    set_rng_state(load_rng_state(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


@pytest.mark.slow
def test_fine_tune_from_a_10_class_checkpoint_into_a_3_class_head(tmp_path, digits_run):
    """A digits run's checkpoint directory (ZeRO-2, fp32 weights) starts a 3-class run on the shapes set:
    read with weights_only=True, head re-initialised, and a fresh optimizer, schedule and step count."""
    from data_pipeline.prepare import write_shapes

    write_shapes(tmp_path / "shapes", train_per_class=16, val_per_class=8)
    digits = digits_run[0]
    common = (f"train.output_dir={tmp_path}", "tracking.enabled=false", "data.workers=1")
    tuned = run_script(TRAIN, "--config", "finetune_shapes", f"data.root={tmp_path / 'shapes'}",
                       f"train.init_from={digits}", "train.run_name=tuned", "train.epochs=4", *common,
                       cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    out = tuned.stdout
    assert re.search(rf"\[init\] \d+ tensors from {digits} \(cs_mixer_tiny; checkpoint module weights, "
                     r"torch\.load\(weights_only=True\)\); classifier 10 -> 3 classes, re-initialised: head\.bias, "
                     r"head\.weight", out), out
    assert "adamw with layer_decay 0.75" in out and "[resume]" not in out
    assert re.search(r"epoch 0 step 3 val top1", out), out  # the step count starts at 0 again
    # a restart of the fine-tune resumes its own checkpoint; init_from is not applied again
    again = run_script(TRAIN, "--config", "finetune_shapes", f"data.root={tmp_path / 'shapes'}",
                       f"train.init_from={digits}", "train.run_name=tuned", "train.epochs=5", *common,
                       cwd=tmp_path)
    assert again.returncode == 0 and "[init] train.init_from=" in again.stdout and "not applied: resuming" in again.stdout


@pytest.mark.slow
def test_evaluate_other_trees_file_lists_flip_tta_per_class_and_real_labels(tmp_path, digits_run, digits_root):
    run_dir, trained_top1 = digits_run

    def evaluate(*args):
        out = tmp_path / "r.json"
        r = run_script(EVALUATE, str(run_dir), *args, "--json", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(out.read_text()), r.stdout

    # the run's own val set (data.root from its config), with a ReaL-style multi-label file: every image's
    # own label, one image unlabelled (left out of the ReaL figures)
    images = sorted((digits_root / "val").glob("*/*.JPEG"))
    real = {f.name: [int(f.parent.name[-1])] for f in images}
    real[images[0].name] = []
    (tmp_path / "real.json").write_text(json.dumps(real))
    plain, out = evaluate("--real-labels", str(tmp_path / "real.json"))
    assert plain["top1"] == pytest.approx(trained_top1, abs=0.006) and plain["count"] == 355
    assert plain["real_count"] == 354 and abs(plain["real_top1"] - plain["top1"]) < 0.5 and "ReaL top1" in out
    per_class = plain["per_class_top1"]
    assert sorted(per_class) == [f"digit_{i}" for i in range(10)]
    counts = {f"digit_{i}": len(list((digits_root / "val" / f"digit_{i}").iterdir())) for i in range(10)}
    assert sum(per_class[c] * counts[c] for c in counts) / 355 == pytest.approx(plain["top1"], abs=0.01)

    flipped, out = evaluate("--data-dir", str(digits_root / "val"), "--hflip-tta")  # a split folder itself
    assert flipped["count"] == 355 and flipped["hflip_tta"] and "hflip TTA" in out
    assert flipped["top1"] != plain["top1"]  # digits are not mirror-symmetric

    files = images[::7]
    listing = tmp_path / "subset.txt"
    listing.write_text("".join(f"{f.parent.name}/{f.name} {int(f.parent.name[-1])}\n" for f in files))
    subset, _ = evaluate("--filelist", str(listing), "--data-dir", str(digits_root / "val"))
    assert subset["count"] == len(files) and set(subset["per_class_top1"]) <= {str(i) for i in range(10)}

    bad = run_script(EVALUATE, str(run_dir), "--img-size", "64")  # tiny's mixing windows change with the size
    assert bad.returncode == 2 and "does not fit cs_mixer_tiny at model.img_size=64" in bad.stderr
    assert "Traceback" not in bad.stderr
    (tmp_path / "bad.txt").write_text("digit_0/x.JPEG zero\n")
    bad = run_script(EVALUATE, str(run_dir), "--filelist", str(tmp_path / "bad.txt"))
    assert bad.returncode == 2 and "bad.txt:1: expected 'relative/path label'" in bad.stderr


@pytest.mark.slow
def test_onnx_export_gives_the_pytorch_logits_at_any_batch(tmp_path, digits_run):
    import onnxruntime as ort

    from trainer.checkpoint import consolidated_weights, find_checkpoint

    run_dir, _ = digits_run
    out = tmp_path / "m.onnx"
    r = run_script(EXPORT, str(run_dir), "--format", "onnx", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    diff = float(re.search(r"max \|logit difference\| ([0-9.e+-]+)", r.stdout).group(1))
    assert diff < 1e-4
    state, _ = consolidated_weights(find_checkpoint(run_dir))
    model = create_model("cs_mixer_tiny", num_classes=10).eval()
    model.load_state_dict(state)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map  # the model knows its labels (the digits tree's folders)
    assert meta["model"] == "cs_mixer_tiny" and json.loads(meta["class_names"]) == [f"digit_{i}" for i in range(10)]
    for n in (1, 7):
        x = torch.randn(n, 3, 32, 32)
        got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
        torch.testing.assert_close(got, model(x).detach(), rtol=1e-4, atol=1e-4)
    bench = run_script(str(REPO / "launch/bench_infer.py"), "--models", "s2mlpv2_tiny", "--backends",
                       "eager,onnxruntime", "--iters", "2", "--large-batch", "4")
    assert bench.returncode == 0, bench.stderr[-3000:]
    row = next(line.split() for line in bench.stdout.splitlines() if line.startswith("s2mlpv2_tiny"))
    assert len(row) == 7 and float(row[-1]) < 1e-4  # model, px, 2 x (latency, throughput), parity


def test_bench_infer_keeps_the_model_where_it_was(tmp_path):
    """An eager row on another device (the meta device stands in for CUDA) before the onnxruntime row: the
    onnxruntime row still exports the model on the host (a model moved in place made every row fail)."""
    sys.path.insert(0, str(REPO / "launch"))
    from bench_infer import bench

    row = bench("cs_mixer_tiny", None, 2, 1, ["eager", "onnxruntime"], torch.device("meta"), tmp_path)
    print(row)
    assert row["parity"] < 1e-4 and row["onnxruntime_img_s"] > 0 and "eager_img_s" in row
