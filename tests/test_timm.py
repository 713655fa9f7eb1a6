"""Our models as timm models: registered in timm's registry, built and loaded by timm.create_model, and timm's
own model test suite (tests/test_models.py of the installed timm's source distribution, downloaded, not copied)
run against our variants."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile

import pytest
import timm
import torch

from conftest import REPO
from models import create_model, list_models, model_info
from models.exported import save_exported

# The suite runs timm 1.0.31's tests/test_models.py on the smallest full-size variant and the CPU variant of each
# family (the larger variants are the same classes with other widths and depths; all 8 passed, 59 tests, 75 s:
# docs/timm.md has the command). It collects: forward, backward, TorchScript, fx forward, fx backward,
# fx + TorchScript for the 4; default_cfgs (S2-MLPv2) or default_cfgs_non_std (CS-Mixer: timm files '*mixer_*'
# as non-standard); features for the 2 S2-MLPv2 (the same filter leaves CS-Mixer out).
TIMM_SUITE_VARIANTS = "cs_mixer_t or s2mlpv2_small or s2mlpv2_tiny"  # -k: cs_mixer_t also matches cs_mixer_tiny
TIMM_SUITE_TESTS = 6 * 4 + 4 + 2


def test_every_variant_is_in_timms_registry_with_its_config():
    assert sorted(timm.list_models("cs_mixer*") + timm.list_models("s2mlpv2*")) == list_models()
    for name in list_models():
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        info = model_info(name)
        assert cfg["input_size"] == (3, info.img_size, info.img_size) and cfg["crop_pct"] == info.crop_pct
        assert cfg["interpolation"] == "bicubic" and cfg["mean"] == info.mean and cfg["classifier"] == "head"
        assert cfg.get("fixed_input_size", False) == (info.family == "cs_mixer")
    model = timm.create_model("s2mlpv2_tiny", num_classes=3, drop_path_rate=0.1)  # timm's knob names
    assert model.head.out_features == 3 and max(m.p for m in model.modules() if hasattr(m, "p")) == pytest.approx(0.1)
    with pytest.raises(TypeError):
        timm.create_model("cs_mixer_tiny", not_a_model_arg=1)


def test_registration_happens_whichever_is_imported_first():
    """`import models` before timm registers on timm's import (a one-shot hook); after timm, at once. A process
    that never imports timm does not import it."""
    code = ("import sys, models; assert 'timm' not in sys.modules; import timm; "
            "print(len(timm.list_models('cs_mixer*')), len(timm.list_models('s2mlpv2*')))")
    for program in (code, "import timm, models; print(len(timm.list_models('cs_mixer*')), "
                          "len(timm.list_models('s2mlpv2*')))"):
        out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["6", "3"]


@pytest.mark.parametrize("name", ["cs_mixer_tiny", "s2mlpv2_tiny"])
def test_timm_loads_an_exported_file_as_create_model_does(tmp_path, name):
    """timm.create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...)) reads num_classes / img_size from
    the file's header, loads every weight (the classifier too) and gives the same logits as our create_model;
    resolve_data_config gives the variant's evaluation transform."""
    torch.manual_seed(0)
    trained = create_model(name, num_classes=10, img_size=64)
    path = tmp_path / f"{name}.safetensors"
    save_exported(path, name, trained.state_dict(), {"num_classes": 10, "img_size": 64}, step=3)
    ours = create_model(name, checkpoint_path=str(path)).eval()
    theirs = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    data = timm.data.resolve_data_config({}, model=theirs)
    assert data["input_size"] == (3, 64, 64) and data["crop_pct"] == model_info(name).crop_pct
    assert data["interpolation"] == "bicubic"
    finetune = timm.create_model(name, pretrained=True, num_classes=4, pretrained_cfg_overlay=dict(file=str(path)))
    assert finetune.head.out_features == 4  # timm's rule: another class count drops the classifier, keeps the rest
    assert torch.equal(finetune.patch_embed.weight if name.startswith("s2") else finetune.stem.convs[0].weight,
                       trained.patch_embed.weight if name.startswith("s2") else trained.stem.convs[0].weight)
    with pytest.raises(ValueError, match="holds weights of"):
        timm.create_model("cs_mixer_t" if name.startswith("s2") else "s2mlpv2_small", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))


def test_s2mlpv2_files_of_the_old_layout_still_load(tmp_path):
    """Before the downsamples moved into their stages they were `downsamples.i`, the blocks one place lower."""
    torch.manual_seed(0)
    model = create_model("s2mlpv2_tiny", num_classes=10).eval()

    def old_name(key: str) -> str:
        if m := re.match(r"stages\.(\d+)\.0\.(weight|bias)$", key):
            return f"downsamples.{int(m[1]) - 1}.{m[2]}"
        if m := re.match(r"stages\.(\d+)\.(\d+)\.(.*)", key):
            return f"stages.{m[1]}.{int(m[2]) - 1}.{m[3]}"
        return key
    old = {old_name(k): v for k, v in model.state_dict().items()}
    assert "downsamples.0.weight" in old and "stages.0.0.norm1.weight" in old
    path = tmp_path / "old.safetensors"
    save_exported(path, "s2mlpv2_tiny", old, {"num_classes": 10, "img_size": 32})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(create_model("s2mlpv2_tiny", checkpoint_path=str(path)).eval()(x), model(x))
        assert torch.equal(timm.create_model("s2mlpv2_tiny", pretrained=True,
                                             pretrained_cfg_overlay=dict(file=str(path))).eval()(x), model(x))


def timm_tests_dir() -> str:
    """timm's tests/ from the source distribution of the installed version, downloaded once into the venv."""
    version = timm.__version__
    cache = os.path.join(sys.prefix, "timm-sdist")
    tests = os.path.join(cache, f"timm-{version}", "tests")
    if not os.path.isfile(os.path.join(tests, "test_models.py")):
        os.makedirs(cache, exist_ok=True)
        get = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              f"timm=={version}", "-d", cache, "-q", "--disable-pip-version-check"],
                             capture_output=True, text=True, timeout=300)
        archive = os.path.join(cache, f"timm-{version}.tar.gz")
        assert get.returncode == 0 and os.path.isfile(archive), \
            f"could not download timm {version}'s source distribution: {get.stderr[-1500:]}"
        with tarfile.open(archive) as tar:
            tar.extractall(cache, members=[m for m in tar.getmembers() if "/tests/" in m.name or
                                           m.name.endswith("pyproject.toml")], filter="data")
    return tests


@pytest.mark.slow
def test_timms_own_model_tests_pass_on_our_variants():
    """pytest <timm sdist>/tests/test_models.py -k TIMM_SUITE_VARIANTS, with our package loaded as a plugin (-p
    models) so the variants are registered when timm's test module lists them; every collected test passes."""
    tests = timm_tests_dir()
    out = subprocess.run([sys.executable, "-m", "pytest", "tests/test_models.py", "-k", TIMM_SUITE_VARIANTS,
                          "-p", "models", "-p", "no:cacheprovider", "-q", "-W", "ignore", "--no-header", "-rfE"],
                         cwd=os.path.dirname(tests), capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"})
    summary = out.stdout.strip().splitlines()[-1]
    print(summary)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary)[1])
    assert passed == TIMM_SUITE_TESTS and not re.search(r"failed|error|skipped", summary), summary
