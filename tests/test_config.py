"""The config system: loading, inheritance, overrides, validation, --print-config."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_script
from trainer.config import CONFIG_DIR, ConfigError, find_config, load_config, parse_override, plan_batch, resolved

VARIANTS = ["cs_mixer_tiny", "cs_mixer_t", "cs_mixer_s", "cs_mixer_b", "cs_mixer_l",
            "s2mlpv2_tiny", "s2mlpv2_small", "s2mlpv2_medium"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_config_loads_and_names_its_model(name):
    cfg = load_config(find_config(name))
    assert cfg.model.name == name
    resolved(cfg, world_size=8)


def test_cs_mixer_l_is_the_full_recipe():
    cfg = resolved(load_config(CONFIG_DIR / "cs_mixer_l.yaml"), world_size=8)
    assert (cfg.train.global_batch, cfg.train.batch_size, cfg.train.grad_accum) == (1024, 128, 1)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert (cfg.train.epochs, cfg.schedule.warmup_epochs, cfg.schedule.warmup_lr) == (300, 20, 1e-6)
    assert (cfg.optim.weight_decay, cfg.optim.clip_grad, cfg.schedule.min_lr) == (0.05, 5.0, 1e-5)
    assert cfg.optim.betas == [0.9, 0.999] and cfg.optim.eps == 1e-8
    assert (cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.mixup_switch_prob, cfg.aug.smoothing) == (0.8, 1.0, 0.5, 0.1)
    assert (cfg.aug.auto_augment, cfg.aug.reprob, cfg.aug.remode) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel")
    assert cfg.model.drop_path == 0.5 and cfg.data.crop_pct == 0.875 and cfg.data.interpolation == "bicubic"
    assert cfg.deepspeed.bf16 and not cfg.train.model_ema


def test_s2mlpv2_recipe_differs_where_the_spec_says():
    small = resolved(load_config(CONFIG_DIR / "s2mlpv2_small.yaml"), world_size=16)
    medium = load_config(CONFIG_DIR / "s2mlpv2_medium.yaml")
    assert small.train.global_batch == 2048 and small.optim.lr == pytest.approx(2e-3)
    assert small.schedule.warmup_epochs == 10 and small.optim.clip_grad is None
    assert small.train.model_ema and small.train.model_ema_decay == 0.99996
    assert small.model.drop_path == 0.1 and small.data.crop_pct == 0.875 and medium.data.crop_pct == 0.9
    drop = {v: load_config(CONFIG_DIR / f"cs_mixer_{v}.yaml").model.drop_path for v in "tsbl"}
    assert drop == {"t": 0.1, "s": 0.2, "b": 0.3, "l": 0.5}


def test_inheritance_order_and_list_of_bases(tmp_path):
    write(tmp_path / "a.yaml", "optim: {lr: 0.1, weight_decay: 0.5}\ntrain: {batch_size: 4}\n")
    write(tmp_path / "b.yaml", "base: a.yaml\noptim: {lr: 0.2}\n")
    write(tmp_path / "c.yaml", "optim: {eps: 0.001, lr: 0.3}\n")
    child = write(tmp_path / "child.yaml", "base: [b.yaml, c.yaml]\noptim: {weight_decay: 0.0}\n")
    cfg = load_config(child)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.eps) == (0.3, 0.0, 0.001)
    assert cfg.train.batch_size == 4
    assert load_config(tmp_path / "b.yaml").optim.lr == 0.2


def test_base_loop_and_missing_base_are_named(tmp_path):
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "x.yaml")
    write(tmp_path / "z.yaml", "base: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "z.yaml")


def test_overrides_are_typed_against_the_schema():
    cfg = load_config(CONFIG_DIR / "cs_mixer_tiny.yaml",
                      ["optim.lr=2e-3", "train.epochs=7", "deepspeed.bf16=false", "optim.clip_grad=null",
                       "data.scale=[0.25, 1]", "train.run_name=123", "schedule.warmup_epochs=2",
                       "data.backend=synthetic"])
    assert cfg.optim.lr == 0.002 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.deepspeed.bf16 is False and cfg.optim.clip_grad is None
    assert cfg.data.scale == [0.25, 1.0] and all(isinstance(v, float) for v in cfg.data.scale)
    assert cfg.train.run_name == "123" and cfg.schedule.warmup_epochs == 2.0
    assert cfg.data.backend == "synthetic"


def test_last_override_wins():
    cfg = load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", ["train.seed=1", "train.seed=5"])
    assert cfg.train.seed == 5


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean optim.lr?)"),
    ("optm.lr=1", "did you mean optim.lr?"),
    ("train.lr=1", "did you mean optim.lr?"),
    ("aug.mixupp=0.2", "did you mean aug.mixup?"),
    ("train.epochs=ten", "train.epochs='ten' has the wrong type: expected an integer"),
    ("train.epochs=1.5", "expected an integer"),
    ("deepspeed.bf16=maybe", "deepspeed.bf16='maybe' has the wrong type: expected true/false"),
    ("optim.lr=fast", "optim.lr='fast' has the wrong type: expected a number or null"),
    ("data.backend=tfrecord", "expected one of 'dali', 'ffcv', 'folder', 'synthetic'"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage=4 is out of range: must be <= 3"),
    ("deepspeed.zero_stage=-1", "must be >= 0"),
    ("optim.lr=0", "optim.lr=0.0 is out of range: must be > 0.0"),
    ("aug.reprob=1.5", "aug.reprob=1.5 is out of range: must be <= 1.0"),
    ("data.scale=[0.5]", "data.scale=[0.5]: expected [low, high]"),
    ("data.scale=0.5", "expected a list of a number"),
    ("model.name=cs_mixer_xl", "model.name='cs_mixer_xl' is not a known model (did you mean cs_mixer_l?)"),
    ("aug.auto_augment=randaug", "aug.auto_augment='randaug' is not understood"),
    ("optimlr=1", "is not of the form section.key=value"),
    ("optim.lr", "is not of the form section.key=value"),
    ("schedule.warmup_epochs=20", "must be fewer than train.epochs"),
    ("deepspeed.config=/nonexistent/ds.json", "deepspeed.config='/nonexistent/ds.json': file not found"),
])
def test_bad_overrides_name_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", [override])
    assert message in str(err.value)


def test_bad_yaml_file_errors_name_the_file(tmp_path):
    bad_key = write(tmp_path / "bad_key.yaml", "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=f"{bad_key}: unknown config key 'optim.learning_rate'"):
        load_config(bad_key)
    bad_section = write(tmp_path / "bad_section.yaml", "optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.lr' \\(did you mean optim.lr\\?\\)"):
        load_config(bad_section)
    bad_type = write(tmp_path / "bad_type.yaml", "train:\n  batch_size: [64]\n")
    with pytest.raises(ConfigError, match=f"{bad_type}: train.batch_size=\\[64\\] has the wrong type"):
        load_config(bad_type)
    not_mapping = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(not_mapping)
    broken = write(tmp_path / "broken.yaml", "train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="config file not found: cs_mixer_ll \\(did you mean cs_mixer_l\\?\\)"):
        find_config("cs_mixer_ll")


def test_parse_override_reads_yaml_values():
    assert parse_override("optim.betas=[0.9, 0.95]") == ("optim.betas", [0.9, 0.95])
    assert parse_override("train.max_steps=null") == ("train.max_steps", None)
    assert parse_override(" train.seed = 3") == ("train.seed", 3)


def test_batch_plan_follows_deepspeed_rules():
    cfg = load_config(CONFIG_DIR / "cs_mixer_l.yaml")
    p = plan_batch(cfg, world_size=2)
    assert (p.batch_size, p.grad_accum, p.global_batch) == (128, 4, 1024) and p.lr == pytest.approx(1e-3)
    cfg = load_config(CONFIG_DIR / "cs_mixer_l.yaml", ["train.global_batch=null", "train.grad_accum=2"])
    p = plan_batch(cfg, world_size=4)  # global batch follows the GPUs, lr follows the linear rule
    assert p.global_batch == 1024 and p.lr == pytest.approx(1e-3)
    p = plan_batch(cfg, world_size=2)
    assert p.global_batch == 512 and p.lr == pytest.approx(5e-4) and "linear rule" in p.lr_rule
    pinned = load_config(CONFIG_DIR / "cs_mixer_l.yaml", ["optim.lr=3e-3", "train.global_batch=null"])
    assert plan_batch(pinned, world_size=3).lr == 3e-3 and "pinned" in plan_batch(pinned, 3).lr_rule
    cfg = load_config(CONFIG_DIR / "cs_mixer_l.yaml", ["train.batch_size=null", "train.grad_accum=2"])
    assert plan_batch(cfg, world_size=4).batch_size == 128


@pytest.mark.parametrize("world_size, batch_size, grad_accum", [(1, 128, 8), (8, 128, 1), (16, 64, 1), (32, 32, 1),
                                                                 (64, 16, 1)])
def test_batch_size_is_an_upper_bound_when_the_global_batch_is_fixed(world_size, batch_size, grad_accum):
    """`sbatch --nodes=4` on the cs_mixer_l recipe must keep global batch 1024, not fail."""
    p = plan_batch(load_config(CONFIG_DIR / "cs_mixer_l.yaml"), world_size)
    assert (p.batch_size, p.grad_accum, p.global_batch) == (batch_size, grad_accum, 1024)
    p = plan_batch(load_config(CONFIG_DIR / "cs_mixer_l.yaml", ["train.batch_size=48"]), 2)
    assert (p.batch_size, p.grad_accum) == (32, 16)  # the largest divisor of 512 that is <= 48


def test_batch_plan_mismatches_fail_with_the_numbers():
    cfg = load_config(CONFIG_DIR / "cs_mixer_l.yaml", ["train.grad_accum=2"])
    with pytest.raises(ConfigError, match="128 x train.grad_accum=2 x world size 8 = 2048, not train.global_batch=1024"):
        plan_batch(cfg, world_size=8)
    with pytest.raises(ConfigError, match="global_batch=1024 is not divisible by the world size 3"):
        plan_batch(load_config(CONFIG_DIR / "cs_mixer_l.yaml"), world_size=3)
    with pytest.raises(ConfigError, match="set train.batch_size"):
        load_config(CONFIG_DIR / "cs_mixer_l.yaml", ["train.batch_size=null", "train.global_batch=null"])


def test_print_config_prints_the_resolved_recipe():
    result = run_script("launch/train.py", "--config", "configs/cs_mixer_l.yaml", "--print-config")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "linear rule" in lines[0] and "= 0.001" in lines[0]
    cfg = yaml.safe_load(result.stdout)
    assert cfg["train"]["global_batch"] == 1024 and cfg["optim"]["lr"] == 0.001
    assert cfg["train"]["epochs"] == 300 and cfg["schedule"]["warmup_epochs"] == 20
    assert cfg["optim"]["weight_decay"] == 0.05 and cfg["model"]["name"] == "cs_mixer_l"
    assert set(cfg) == {"model", "data", "aug", "optim", "schedule", "train", "deepspeed", "checkpoint", "tracking",
                        "eval", "distill"}


def test_print_config_with_override_and_config_name():
    result = run_script("launch/train.py", "--config", "s2mlpv2_small", "train.epochs=30", "--print-config")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["train"]["epochs"] == 30 and cfg["optim"]["lr"] == 0.002


def test_unknown_override_exits_nonzero_with_one_line(tmp_path):
    result = run_script(str(REPO / "launch/train.py"), "--config", str(REPO / "configs/cs_mixer_l.yaml"),
                        "optim.lrr=1", "--print-config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: command line: unknown config key 'optim.lrr' (did you mean optim.lr?)"]


def test_failed_validation_creates_nothing_on_disk(tmp_path):
    """A training run (not --print-config) that fails validation leaves the disk untouched."""
    for bad in ("optim.lrr=1", "deepspeed.zero_stage=9", "train.grad_accum=3"):
        result = run_script(str(REPO / "launch/train.py"), "--config", str(REPO / "configs/cs_mixer_l.yaml"),
                            bad, f"train.output_dir={tmp_path}/runs", cwd=tmp_path)
        assert result.returncode == 2, (bad, result.stderr)
        assert result.stderr.startswith("error: ")
        assert os.listdir(tmp_path) == [], (bad, os.listdir(tmp_path))


def test_dry_run_prints_the_plan_for_the_slurm_world_size():
    result = run_script("launch/train.py", "--config", "cs_mixer_l", "--dry-run", "data.root=/data/imagenet",
                        env={"SLURM_NTASKS": "16", "WORLD_SIZE": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[plan] cs_mixer_l: world size 16; batch 64/rank x accum 1 x 16 ranks = global 1024")
    assert "lr 0.001" in result.stdout and "ZeRO stage 2; bf16 autocast; data dali at /data/imagenet" in result.stdout
