"""The trainer core: RunState, the sample arithmetic of resuming at another world size, one save per
step, write-order retention, checkpoints that survive SIGKILL at any moment of a save, rollback
after a non-finite loss, and validation of the merged config (YAML + overrides + DeepSpeed JSON)."""
from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from data_pipeline.sharding import epoch_end, epoch_permutation, resumed_epoch_end, train_shard
from models.exported import load_exported
from trainer.config import CONFIG_DIR, ConfigError, load_config, plan_run
from trainer.ds_config import bucket_size
from trainer.state import RunState

TRAIN = str(REPO / "launch/train.py")


def step_losses(stdout: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+ loss ([0-9.]+)", stdout)}


def digits_run(tmp_path, digits_root, name, *overrides, nproc=0, env=None, config="cs_mixer_tiny"):
    args = [TRAIN, "--config", config, f"data.root={digits_root}", f"train.output_dir={tmp_path}",
            f"train.run_name={name}", "train.log_every=1", "data.workers=1", "tracking.enabled=false", *overrides]
    return run_script(*args, nproc=nproc, cwd=tmp_path, env=env)


# ----------------------------------------------------------------------------- sample arithmetic

def usage_counts(n, seed, before, after, stop_step):
    """Images of the interrupted epoch read 0, 1, 2+ times: (world, batch, accum) before and after
    a stop after `stop_step` optimizer steps."""
    (w0, b0, a0), (w1, b1, a1) = before, after
    g0, g1 = w0 * b0 * a0, w1 * b1 * a1
    planned = epoch_end(n, g0)
    start = stop_step * g0
    end = resumed_epoch_end(n, start, planned, g1)
    reads = np.concatenate([train_shard(n, r, w0, b0, seed, 3, 0, start) for r in range(w0)]
                           + [train_shard(n, r, w1, b1, seed, 3, start, end) for r in range(w1)])
    counts = np.bincount(reads, minlength=n)
    epoch = epoch_permutation(n, seed, 3)[:planned]  # what an uninterrupted epoch reads
    c = counts[epoch]
    return int((c == 0).sum()), int((c == 1).sum()), int((c >= 2).sum()), planned, int(counts.max())


@pytest.mark.parametrize("before, after, stops", [
    ((2, 48, 1), (1, 48, 2), (1, 7, 11)), ((1, 48, 2), (2, 48, 1), (1, 7, 11)),  # the real runs below
    ((2, 48, 1), (3, 32, 1), (1, 7, 11)),
    ((8, 128, 1), (16, 64, 1), (1, 7, 200)),  # the recipe's global batch 1024, 8 -> 16 GPUs
    ((16, 64, 1), (12, 64, 1), (3, 6, 201)),  # global batch 1024 -> 768: the epoch's tail tops the last step up
    ((16, 64, 1), (12, 128, 2), (3, 6, 201)),
])
def test_each_image_of_the_interrupted_epoch_is_read_once_at_any_world_size(before, after, stops):
    n = 1_281_167 if before[0] >= 8 else 1442  # ImageNet-1k's train set; the digits set
    for stop_step in stops:
        zero, once, twice, planned, most = usage_counts(n, 0, before, after, stop_step)
        assert (zero, once, twice) == (0, planned, 0), (before, after, stop_step)
        assert most == 1  # none of the topped-up tail images twice either
        print(f"{before} -> {after} after {stop_step} steps: 0x {zero}, 1x {once}, 2x {twice} of {planned}")


def test_where_the_tail_cannot_top_up_the_last_step_less_than_a_step_is_left_out():
    """16 -> 12 GPUs at 64 per GPU after 1 step: 1,280,000 planned images left, 512 more than whole steps
    of 768, and only 143 unread tail images to top a 1,668th step up: that partial step is dropped,
    as an uninterrupted epoch drops its tail (nothing is read twice)."""
    zero, once, twice, planned, most = usage_counts(1_281_167, 0, (16, 64, 1), (12, 64, 1), 1)
    assert (zero, once, twice, most) == (512, planned - 512, 0, 1)


def test_run_state_windows_skip_and_roll_over():
    s = RunState(epoch=2, epoch_sample=96, epoch_end=960)
    assert s.windows() == [(96, 960)] and not s.epoch_done
    s.skip = [[2, 192, 384], [1, 0, 960]]  # the other epoch's window does not apply
    assert s.windows() == [(96, 192), (384, 960)]
    s.epoch_sample = 192
    assert s.windows() == [(384, 960)]
    s.skip.append([2, 864, 960])
    s.epoch_sample = 864
    assert s.windows() == [] and s.epoch_done  # only a skipped window left: the epoch is over
    s.next_epoch(960)
    assert (s.epoch, s.epoch_sample, s.windows()) == (3, 0, [(0, 960)])
    restored = RunState()
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored == s


# ----------------------------------------------------------------------------- knobs

def test_optimizer_and_schedule_knobs_are_read():
    from models import create_model
    from trainer.optim import build_optimizer, build_scheduler, lr_at

    model = create_model("cs_mixer_tiny", img_size=32)
    kinds = {}
    for opt in ("adamw", "adam", "sgd", "momentum"):
        o = build_optimizer(load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", [f"optim.opt={opt}"]), model, 0.1)
        kinds[opt] = (type(o).__name__, o.defaults.get("nesterov"))
    assert kinds == {"adamw": ("AdamW", None), "adam": ("Adam", None), "sgd": ("SGD", True), "momentum": ("SGD", False)}
    common = dict(peak_lr=1.0, total_steps=100, warmup_steps=10, warmup_lr=0.0, min_lr=0.01)
    assert lr_at(5, sched="cosine", **common) == pytest.approx(0.5)
    assert lr_at(55, sched="cosine", **common) == pytest.approx(0.505)
    assert lr_at(55, sched="const", **common) == 1.0
    assert [lr_at(s, sched="step", decay_steps=20, decay_rate=0.5, **common) for s in (10, 29, 30, 50)] == \
        [1.0, 1.0, 0.5, 0.25]
    cfg = load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", ["schedule.sched=step", "schedule.decay_epochs=2",
                                                          "schedule.decay_rate=0.1", "schedule.warmup_epochs=0"])
    opt = build_optimizer(cfg, model, 1.0)
    sched = build_scheduler(cfg, opt, 1.0, steps_per_epoch=5, total_steps=100)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0] * 10 + [0.1])
    # wsd: warmup, peak until the last 40 steps, then to min_lr along the shape (t = progress of the decay)
    for shape, fall in (("linear", lambda t: t), ("1-sqrt", math.sqrt), ("cosine", lambda t: (1 - math.cos(math.pi * t)) / 2)):
        got = [lr_at(s, sched="wsd", cooldown_steps=40, cooldown_shape=shape, **common) for s in (5, 10, 59, 60, 70, 100)]
        assert got == pytest.approx([0.5, 1.0, 1.0, 1.0, 1 - 0.99 * fall(0.25), 0.01]), shape
    cfg = load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", ["schedule.sched=wsd", "schedule.cooldown_fraction=0.25",
                                                          "schedule.warmup_epochs=0", "schedule.min_lr=0"])
    opt = build_optimizer(cfg, model, 1.0)
    sched = build_scheduler(cfg, opt, 1.0, steps_per_epoch=5, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:76] == pytest.approx([1.0] * 76) and lrs[84] == pytest.approx(1 - math.sqrt(9 / 25))
    with pytest.raises(ConfigError, match="schedule.sched=wsd needs its decay phase"):
        plan_run(load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", ["schedule.sched=wsd"]), 1, check_data=False)


# ----------------------------------------------------------------------------- validation

def test_zero3_with_ema_is_refused_whatever_sets_the_stage(tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", ["train.model_ema=true", f"deepspeed.config={ds_json}"])
    assert cfg.deepspeed.zero_stage == 2  # the YAML says 2; the JSON wins
    with pytest.raises(ConfigError, match=rf"ZeRO stage is 3 \(set by {ds_json}\)"):
        plan_run(cfg, 2)
    result = run_script(TRAIN, "--config", "cs_mixer_tiny", "train.model_ema=true", f"deepspeed.config={ds_json}",
                        f"train.output_dir={tmp_path}/runs", cwd=tmp_path)
    assert result.returncode == 2 and "ZeRO stage is 3" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bucket_sizes_respect_deepspeeds_alignment():
    assert bucket_size(1_765_003, 500_000_000) % 2 == 0 and bucket_size(1_765_003, 500_000_000) >= 1_765_003
    assert bucket_size(10**10, 500_000_000) == 500_000_000


def test_zero_1_2_over_gloo_reduce_partitions_to_their_owners(tmp_path):
    """On CPU (gloo) ZeRO 1/2 reduce each gradient partition to its owner instead of all-reducing every
    bucket (use_multi_rank_bucket_allreduce=false, measured faster here); a user's DeepSpeed JSON wins."""
    def zero(*overrides):
        cfg = load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", ["data.backend=synthetic", *overrides])
        return plan_run(cfg, 2, 1000).ds_config["zero_optimization"]

    assert not torch.cuda.is_available()
    assert zero("deepspeed.zero_stage=1")["use_multi_rank_bucket_allreduce"] is False
    assert zero("deepspeed.zero_stage=2")["use_multi_rank_bucket_allreduce"] is False
    assert "use_multi_rank_bucket_allreduce" not in zero("deepspeed.zero_stage=0")
    user = tmp_path / "ds.json"
    user.write_text('{"zero_optimization": {"use_multi_rank_bucket_allreduce": true}}')
    assert zero("deepspeed.zero_stage=2", f"deepspeed.config={user}")["use_multi_rank_bucket_allreduce"] is True


ODD_PARAMS = """
import json
import torch
from models import count_params
from trainer.build import build_engine, build_loss, build_model
from trainer.config import CONFIG_DIR, load_config, plan_run
from trainer.distributed import init_distributed, shutdown

env = init_distributed()
for stage in (1, 2, 3):
    cfg = load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", ["model.num_classes=3", f"deepspeed.zero_stage={stage}",
                                                          "data.backend=synthetic", "train.batch_size=4"])
    model = build_model(cfg)
    assert count_params(model) % 2 == 1
    engine = build_engine(plan_run(cfg, env.world_size, count_params(model)), model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.bfloat16)
    y = torch.nn.functional.one_hot(torch.arange(4) % 3, 3).float()
    losses = []
    for _ in range(3):
        loss = build_loss()(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if env.rank == 0:
        print(f"stage {stage}: {count_params(model)} params, losses {losses}", flush=True)
        from deepspeed.runtime.torch_autocast import get_comm_dtype
        kinds = {name: type(m).__name__ for name, m in engine.module.named_modules()}
        comm = sorted({(kinds[n.rsplit(".", 1)[0]], str(get_comm_dtype(p)).split(".")[1])
                       for n, p in engine.module.named_parameters()})
        print(f"stage {stage} reduces: {json.dumps(comm)}", flush=True)
    engine.destroy()
shutdown()
"""


@pytest.mark.slow
def test_odd_parameter_counts_train_at_every_zero_stage(tmp_path):
    """model.num_classes=3 gives cs_mixer_tiny an odd parameter count: DeepSpeed's init asserted on the
    bucket sizes at ZeRO 1/2. The trainer's own builder, two processes, one DeepSpeed start-up."""
    script = tmp_path / "odd.py"
    script.write_text(ODD_PARAMS)
    result = run_script(str(script), nproc=2, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in (1, 2, 3):
        losses = json.loads(re.search(rf"stage {stage}: \d+ params, losses (\[.*\])", result.stdout).group(1))
        assert all(np.isfinite(losses)) and losses[-1] < losses[0], (stage, losses)
        # what docs/benchmarks.md's precision section says: under the default bf16 autocast, ZeRO reduces the gradients
        # of Linear and Conv parameters in bf16 (DeepSpeed's torch_autocast), the others in fp32
        comm = json.loads(re.search(rf"stage {stage} reduces: (\[.*\])", result.stdout).group(1))
        assert sorted(map(tuple, comm)) == [("Conv2d", "bfloat16"), ("LayerNorm", "float32"), ("Linear", "bfloat16"),
                                            ("SpatialChannelMixer", "float32")], comm


# ----------------------------------------------------------------------------- saves and retention

RECORD_SAVES = """
import os, runpy, sys
from deepspeed.runtime.engine import DeepSpeedEngine

real = DeepSpeedEngine.save_checkpoint

def recorded(self, save_dir, tag=None, *args, **kwargs):
    with open(os.environ["SAVES_LOG"], "a") as f:
        f.write(f"{tag}\\n")
    return real(self, save_dir, tag, *args, **kwargs)

DeepSpeedEngine.save_checkpoint = recorded
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_step_is_saved_once_when_a_save_step_ends_an_epoch(tmp_path, digits_root):
    """22 steps per epoch, checkpoint.every_steps=11: step 22 is both a save step and the epoch end. It was
    written twice, the second time deleting the directory `latest` named before replacing it. The
    DeepSpeed JSON sets ZeRO 1 (the YAML says 2): the checkpoint records what the engine ran."""
    wrapper, saves = tmp_path / "record_saves.py", tmp_path / "saves.log"
    wrapper.write_text(RECORD_SAVES)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    result = run_script(str(wrapper), TRAIN, "--config", "cs_mixer_tiny", f"data.root={digits_root}",
                        f"train.output_dir={tmp_path}", "train.run_name=once", "train.max_steps=23", "train.log_every=11",
                        "checkpoint.every_steps=11", "data.workers=1", "tracking.enabled=false",
                        f"deepspeed.config={ds_json}", cwd=tmp_path, env={"SAVES_LOG": str(saves)})
    assert result.returncode == 0, result.stderr[-3000:]
    written = Counter(saves.read_text().split())
    assert written == {"step_00000011.partial": 1, "step_00000022.partial": 1, "step_00000023.partial": 1}, written
    meta = json.loads((tmp_path / "once/checkpoints/step_00000022/meta.json").read_text())
    assert meta["engine"]["zero_stage"] == 1 and meta["epoch_end_save"]
    assert meta["state"]["epoch"] == 1 and meta["state"]["epoch_sample"] == 0


def test_retention_follows_write_order_after_resuming_an_older_checkpoint(tmp_path, digits_root):
    """Steps 4, 5, 6 on disk; train.resume=step_4 writes step 5 again with keep_last=1. Sorting by name
    deleted the checkpoint just written, with `latest` pointing at it."""
    first = digits_run(tmp_path, digits_root, "ret", "train.max_steps=6", "checkpoint.every_steps=1",
                       "checkpoint.keep_last=3")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = tmp_path / "ret/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000004", "step_00000005", "step_00000006"]
    again = digits_run(tmp_path, digits_root, "ret", "train.max_steps=5", "checkpoint.every_steps=1",
                       "checkpoint.keep_last=1", f"train.resume={ckpts}/step_00000004")
    assert again.returncode == 0, again.stderr[-3000:]
    latest = (ckpts / "latest").read_text().strip()
    assert (ckpts / latest / "meta.json").is_file(), f"latest names {latest}, which retention deleted"
    assert latest == "step_00000005-2"  # a name is never reused: no directory is ever replaced
    assert json.loads((ckpts / latest / "meta.json").read_text())["state"]["step"] == 5
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [latest]
    cont = digits_run(tmp_path, digits_root, "ret", "train.max_steps=6")
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert f"[resume] {ckpts}/step_00000005-2: step 5" in cont.stdout and sorted(step_losses(cont.stdout)) == [6]


@pytest.mark.slow
def test_keep_best_and_milestones(tmp_path, digits_root):
    """4 epochs of 3 steps, a save every step, keep_last=1: the 2 best evaluated epoch ends and every
    2nd epoch's end stay as well."""
    r = digits_run(tmp_path, digits_root, "keep", "train.epochs=4", "train.batch_size=16", "train.global_batch=null",
                   "data.synthetic_size=48", "data.backend=synthetic", "model.num_classes=10", "schedule.warmup_epochs=1",
                   "checkpoint.every_steps=1", "checkpoint.keep_last=1", "checkpoint.keep_best=2",
                   "checkpoint.keep_every_epochs=2", "aug.mixup=0", "aug.cutmix=0")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = tmp_path / "keep/checkpoints"
    metas = {p.name: json.loads((p / "meta.json").read_text()) for p in ckpts.iterdir() if p.is_dir()}
    top1 = {int(e): float(t) for e, t in re.findall(r"epoch (\d+) step \d+ val top1 ([0-9.]+)", r.stdout)}
    assert sorted(top1) == [0, 1, 2, 3]
    best = sorted(top1, key=lambda e: (top1[e], e), reverse=True)[:2]
    expected = {f"step_{3 * (e + 1):08d}" for e in best} | {"step_00000006", "step_00000012"}
    assert set(metas) == expected, (metas.keys(), top1)


# ----------------------------------------------------------------------------- faults

def newest_complete(ckpts: Path) -> str | None:
    """The tag of the complete checkpoint written last (the highest write sequence)."""
    if not ckpts.is_dir():
        return None
    complete = [(json.loads((p / "meta.json").read_text())["seq"], p.name) for p in ckpts.iterdir()
                if p.is_dir() and (p / "meta.json").is_file()]
    return max(complete)[1] if complete else None


@pytest.mark.slow
def test_sigkill_at_random_moments_of_saves_loses_nothing(tmp_path, digits_root):
    """fp32, one process, a save every step. Three times, the process is SIGKILLed: twice a random moment into its
    second save (moments drawn over the measured duration of a save), once between a save's rename and the
    pointer's update; each restart must continue from the last complete checkpoint, and the finished run must
    end with an uninterrupted run's weights."""
    common = ["deepspeed.bf16=false", "deepspeed.zero_stage=1", "checkpoint.every_steps=1", "data.workers=0",
              "checkpoint.keep_last=2", "train.max_steps=24"]
    full = digits_run(tmp_path, digits_root, "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    durations = [float(s) for s in re.findall(r"\[checkpoint\] \S+ \(([0-9.]+) s\)", full.stdout)]
    assert len(durations) == 24
    save_s = statistics.median(durations)
    rng = random.Random(0)
    ckpts = tmp_path / "cut/checkpoints"
    trials = []
    for trial in range(3):
        before = newest_complete(ckpts)
        delay = rng.uniform(0, 1.2 * save_s)
        # the last trial dies exactly between a save's rename and the pointer's update
        hook = {"TRAIN_TEST_KILL_BEFORE_POINTER": "2"} if trial == 2 else {"TRAIN_TEST_KILL_IN_SAVE": f"2:0:{delay:.4f}"}
        killed = digits_run(tmp_path, digits_root, "cut", *common, env=hook)
        assert killed.returncode == -9, (trial, killed.returncode, killed.stderr[-2000:])
        if before:  # restarted from the newest complete checkpoint (the one `latest` names, or a newer one)
            assert f"[resume] {ckpts}/{before}: " in killed.stdout, (trial, killed.stdout[-2000:])
        latest = (ckpts / "latest").read_text().strip()
        # `latest` names the newest complete checkpoint, or the one written just before it when the kill
        # fell between a save's rename and the pointer's update (the next start takes the newer one)
        seqs = sorted(json.loads((p / "meta.json").read_text())["seq"] for p in ckpts.iterdir()
                      if p.is_dir() and (p / "meta.json").is_file())
        assert json.loads((ckpts / latest / "meta.json").read_text())["seq"] in seqs[-2:]
        trials.append((round(delay, 4), latest, newest_complete(ckpts)))
    orphan = newest_complete(ckpts)
    assert (ckpts / "latest").read_text().strip() != orphan  # the last kill left the pointer one behind
    done = digits_run(tmp_path, digits_root, "cut", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"[checkpoint] {orphan} (write " in done.stdout and f"[resume] {ckpts}/{orphan}: " in done.stdout
    a = torch.load(tmp_path / "full/checkpoints/step_00000024/mp_rank_00_model_states.pt", weights_only=False)
    b = torch.load(ckpts / (ckpts / "latest").read_text().strip() / "mp_rank_00_model_states.pt", weights_only=False)
    diff = max((a["module"][k] - b["module"][k]).abs().max().item() for k in a["module"])
    print(f"save {save_s:.3f} s; trials (kill delay s, latest after): {trials}; max |weight diff| {diff}")
    assert diff == 0.0
    assert len({t[1] for t in trials}) == 3  # the kills walked the run forward: each restart saved once more


@pytest.mark.slow
def test_a_non_finite_loss_is_rolled_back_and_the_run_finishes(tmp_path, digits_root):
    args = ["train.max_steps=8", "checkpoint.every_steps=3"]
    store = f"sqlite:///{tmp_path}/mlflow.db"
    r = digits_run(tmp_path, digits_root, "nan", *args, "tracking.enabled=true", f"tracking.uri={store}",
                   "tracking.system_metrics=false", "tracking.log_model=false", env={"TRAIN_TEST_NAN_AT_STEP": "5"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"\[rollback\] non-finite loss in steps 5-5 \(epoch 0, samples 256-320\): reloaded "
                     r"\S+/step_00000003, skipping those samples \(rollback 1 of at most 3\)", r.stdout), r.stdout
    losses = step_losses(r.stdout)  # step 4 runs twice (after the checkpoint at 3, before the bad window)
    assert sorted(set(losses)) == [1, 2, 3, 4, 5, 6, 7, 8] and all(np.isfinite(list(losses.values())))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert logged == [1, 2, 3, 4, 5, 6, 7, 8], logged  # the re-run step 4 is not logged twice
    assert run.data.metrics["train/rollbacks"] == 1 and "rollback_1" in run.data.tags
    meta = json.loads((tmp_path / "nan/checkpoints/step_00000008/meta.json").read_text())
    assert meta["state"]["rollbacks"] == 1 and meta["state"]["skip"] == [[0, 256, 320]]
    no_rollback = digits_run(tmp_path, digits_root, "nan0", *args, "train.max_rollbacks=0",
                             env={"TRAIN_TEST_NAN_AT_STEP": "5"})
    assert no_rollback.returncode == 3 and "non-finite loss in steps 5-5" in no_rollback.stderr


@pytest.mark.slow
def test_resume_at_other_world_sizes_reads_each_image_of_the_epoch_once(tmp_path, digits_root):
    """One epoch of the digits set (15 steps of 96) in three legs: 2 -> 1 -> 3 processes, ZeRO-1
    (a universal checkpoint at each change). Every image of the epoch is read exactly once."""
    record = tmp_path / "samples.txt"
    legs, done = [(2, 4), (1, 8), (3, 15)], 0
    for nproc, stop in legs:
        r = digits_run(tmp_path, digits_root, "ws", "train.global_batch=96", "train.batch_size=48",
                       "train.grad_accum=null", "deepspeed.zero_stage=1", f"train.max_steps={stop}",
                       nproc=nproc, env={"TRAIN_TEST_RECORD_SAMPLES": str(record)})
        assert r.returncode == 0, r.stderr[-3000:]
        assert sorted(step_losses(r.stdout)) == list(range(done + 1, stop + 1)), (nproc, r.stdout[-2000:])
        done = stop
    reads = [tuple(map(int, line.split()[:2])) for line in record.read_text().splitlines()]
    assert {e for e, _ in reads} == {0}
    counts = Counter(i for _, i in reads)
    planned = set(epoch_permutation(1442, 0, 0)[:1440].tolist())
    seen = [counts.get(i, 0) for i in planned]
    zero, once, twice = seen.count(0), seen.count(1), sum(c >= 2 for c in seen)
    print(f"digits epoch 0 over 2->1->3 processes: 0x {zero}, 1x {once}, 2x {twice} of {len(planned)}")
    assert (zero, once, twice) == (0, 1440, 0) and set(counts) == planned


@pytest.mark.slow
def test_no_host_sync_between_log_windows(tmp_path):
    """A real run (bf16, ZeRO 2, EMA, gradient clipping, Mixup): every host sync is at a log window (step
    4, 8) or at the end (evaluation, checkpoint), none in the steps between. Removed: DeepSpeed's bf16
    overflow check (has_overflow's .item() and a bool() of the grad norm) and the bool() its clipping asked
    per parameter group."""
    result = run_script(str(REPO / "tests/host_syncs.py"), "data.backend=synthetic", "data.synthetic_size=1024",
                        "train.max_steps=8", "train.log_every=4", f"train.output_dir={tmp_path}", "train.run_name=s",
                        "tracking.enabled=false", "train.model_ema=true", "optim.clip_grad=0.05",
                        "checkpoint.every_steps=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    per_step = {int(k): v for k, v in json.loads(result.stdout.split("HOST_SYNCS ")[1].splitlines()[0]).items()}
    between = {s: v for s, v in per_step.items() if s not in (4, 8)}
    print(f"host syncs per step: {per_step}")
    assert between == {}, between
    assert per_step[4]  # the log window does sync (the counter sees it)
    assert json.loads(result.stdout.split("GRAD_NORM_STEPS ")[1].splitlines()[0]) == list(range(1, 9))  # clipping


@pytest.mark.slow
def test_without_clipping_only_logged_steps_compute_the_grad_norm(tmp_path):
    """ZeRO 2 without gradient clipping: DeepSpeed would compute the gradient norm (a pass over every
    gradient and an all-reduce) at every step; the trainer asks for it only on the steps it logs (4 and
    8 here), and the logged norm is a real one. No host sync between the windows either."""
    result = run_script(str(REPO / "tests/host_syncs.py"), "data.backend=synthetic", "data.synthetic_size=1024",
                        "train.max_steps=8", "train.log_every=4", f"train.output_dir={tmp_path}", "train.run_name=s",
                        "tracking.enabled=false", "optim.clip_grad=null", "deepspeed.zero_stage=2",
                        "checkpoint.every_steps=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    norm_steps = json.loads(result.stdout.split("GRAD_NORM_STEPS ")[1].splitlines()[0])
    logged = [float(v) for v in re.findall(r"grad_norm ([0-9.]+)", result.stdout)]
    print(f"grad norm computed at steps {norm_steps}; logged {logged}")
    assert norm_steps == [4, 8]
    assert len(logged) == 2 and all(v > 0 for v in logged)
    per_step = json.loads(result.stdout.split("HOST_SYNCS ")[1].splitlines()[0])
    assert set(per_step) <= {"4", "8"}, per_step


def test_sync_free_clipping_equals_deepspeeds(monkeypatch):
    from types import SimpleNamespace

    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from trainer.build import _clip_without_host_sync

    _clip_without_host_sync()
    ours = DeepSpeedZeroOptimizer.unscale_and_clip_grads
    theirs = ours.original
    # DeepSpeed's own clip, with its own (host-syncing) validity check
    monkeypatch.setattr(stage_1_and_2, "is_invalid_grad_norm", stage_1_and_2.is_invalid_grad_norm.original)
    for norm, clip in ((torch.tensor(12.5), 1.0), (torch.tensor(0.3), 1.0), (torch.tensor(float("nan")), 1.0),
                       (torch.tensor(-1.0), 2.0), (torch.tensor(7.0), 5.0)):
        opt = SimpleNamespace(clip_grad=clip, loss_scale=1.0, device="cpu")
        grads = [torch.randn(10, generator=torch.Generator().manual_seed(0)), [torch.ones(3), torch.full((2,), 4.0)]]
        a = [grads[0].clone(), [g.clone() for g in grads[1]]]
        b = [grads[0].clone(), [g.clone() for g in grads[1]]]
        ours(opt, a, norm)
        theirs(opt, b, norm)
        assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1])), (norm, clip)


def test_forward_timer_reads_cuda_events_with_one_wait_per_window():
    """The straggler check's compute time on a GPU comes from CUDA events (stand-ins here that count the
    waits): their elapsed times, summed per window, with one wait on the window's last event, no host clock."""
    from trainer.trainer import ForwardTimer

    class Event:
        made, waits, clock = 0, 0, 0.0

        def __init__(self):
            Event.made += 1
            self.at = None

        def record(self):
            Event.clock += 5.0  # each record: 5 ms of device time later than the one before
            self.at = Event.clock

        def synchronize(self):
            Event.waits += 1

        def elapsed_time(self, end):
            assert self.at is not None and end.at is not None
            return end.at - self.at

    timer = ForwardTimer(cuda=True, event_factory=Event)
    for _ in range(3):
        timer.start()
        timer.stop()
    assert timer.read() == pytest.approx(3 * 0.005) and Event.waits == 1
    for _ in range(2):  # the next window reuses the events
        timer.start()
        timer.stop()
    assert timer.read() == pytest.approx(2 * 0.005) and Event.waits == 2 and Event.made == 6
    assert timer.read() == 0.0 and Event.waits == 2  # an empty window waits for nothing
    host = ForwardTimer(cuda=False, event_factory=Event)
    host.start()
    host.stop()
    assert 0 <= host.read() < 1 and Event.made == 6


@pytest.mark.parametrize("visible, local_rank, expected", [(1, 3, 0), (8, 3, 3), (4, 5, None)])
def test_each_process_takes_its_own_gpu(monkeypatch, visible, local_rank, expected):
    """One GPU visible per task (srun --gpus-per-task=1): device 0 whatever the local rank (set_device(3)
    failed there); all of a node's GPUs visible: the local rank's; more ranks than GPUs: a clear error."""
    from trainer.distributed import cuda_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if expected is None:
        with pytest.raises(RuntimeError, match="local rank 5 but this process sees 4 GPUs"):
            cuda_device(local_rank)
    else:
        assert cuda_device(local_rank) == torch.device("cuda", expected)


def test_compile_auto_and_a_missing_compiler(monkeypatch):
    """train.compile=auto: on with CUDA except at ZeRO-3 (said why); with inductor and no compiler on the
    node, a ConfigError naming train.compile=false before the first step."""
    from trainer.build import check_compiler, compile_decision

    cfg = load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", ["train.compile=auto"])
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert compile_decision(cfg, cuda, 2) == (True, "")
    on, why = compile_decision(cfg, cuda, 3)
    assert not on and "ZeRO stage 3" in why and "train.compile=true" in why
    assert not compile_decision(cfg, cpu, 2)[0]
    forced = load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", ["train.compile=true"])
    assert compile_decision(forced, cuda, 3) == (True, "")
    check_compiler("inductor", "cuda")  # this machine has gcc
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(ConfigError, match=r"needs a C compiler .* set train.compile=false"):
        check_compiler("inductor", "cuda")
    with pytest.raises(ConfigError, match=r"needs a C\+\+ compiler"):
        check_compiler("inductor", "cpu")
    check_compiler("aot_eager", "cuda")  # no code generation, no compiler needed


def test_batch_size_auto_halves_on_out_of_memory_and_keeps_the_global_batch(monkeypatch):
    """train.batch_size=auto: the probe step (the real one, on a copy of the model) hits an injected CUDA
    out-of-memory error above 24 images, so 96 -> 48 -> 24 are tried and 24 x accum 4 keeps the global batch
    of 96; the model's weights are untouched. Without CUDA (and no forced probe) the per-rank batch is whole."""
    from trainer.batch_probe import largest_fitting, resolve_auto_batch
    from trainer.build import build_model

    cfg = load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", ["train.batch_size=auto", "train.global_batch=96",
                                                          "train.grad_accum=null", "deepspeed.bf16=false"])
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real_forward, sizes = type(model).forward, []

    def forward(self, x):
        sizes.append(x.shape[0])
        if x.shape[0] > 24:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_forward(self, x)

    monkeypatch.setattr(type(model), "forward", forward)
    resolved_cfg, note = resolve_auto_batch(cfg, model, torch.device("cpu"), 1, probe=True)
    assert sizes == [96, 48, 24] and resolved_cfg.train.batch_size == 24
    assert note == ("[batch] train.batch_size=auto: probed 96 out of memory, 48 out of memory, 24 fits -> 24/rank; "
                    "x accum 4 keeps the global batch 96")
    plan = plan_run(resolved_cfg, 1, 1000)
    assert (plan.batch.batch_size, plan.batch.grad_accum, plan.batch.global_batch) == (24, 4, 96)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    whole, note = resolve_auto_batch(cfg, model, torch.device("cpu"), 2)
    assert whole.train.batch_size == 48 and "no CUDA device to probe" in note
    assert plan_run(cfg, 2, 1000).batch.batch_size == 48  # --dry-run / --print-config before any probe
    assert largest_fitting(96, lambda b: b <= 5, even=True) == (2, [(96, False), (48, False), (24, False),
                                                                    (12, False), (6, False), (2, True)])
    with pytest.raises(ConfigError, match="not even a micro-batch of 1 image"):
        largest_fitting(6, lambda b: False)
    with pytest.raises(ConfigError, match="needs train.global_batch"):
        plan_run(load_config(CONFIG_DIR / "cs_mixer_tiny.yaml", ["train.batch_size=auto", "train.global_batch=null",
                                                                 "train.grad_accum=null"]), 1, 1000)


@pytest.mark.slow
def test_minival_is_held_out_of_training_at_any_world_size(tmp_path, digits_root):
    """data.minival_per_class=5: 50 digits train images held out, the same ones at 2 processes and after a resume at
    1; none is ever in a training batch, and minival/top1 is evaluated beside val. The same run (with aug.repeats=3)
    also evaluates a digits-suite tree inside training (eval.suite_root) and fits the evaluation crop at its end."""
    from mlflow.tracking import MlflowClient

    from data_pipeline.folder import scan_split
    from data_pipeline.sharding import minival_split

    suite_root, store = tmp_path / "suite", f"sqlite:///{tmp_path}/mlflow.db"
    made = run_script(str(REPO / "launch/prepare_data.py"), "digits-suite", "--from", str(digits_root), "--out",
                      str(suite_root))
    assert made.returncode == 0 and "imagenet-c 7100 images" in made.stdout, made.stderr  # 355 val x 4 x 5
    record = tmp_path / "samples.txt"
    for nproc, stop, extra in [(2, 3, []), (1, 6, [f"eval.suite_root={suite_root}", "tracking.enabled=true",
                                                   f"tracking.uri={store}", "tracking.system_metrics=false",
                                                   "tracking.log_model=false"])]:
        r = digits_run(tmp_path, digits_root, "mv", "data.minival_per_class=5", "aug.repeats=3", "train.global_batch=96",
                       "train.batch_size=48", "train.grad_accum=null", f"train.max_steps={stop}", *extra, nproc=nproc,
                       env={"TRAIN_TEST_RECORD_SAMPLES": str(record)})
        assert r.returncode == 0, r.stderr[-3000:]
        assert "50 train images held out as minival, 1392 left to train on" in r.stdout
        assert re.search(r"val top1 [\d.]+ top5 [\d.]+ \| minival top1 [\d.]+ top5 [\d.]+", r.stdout), r.stdout[-1500:]
    # eval.suite_root (the second leg): every benchmark at the end, a line each and suite/<benchmark>/<metric>
    for key in ("val", "imagenetv2-matched-frequency", "sketch", "imagenet-a", "imagenet-r", "imagenet-c"):
        assert re.search(rf"\[suite\] {key}: top1 [\d.]+ top5 [\d.]+ ECE [\d.]+ NLL [\d.]+", r.stdout), key
    client = MlflowClient(store)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert {"suite/val/top1", "suite/imagenet-a/ece", "suite/sketch/nll", "suite/val/real_top1", "minival/top1",
            "val/top1"} <= set(run.data.metrics)
    (tmp_path / "odd" / "cifar").mkdir(parents=True)  # checked at the trainer's start (its ConfigError: exit 2)
    from trainer.config import ConfigError, find_config, load_config
    from trainer.trainer import build_suite
    with pytest.raises(ConfigError, match=r"eval.suite_root: .*matches no benchmark layout"):
        build_suite(load_config(find_config("cs_mixer_tiny"), [f"eval.suite_root={tmp_path / 'odd'}"]),
                    [f"digit_{i}" for i in range(10)], None)
    samples, _ = scan_split(digits_root, "train")
    _, held = minival_split(samples.labels, 5, 0)
    held_paths = {samples[int(i)][0] for i in held}
    reads = [line.split() for line in record.read_text().splitlines()]
    trained = [path for _, _, path, _ in reads]
    assert len(held_paths) == 50 and len(trained) == 6 * 96
    assert not held_paths & set(trained)
    # aug.repeats=3 in the same run: 576 samples = 192 images x 3, across the resize from 2 processes to 1; in the
    # 2-process leg (288 samples: 96 images) every image's copies are on both ranks
    assert sorted(set(Counter(trained).values())) == [3] and len(set(trained)) == 192
    ranks: dict[str, set[str]] = {}
    for _, _, path, rank in reads[:288]:
        ranks.setdefault(path, set()).add(rank)
    assert len(ranks) == 96 and all(r == {"0", "1"} for r in ranks.values())
    assert sorted(Counter(samples.labels[held].tolist()).values()) == [5] * 10  # 5 of each class
    # the evaluation crop fitted on minival at the end: in the log, the checkpoint, its export, and used by evaluate
    fit = re.search(r"\[crop\] minival top1 by crop_pct: (.*); recommended evaluation crop_pct ([\d.]+)", r.stdout)
    assert fit and len(fit[1].split(", ")) == 4, r.stdout[-1500:]
    scores = {float(c): float(v) for c, v in (x.split() for x in fit[1].split(", "))}
    best = float(fit[2])
    assert scores[best] == max(scores.values())
    meta = json.loads(sorted((tmp_path / "mv/checkpoints").glob("step_*/meta.json"))[-1].read_text())
    assert meta["state"]["eval_crop_pct"] == best and meta["class_names"] == [f"digit_{i}" for i in range(10)]
    out = tmp_path / "mv.safetensors"
    assert run_script(str(REPO / "launch/export.py"), str(tmp_path / "mv"), "--out", str(out)).returncode == 0
    assert load_exported(out)[1]["eval_crop_pct"] == best
    ev = run_script(str(REPO / "launch/evaluate.py"), str(out), "--config", "cs_mixer_tiny", f"data.root={digits_root}")
    assert ev.returncode == 0 and f"[crop] crop_pct {best}: fitted on minival" in ev.stdout, ev.stderr[-2000:]
    assert "@ 32px" in ev.stdout
    refit = run_script(str(REPO / "launch/evaluate.py"), str(out), "--config", "cs_mixer_tiny", "--fit-crop",
                       f"data.root={digits_root}", "data.minival_per_class=5")
    assert refit.returncode == 0, refit.stderr[-2000:]
    assert f"recommended crop_pct {best}" in refit.stdout and load_exported(out)[1]["eval_crop_pct"] == best
