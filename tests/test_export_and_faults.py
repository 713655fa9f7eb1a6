"""Export and evaluation of DeepSpeed checkpoints, and a rank killed in the middle of a checkpoint."""
from __future__ import annotations

import re
import shutil

import pytest
import torch

from conftest import REPO, run_script
from models import create_model
from models.exported import load_exported

TRAIN = str(REPO / "launch/train.py")
EXPORT = str(REPO / "launch/export.py")
EVALUATE = str(REPO / "launch/evaluate.py")

ENGINE_LOGITS = """
import sys, torch
from models import count_params
from trainer.build import build_engine, build_model
from trainer.checkpoint import check_complete, find_checkpoint
from trainer.config import config_from_dict, plan_run
from trainer.distributed import init_distributed, shutdown

tag = find_checkpoint(sys.argv[1])
meta = check_complete(tag)
env = init_distributed()
cfg = config_from_dict(meta["config"])
model = build_model(cfg)
engine = build_engine(plan_run(cfg, env.world_size, count_params(model)), model)
engine.load_checkpoint(str(tag.parent), tag=tag.name)
engine.eval()
x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = engine(x.to(torch.bfloat16 if engine.bfloat16_enabled() else torch.float32))
if env.rank == 0:
    torch.save({"x": x, "logits": logits}, sys.argv[2])
shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage, bf16", [(0, True), (3, False)])
def test_export_loads_with_create_model_and_gives_the_engines_logits(tmp_path, digits_root, stage, bf16):
    """ZeRO-0 in DeepSpeed's bf16 mode (bf16_mode=weights) reads the fp32 master copy from the
    optimizer; ZeRO-3 gathers the partitions."""
    run = run_script(TRAIN, "--config", "s2mlpv2_tiny", f"data.root={digits_root}", f"train.output_dir={tmp_path}",
                     "train.run_name=r", "train.max_steps=4", f"deepspeed.zero_stage={stage}", "tracking.enabled=false",
                     f"deepspeed.bf16={str(bf16).lower()}", "deepspeed.bf16_mode=weights", nproc=2, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    dtype = "bf16" if bf16 else "fp32"
    out = tmp_path / f"m.{dtype}.safetensors"
    exported = run_script(EXPORT, str(tmp_path / "r"), "--out", str(out), "--dtype", dtype)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "step_00000004" in exported.stdout
    state, header = load_exported(out)
    assert header["model"] == "s2mlpv2_tiny" and header["step"] == 4
    assert header["model_args"] == {"num_classes": 10, "img_size": 32}
    assert header["class_names"] == [f"digit_{i}" for i in range(10)]  # from the checkpoint's meta
    # train.init_from reads the same weights from the checkpoint; bf16 weights and ZeRO-3 partitions need
    # DeepSpeed's reader (it unpickles), and say so
    from trainer.checkpoint import init_weights
    init_state, init_model, how = init_weights(tmp_path / "r")
    assert init_model == "s2mlpv2_tiny" and "DeepSpeed's reader (unpickles: trusted files only)" in how
    assert all(torch.equal(init_state[k].to(state[k].dtype), state[k]) for k in state)

    script = tmp_path / "engine_logits.py"
    script.write_text(ENGINE_LOGITS)
    engine = run_script(str(script), str(tmp_path / "r"), str(tmp_path / "engine.pt"), nproc=2)
    assert engine.returncode == 0, engine.stderr[-3000:]
    saved = torch.load(tmp_path / "engine.pt")
    model = create_model("s2mlpv2_tiny", checkpoint_path=str(out)).eval()
    assert next(model.parameters()).dtype == torch.float32  # create_model keeps fp32; cast as the engine does
    model = model.to(torch.bfloat16 if bf16 else torch.float32)
    with torch.no_grad():
        logits = model(saved["x"].to(next(model.parameters()).dtype))
    if bf16:  # same bf16 weights, same ops: bit-identical
        assert torch.equal(logits, saved["logits"])
    else:  # ZeRO-3 runs linear layers through its own autograd function (matmul + add, not addmm)
        torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-6)

    if not bf16:  # evaluate.py on the export reproduces the trainer's own last val accuracy, from a val set
        trained_top1 = float(run.stdout.strip().splitlines()[-1].removeprefix("val_top1="))
        # alone (no train/ beside it), with the folder and DALI backends
        shutil.copytree(digits_root / "val", tmp_path / "val_only/val")
        for backend in ("folder", "dali"):
            ev = run_script(EVALUATE, str(out), "--config", "s2mlpv2_tiny", f"data.root={tmp_path / 'val_only'}",
                            f"data.backend={backend}")
            assert ev.returncode == 0, ev.stderr[-3000:]
            assert f"on {backend}:" in ev.stdout
            if backend == "folder":
                assert f"top1 {trained_top1:.2f}" in ev.stdout


def test_export_and_evaluate_refuse_bad_input(tmp_path, digits_root):
    result = run_script(EXPORT, str(tmp_path))
    assert result.returncode == 2 and f"{tmp_path} is not a checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    result = run_script(EVALUATE, str(tmp_path / "junk.safetensors"), "--config", "cs_mixer_tiny")
    assert result.returncode == 2 and "junk.safetensors is not a readable safetensors file" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(FileNotFoundError, match="nope.safetensors do not exist"):
        create_model("cs_mixer_tiny", checkpoint_path=str(tmp_path / "nope.safetensors"))


KILL_DURING_SAVE = """
import os, runpy, signal, sys
import trainer.checkpoint as ckpt

saves, real_rng_state = [0], ckpt.rng_state

def rng_state_then_die():  # called by every rank after DeepSpeed wrote its files, before meta.json
    saves[0] += 1
    if os.environ["RANK"] == "1" and saves[0] == int(os.environ["DIE_AT_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rng_state()

ckpt.rng_state = rng_state_then_die
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_rank_killed_mid_checkpoint_resumes_from_the_previous_complete_one(tmp_path, digits_root):
    """Rank 1 gets SIGKILL while the step-4 checkpoint is being written (DeepSpeed's shards are on
    disk, meta.json is not). The next start must ignore that half-written checkpoint."""
    wrapper = tmp_path / "kill_during_save.py"
    wrapper.write_text(KILL_DURING_SAVE)
    args = ["--config", "cs_mixer_tiny", f"data.root={digits_root}", f"train.output_dir={tmp_path}",
            "train.run_name=k", "train.max_steps=6", "checkpoint.every_steps=2", "train.log_every=1", "tracking.enabled=false"]
    killed = run_script(str(wrapper), TRAIN, *args, nproc=2, cwd=tmp_path, env={"DIE_AT_SAVE": "2"})
    assert killed.returncode != 0
    assert re.search(r"exitcode\s*:\s*-9", killed.stderr), killed.stderr[-2000:]
    ckpts = tmp_path / "k/checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert (ckpts / "step_00000004.partial").is_dir() and not (ckpts / "step_00000004").exists()
    assert any((ckpts / "step_00000004.partial").glob("*model_states.pt"))  # killed mid-write, not before

    resumed = run_script(TRAIN, *args, nproc=2, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[resume] {ckpts}/step_00000002: step 2" in resumed.stdout
    assert re.findall(r"step (\d+)/6 loss", resumed.stdout) == ["3", "4", "5", "6"]
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    assert not list(ckpts.glob("*.partial"))
