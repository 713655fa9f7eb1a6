"""The evaluation suite (trainer/benchmarks.py, launch/evaluate.py --suite): layouts, class mapping by name,
restricted logits, calibration, mCE, class names carried by the weights; every figure against a hand computation."""
from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from models import create_model
from models.exported import load_exported, save_exported
from trainer.benchmarks import (
    ALEXNET_ERRORS,
    SuiteError,
    SuiteMeter,
    corruption_summary,
    expected_calibration_error,
    find_benchmarks,
)

CLASSES = [f"n{1000 + 7 * i:08d}" for i in range(12)]  # 12 wnids: as strings, "10" sorts before "2"
COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
          (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (128, 128, 128)]


def meter_for(subsets: list[list[int] | None], classes: int = 5) -> SuiteMeter:
    from trainer.benchmarks import Benchmark
    return SuiteMeter([Benchmark(f"b{i}", [("x", 0)] * 4, subset=s) for i, s in enumerate(subsets)], classes,
                      torch.device("cpu"))


def test_restricted_logits_score_against_a_direct_computation():
    """ImageNet-A/R: top-1 over the classes present only. Known logits, whose global argmax is outside the subset
    for two of the four images."""
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0, 0.0],   # global argmax 0 (not in {1, 2, 4}); restricted: 2
                           [0.0, 3.0, 1.0, 9.0, 0.0],   # global 3; restricted: 1
                           [0.0, 0.0, 0.0, 0.0, 4.0],   # 4 either way
                           [0.0, 2.0, 2.5, 0.0, 1.0]])  # 2 either way
    labels = torch.tensor([2, 4, 4, 1])
    meter = meter_for([None, [1, 2, 4]])
    meter.update(logits, labels, 0)        # benchmark 0: all classes
    meter.update(logits, labels, 4)        # benchmark 1: restricted
    full, restricted = meter.results()
    assert full["top1"] == 25.0            # only image 3 (label 4) is right over all 5 classes
    assert restricted["top1"] == 50.0      # images 1 and 3: restricted argmax 2 and 4
    sub = logits[:, [1, 2, 4]]
    direct = (torch.tensor([1, 2, 4])[sub.argmax(1)] == labels).double().mean().item() * 100
    assert restricted["top1"] == direct
    nll = -sub.log_softmax(1)[torch.arange(4), torch.tensor([1, 2, 2, 0])].mean().item()
    assert restricted["nll"] == pytest.approx(nll, abs=1e-4)  # the restricted problem's probabilities


def test_ece_and_nll_of_hand_built_confidences():
    """Four images of a 2-class problem with top-1 confidences 0.95, 0.95, 0.65, 0.55 and hits 1, 0, 1, 1:
    bins (14/15, 1] holds two (accuracy 0.5, confidence 0.95), (9/15, 10/15] one (1, 0.65), (8/15, 9/15] one
    (1, 0.55): ECE = 2/4*0.45 + 1/4*0.35 + 1/4*0.45 = 0.425; NLL = mean(-log p(label))."""
    p = torch.tensor([0.95, 0.95, 0.65, 0.55])
    logits = torch.stack([p.log(), (1 - p).log()], 1)
    labels = torch.tensor([0, 1, 0, 0])
    meter = meter_for([None], classes=2)
    meter.update(logits, labels, 0)
    r = meter.results()[0]
    assert r["ece"] == pytest.approx(42.5, abs=1e-3)
    assert expected_calibration_error(p, torch.tensor([1, 0, 1, 1])) == pytest.approx(0.425)
    assert r["nll"] == pytest.approx(-(math.log(0.95) + math.log(0.05) + math.log(0.65) + math.log(0.55)) / 4,
                                     abs=1e-4)
    assert r["bins"]["images"][14] == 2 and r["bins"]["images"][9] == 1 and r["bins"]["images"][8] == 1


