"""A training campaign's faults on real 2-process runs: replicated weights that differ between ranks
(silent corruption) and the FINISHED marker that keeps slurm/launch.sh from requeueing a finished run.
A hung rank and a straggler are tested as a SLURM job (tests/test_slurm.py: stacks, exit 86, requeue)."""
from __future__ import annotations

import re
import socket

import pytest

from conftest import REPO, run_script

TRAIN = str(REPO / "launch/train.py")


def run(tmp_path, digits_root, *overrides, env=None):
    return run_script(TRAIN, "--config", "cs_mixer_tiny", f"data.root={digits_root}", f"train.output_dir={tmp_path}",
                      "train.run_name=c", "data.workers=1", "deepspeed.zero_stage=1", *overrides, nproc=2,
                      cwd=tmp_path, env=env)


@pytest.mark.slow
def test_replicated_weights_that_differ_stop_the_run_before_saving(tmp_path, digits_root):
    result = run(tmp_path, digits_root, "train.max_steps=8", "train.log_every=2", "checkpoint.every_steps=2",
                 "tracking.enabled=false", env={"TRAIN_TEST_PERTURB_AT_STEP": "4:1"})
    assert result.returncode != 0 and "exitcode  : 4" in result.stderr, result.stderr[-3000:]
    assert "step 4: the replicated weights differ between ranks" in result.stderr
    assert f"rank 0 on {socket.gethostname()}" in result.stderr and "rank 1 on" in result.stderr  # a tie: both named
    ckpts = sorted(p.name for p in (tmp_path / "c/checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000002"]  # the corrupt state was not saved
    assert not (tmp_path / "c/FINISHED").exists()


def test_a_finished_run_is_marked_so_it_is_never_requeued(tmp_path, digits_root):
    result = run_script(TRAIN, "--config", "cs_mixer_tiny", f"data.root={digits_root}", f"train.output_dir={tmp_path}",
                        "train.run_name=f", "train.max_steps=2", "tracking.enabled=false", "data.workers=0",
                        "deepspeed.zero_stage=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "f/FINISHED").read_text().startswith("step 2 val_top1 ")  # a late signal: tests/test_slurm.py


@pytest.mark.slow
def test_mlflow_campaign_view_dataset_registry_off_track_and_compare(tmp_path, digits_root):
    """Two runs of one recipe in one local store: a good one (registered in the Model Registry) and a
    deliberately bad one (lr x100), which is flagged off-track against the good one at the same
    epoch; both carry their dataset input; compare.py plots them into one PNG logged to the first."""
    from mlflow.tracking import MlflowClient

    common = ["--config", "cs_mixer_tiny", f"data.root={digits_root}", f"train.output_dir={tmp_path}",
              "train.epochs=2", "schedule.warmup_epochs=0", "data.workers=0", "deepspeed.zero_stage=0",
              "train.log_every=5", "tracking.system_metrics=false"]
    good = run_script(TRAIN, *common, "train.run_name=good", "tracking.register_model=digits-tiny", cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-3000:]
    assert "[tracking] registered digits-tiny version 1 (model/cs_mixer_tiny-step_00000044.safetensors)" in good.stdout
    bad = run_script(TRAIN, *common, "train.run_name=bad", "optim.lr=0.2", cwd=tmp_path)
    assert bad.returncode == 0, bad.stderr[-3000:]
    assert re.search(r"\[off-track\] epoch 1: val top-1 [0-9.]+ is [0-9.]+ points behind [0-9.]+ of run good",
                     bad.stdout), bad.stdout[-2000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert "points behind" in runs["bad"].data.tags["off_track"] and "off_track" not in runs["good"].data.tags
    assert runs["good"].data.tags["recipe"] == runs["bad"].data.tags["recipe"] == "cs_mixer_tiny-2ep-32px-bs64-folder"
    for run in runs.values():
        (ds,) = run.inputs.dataset_inputs
        assert ds.dataset.name == digits_root.name and len(ds.dataset.digest) == 16
        assert '"train_samples": 1437' in ds.dataset.profile or "train_samples" in ds.dataset.profile
    version = client.get_model_version("digits-tiny", "1")
    assert version.run_id == runs["good"].info.run_id and version.tags["val_top1"] == f"{float(version.tags['val_top1']):.2f}"
    assert version.tags["recipe"] == "cs_mixer_tiny-2ep-32px-bs64-folder" and version.tags["weights"] == "raw"
    out = tmp_path / "compare.png"
    compared = run_script(str(REPO / "launch/compare.py"), "good", "bad", "--uri", uri, "--out", str(out),
                          "--log-to", "good", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "optim.lr" in compared.stdout and out.stat().st_size > 10_000
    assert "compare/compare.png" in {a.path for a in client.list_artifacts(runs["good"].info.run_id, "compare")}
    print(good.stdout[-600:], bad.stdout[-600:], compared.stdout, sep="\n")


@pytest.mark.slow
def test_a_slow_node_fails_the_preflight_and_is_listed_for_exclusion(tmp_path, digits_root):
    """Rank 1's pre-flight matmul reads 1 s slower: every rank exits 87 before any training, its node is
    written to <run dir>/exclude_nodes (what slurm/launch.sh hands to scontrol update ExcNodeList)."""
    result = run(tmp_path, digits_root, "train.max_steps=2", "tracking.enabled=false",
                 env={"TRAIN_TEST_SLOW_PREFLIGHT": "1", "SLURMD_NODENAME": "n2"})
    assert result.returncode != 0 and "exitcode  : 87" in result.stderr, result.stderr[-3000:]
    assert re.search(r"pre-flight: rank 1 on n2: matmul \d+ ms, [0-9.]+x the median \d+ ms; excluding node\(s\) n2",
                     result.stderr), result.stderr[-2000:]
    assert (tmp_path / "c/exclude_nodes").read_text() == "n2\n"
    assert not (tmp_path / "c/checkpoints").exists()
    healthy = run_script(TRAIN, "--config", "cs_mixer_tiny", f"data.root={digits_root}", f"train.output_dir={tmp_path}",
                         "train.run_name=ok", "train.max_steps=2", "tracking.enabled=false", "data.workers=1",
                         nproc=2, cwd=tmp_path)
    assert healthy.returncode == 0 and "[preflight] 2 ranks on 1 node(s): matmul" in healthy.stdout, healthy.stderr[-2000:]
