"""End-to-end runs of launch/train.py on real JPEGs (the digits set), 1 and 2 processes over gloo."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from conftest import REPO, run_script

TRAIN = str(REPO / "launch/train.py")


def losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r" loss ([0-9.]+) ", stdout)]


@pytest.mark.slow
def test_two_process_training_learns_and_saves_the_run(tmp_path, digits_root):
    result = run_script(TRAIN, "--config", "cs_mixer_tiny", f"data.root={digits_root}",
                        f"train.output_dir={tmp_path}", "train.run_name=two", "train.epochs=4",
                        "train.log_every=5", nproc=2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2, batch 64/rank x accum 1 = global 128" in result.stdout
    top1 = float(result.stdout.strip().splitlines()[-1].removeprefix("val_top1="))
    assert top1 > 80, result.stdout  # 4 epochs on digits: a model that learns gets well above chance (10 %)
    run = tmp_path / "two"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["global_batch"] == 128 and saved["optim"]["lr"] == 0.002
    state = torch.load(run / "model_final.pt")
    assert "head.weight" in state and state["head.weight"].shape == (10, 256)


def test_same_seed_same_losses(tmp_path, digits_root):
    args = ["--config", "s2mlpv2_tiny", f"data.root={digits_root}", f"train.output_dir={tmp_path}",
            "train.max_steps=6", "train.log_every=1", "data.workers=1"]
    first = run_script(TRAIN, *args, "train.run_name=a", cwd=tmp_path)
    second = run_script(TRAIN, *args, "train.run_name=b", cwd=tmp_path)
    other = run_script(TRAIN, *args, "train.run_name=c", "train.seed=1", cwd=tmp_path)
    for r in (first, second, other):
        assert r.returncode == 0, r.stderr[-3000:]
    assert len(losses(first.stdout)) == 6
    assert losses(first.stdout) == losses(second.stdout)
    assert losses(first.stdout) != losses(other.stdout)


@pytest.mark.parametrize("override, message", [
    ("train.model_ema=true", "does not implement train.model_ema=true yet"),
    ("data.backend=ffcv", "digits/train.beton does not exist"),
    ("data.root=/nonexistent/digits", "/nonexistent/digits/train does not exist"),
])
def test_unrunnable_settings_fail_early_and_create_nothing(tmp_path, override, message):
    result = run_script(TRAIN, "--config", "cs_mixer_tiny", f"train.output_dir={tmp_path}/runs", override,
                        cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_too_large_batch_fails_early(tmp_path, digits_root):
    result = run_script(TRAIN, "--config", "cs_mixer_tiny", f"data.root={digits_root}", "train.batch_size=2000",
                        f"train.output_dir={tmp_path}/runs", cwd=tmp_path)
    assert result.returncode == 2 and "1442 training samples cannot fill one batch of 2000" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_model_benchmark_prints_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script(str(REPO / "launch/bench_model.py"), "--model", "cs_mixer_tiny", "--batch", "4",
                        "--steps", "2", "--warmup", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert row["model"] == "cs_mixer_tiny" and row["batch"] == 4 and row["images_per_s"] > 0
    assert "cs_mixer_tiny" in result.stdout