def test_mce_against_alexnets_errors():
    rows = {f"imagenet-c/{c}/{s}": {"top1": 100 - 40 - s} for c in ALEXNET_ERRORS for s in (1, 2)}
    summary = corruption_summary(rows)
    assert summary["corruptions"]["fog"]["error"] == 41.5
    assert summary["corruptions"]["fog"]["ce"] == pytest.approx(41.5 / 81.9324 * 100, abs=1e-3)
    assert summary["mce"] == pytest.approx(np.mean([41.5 / (100 * e) * 100 for e in ALEXNET_ERRORS.values()]),
                                           abs=1e-2)
    partial = corruption_summary({k: v for k, v in rows.items() if "/fog/" in k})
    assert partial["mce"] is None and partial["mce_partial"] == summary["corruptions"]["fog"]["ce"]


def write_image(path, color, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((32, 32, 3), color, np.uint8)
    pixels[k % 32, :] = 255 - pixels[k % 32, :]  # images of a class differ a little
    Image.fromarray(pixels).save(path, quality=95)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """A suite root with every layout, and an exported s2mlpv2_tiny that tells the 12 colours apart (its head fit
    by least squares on its own pooled features) and knows its class names."""
    root = tmp_path_factory.mktemp("suite")
    n = 0
    for c, wnid in enumerate(CLASSES):
        for k in range(4):
            n += 1
            name = f"ILSVRC2012_val_{n:08d}.JPEG"
            write_image(root / "val" / wnid / name, COLORS[c], k)
            v2 = root / "imagenetv2-matched-frequency" / str(c)  # the same images, V2's folder names
            v2.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / "val" / wnid / name, v2 / f"{k}.jpeg")
            write_image(root / "sketch" / wnid / f"{k}.JPEG", COLORS[c], k)
            if c % 3 == 0:  # A and R: 4 of the 12 classes
                write_image(root / "imagenet-a" / wnid / f"{k}.jpg", COLORS[c], k)
                write_image(root / "imagenet-r" / wnid / f"{k}.jpg", COLORS[c], k)
            for corruption in ("fog", "snow"):
                for severity in (1, 2):
                    write_image(root / "imagenet-c" / "weather" / corruption / str(severity) / wnid / f"{k}.JPEG",
                                COLORS[c] if severity == 1 else COLORS[(c + 1) % 12], k)
    # ReaL: the first image's set includes another class, the second has no label (left out)
    real = [[c] for c in range(12) for _ in range(4)]
    real[0], real[1] = [5, 0], []
    (root / "real.json").write_text(json.dumps(real))
    torch.manual_seed(0)
    model = create_model("s2mlpv2_tiny", num_classes=12).eval()
    images = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
                          for c in CLASSES for p in sorted((root / "val" / c).iterdir())]).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features((images - mean) / std), pre_logits=True)
        feats1 = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
        target = torch.eye(12).repeat_interleave(4, 0).double() * 10
        w = torch.linalg.lstsq(feats1, target).solution.T.float()
        model.head.weight.copy_(w[:, :-1])
        model.head.bias.copy_(w[:, -1])
    weights = root.parent / "digits12.safetensors"
    save_exported(weights, "s2mlpv2_tiny", model.state_dict(), {"num_classes": 12, "img_size": 32},
                  class_names=CLASSES)
    return root, weights


def test_suite_layouts_table_json_and_csv(suite, tmp_path):
    from mlflow.tracking import MlflowClient

    root, weights = suite
    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("suite", str(tmp_path / "artifacts"))).info.run_id
    out = run_script("launch/evaluate.py", str(weights), "--config", "s2mlpv2_tiny", "--suite", str(root),
                     "--json", str(tmp_path / "suite.json"), "--results-csv", str(tmp_path / "suite.csv"),
                     "--plots", str(tmp_path / "plots"), "--log-to", run_id, f"tracking.uri={store}",
                     "data.workers=0", nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    result = json.loads((tmp_path / "suite.json").read_text())
    keys = ["val", "imagenetv2-matched-frequency", "sketch", "imagenet-a", "imagenet-r", "imagenet-c"]
    assert [k for k in result if k in keys] == keys
    val = result["val"]
    assert val["images"] == 48 and val["top1"] == 100.0   # the colours are told apart
    # V2's integer folders are class indices: mapped by value it gives val's very figures (by string order,
    # '10' and '11' would take classes 2 and 3's places)
    figures = ("images", "top1", "top5", "ece", "nll")
    assert {k: result["imagenetv2-matched-frequency"][k] for k in figures} == {k: val[k] for k in figures}
    assert result["imagenet-a"]["images"] == 16 and result["imagenet-a"]["top1"] == 100.0
    # ReaL: image 1 has [5, 0] (its prediction, class 0, is in it), image 2 none (left out): 47 labelled, all hits
    assert val["real_top1"] == 100.0
    c = result["imagenet-c"]
    # severity 2 holds every class's images under the next class's colour: all wrong; severity 1 all right
    assert c["images"] == 192 and c["top1"] == 50.0 and c["corruptions"]["fog"]["error"] == 50.0
    assert c["corruptions"]["fog"]["ce"] == pytest.approx(50 / 81.9324 * 100, abs=1e-3) and c["mce"] is None
    for key in keys:
        assert set(result[key]) >= {"top1", "top5", "ece", "nll", "images"}
    rows = list(csv.DictReader(open(tmp_path / "suite.csv")))
    assert [r["benchmark"] for r in rows] == keys
    assert set(rows[0]) >= {"model", "top1", "top5", "param_count", "img_size", "crop_pct", "interpolation"}
    assert rows[0]["model"] == "s2mlpv2_tiny" and rows[0]["img_size"] == "32" and rows[0]["top1"] == "100.000"
    assert len(list((tmp_path / "plots").glob("reliability-*.png"))) == 6
    assert "mCE over the 2 corruptions present" in out.stdout and "restricted to its 4 classes" in out.stdout
    logged = client.get_run(run_id).data.metrics  # --log-to: the figures and the diagrams in that MLflow run
    assert logged["suite/val/top1"] == 100.0 and logged["suite/imagenet-c/top1"] == 50.0
    assert logged["suite/val/real_top1"] == 100.0 and "suite/imagenet-r/ece" in logged
    assert len([a for a in client.list_artifacts(run_id, "suite") if a.path.endswith(".png")]) == 6


def test_wrong_layouts_and_names_are_clear_errors(suite, tmp_path):
    root, weights = suite
    bad = tmp_path / "bad"
    shutil.copytree(root / "imagenetv2-matched-frequency", bad / "imagenetv2-top-images")
    (bad / "imagenetv2-top-images" / "3").rename(bad / "imagenetv2-top-images" / "n00001021")
    with pytest.raises(SuiteError, match=r"ImageNet-V2 class folders are 0..11 .*found n00001021"):
        find_benchmarks(bad, CLASSES)
    with pytest.raises(SuiteError, match="not among the model's 12 classes"):
        find_benchmarks(root, [f"x{i}" for i in range(12)])
    (tmp_path / "odd" / "cifar").mkdir(parents=True)
    with pytest.raises(SuiteError, match=r"odd/cifar matches no benchmark layout.*imagenetv2-\*/"):
        find_benchmarks(tmp_path / "odd", CLASSES)


def test_class_names_travel_with_the_weights(suite, tmp_path):
    _, weights = suite
    model = create_model("s2mlpv2_tiny", checkpoint_path=str(weights))
    assert model.class_names == CLASSES and model.pretrained_cfg["label_names"] == tuple(CLASSES)
    state, header = load_exported(weights)
    old = tmp_path / "old.safetensors"
    save_exported(old, "s2mlpv2_tiny", state, header["model_args"])  # as files were written before
    assert create_model("s2mlpv2_tiny", checkpoint_path=str(old)).class_names is None
    out = run_script("launch/evaluate.py", str(old), "--config", "s2mlpv2_tiny", "--suite", str(tmp_path))
    assert out.returncode == 2 and "carries no class names" in out.stderr and "--class-names" in out.stderr
