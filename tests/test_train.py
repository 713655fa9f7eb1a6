"""End-to-end runs of launch/train.py on real JPEGs (the digits set), 1 and 2 processes over gloo."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO, run_script

TRAIN = str(REPO / "launch/train.py")


def losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r" loss ([0-9.]+) ", stdout)]


@pytest.mark.slow
def test_two_process_training_learns_and_saves_the_run(tmp_path, digits_root):
    """The demo's run, 2 processes on the folder backend, on a copy of the digits with four bad files among the
    train images (test_bad_image_files_never_stop_a_run's, which has DALI and FFCV)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(digits_root, root, ignore=shutil.ignore_patterns("*_filelist.txt", "*.beton"))
    bad = add_bad_files(root)
    result = run_script(TRAIN, "--config", "cs_mixer_tiny", f"data.root={root}",
                        f"train.output_dir={tmp_path}", "train.run_name=two", "train.epochs=4",
                        "train.log_every=5", nproc=2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    check_bad_files_reported(result, bad, tmp_path / "two", tmp_path / "mlflow.db")
    assert result.stdout.startswith("[plan] cs_mixer_tiny: world size 2; batch 64/rank x accum 1 x 2 ranks = global 128")
    # a quiet start: no accelerator notice, no FutureWarning, no op-builder chatter
    assert "Setting accelerator" not in result.stderr and "Warning" not in result.stderr, result.stderr[-2000:]
    assert "ZeRO stage 2; bf16 autocast on cpu" in result.stdout
    top1 = float(result.stdout.strip().splitlines()[-1].removeprefix("val_top1="))
    assert top1 > 80, result.stdout  # 4 epochs on digits: a model that learns gets well above chance (10 %)
    run = tmp_path / "two"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["global_batch"] == 128 and saved["optim"]["lr"] == 0.002
    ds = json.loads((run / "deepspeed_config.json").read_text())
    assert ds["train_batch_size"] == 128 and ds["zero_optimization"]["stage"] == 2 and not ds["bf16"]["enabled"]
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # the default bf16_mode
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000044"


def test_another_seed_gives_other_losses(tmp_path, digits_root, reference_run):
    """Same seed -> same losses is test_deepspeed_launcher_gives_the_same_run_as_torchrun (two runs, loss
    for loss); here a second seed must change them."""
    other = ds_run(tmp_path, digits_root, *REFERENCE, "deepspeed.zero_stage=2", "train.seed=1", name="seed1")
    assert other.returncode == 0, other.stderr[-3000:]
    assert len(losses(other.stdout)) == 4
    assert losses(reference_run.stdout) != losses(other.stdout)


@pytest.mark.parametrize("override, message", [
    ("train.model_ema=true deepspeed.zero_stage=3", "train.model_ema=true needs the full weights on every rank"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage=4 is out of range: must be <= 3"),
    ("data.backend=ffcv", "digits/train.beton does not exist"),
    ("data.root=/nonexistent/digits", "/nonexistent/digits/train does not exist"),
])
def test_unrunnable_settings_fail_early_and_create_nothing(tmp_path, override, message):
    result = run_script(TRAIN, "--config", "cs_mixer_tiny", f"train.output_dir={tmp_path}/runs",
                        *override.split(), cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_too_large_batch_fails_early(tmp_path, digits_root):
    result = run_script(TRAIN, "--config", "cs_mixer_tiny", f"data.root={digits_root}", "train.batch_size=2000",
                        f"train.output_dir={tmp_path}/runs", cwd=tmp_path)
    assert result.returncode == 2 and "1442 training samples cannot fill one optimizer step of 2000 samples" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_model_benchmark_prints_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script(str(REPO / "launch/bench_model.py"), "--model", "cs_mixer_tiny", "--batch", "4",
                        "--steps", "2", "--warmup", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    row = report["rows"][0]
    assert row["model"] == "cs_mixer_tiny" and row["batch"] == 4 and row["images_per_s"] > 0
    assert report["env"]["matmul_peak_tflops"] > 0 and 0 < row["mfu_pct"]
    assert row["mfu_pct"] == pytest.approx(100 * row["tflops"] / report["env"]["matmul_peak_tflops"], abs=0.06)
    # saved activations of the tiny model at 32 px, fp32: a few hundred KB per image, not 0, not weights
    assert 0.05 < row["activation_mb_per_image"] < 5
    assert "cs_mixer_tiny" in result.stdout


def step_losses(stdout: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+ loss ([0-9.]+)", stdout)}


def ds_run(tmp_path, digits_root, *overrides, nproc=2, name="run", popen=False):
    args = [TRAIN, "--config", "cs_mixer_tiny", f"data.root={digits_root}", f"train.output_dir={tmp_path}",
            f"train.run_name={name}", "train.log_every=1", "data.workers=1", *overrides]
    return run_script(*args, nproc=nproc, cwd=tmp_path)


REFERENCE = ("deepspeed.bf16=false", "train.max_steps=4", "tracking.enabled=false")  # fp32: runs compare closely


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, digits_root):
    """One 2-process cs_mixer_tiny run (fp32, ZeRO 2, 4 steps) that the ZeRO-stage, compile and launcher
    tests compare their runs against, loss for loss."""
    tmp = tmp_path_factory.mktemp("reference")
    r = ds_run(tmp, digits_root, *REFERENCE, "deepspeed.zero_stage=2", name="z2")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_zero_stages_train_and_agree(tmp_path, digits_root, reference_run):
    losses = {2: step_losses(reference_run.stdout)}
    for stage in (0, 3):  # ZeRO-1 runs in the signal-stop and corruption tests
        r = ds_run(tmp_path, digits_root, *REFERENCE, f"deepspeed.zero_stage={stage}", name=f"z{stage}")
        assert r.returncode == 0, r.stderr[-3000:]
        losses[stage] = step_losses(r.stdout)
    for stage, by_step in losses.items():
        assert sorted(by_step) == [1, 2, 3, 4] and by_step[4] < by_step[1], (stage, by_step)
    # the stages reduce in other orders: equal to float rounding
    assert losses[0] == pytest.approx(losses[2], abs=1e-4) and losses[3] == pytest.approx(losses[2], abs=1e-4), losses


def test_bad_checkpoints_fail_with_what_to_do(tmp_path, digits_root):
    r = ds_run(tmp_path, digits_root, "train.max_steps=2", "tracking.enabled=false", name="ck", nproc=0)
    assert r.returncode == 0, r.stderr[-3000:]
    other = ds_run(tmp_path, digits_root, "train.max_steps=3", "model.name=s2mlpv2_tiny", "tracking.enabled=false",
                   name="ck", nproc=0)
    assert other.returncode == 2 and "is of model 'cs_mixer_tiny', but model.name='s2mlpv2_tiny'" in other.stderr
    (tmp_path / "ck/checkpoints/step_00000002/meta.json").write_text("{ half written")
    corrupt = ds_run(tmp_path, digits_root, "train.max_steps=3", "tracking.enabled=false", name="ck", nproc=0)
    assert corrupt.returncode == 2 and "incomplete or corrupt" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr


@pytest.mark.slow
def test_deepspeed_launcher_gives_the_same_run_as_torchrun(tmp_path, digits_root, reference_run):
    """`deepspeed --hostfile H --no_ssh --node_rank R launch/train.py`: one DeepSpeed launcher per node, no ssh, here
    two simulated nodes on this machine (its --local_rank argument, its env, its rank mapping) = torchrun, loss for
    loss."""
    import signal
    import socket

    (tmp_path / "hostfile").write_text("n1 slots=1\nn2 slots=1\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--config", "cs_mixer_tiny", f"data.root={digits_root}", f"train.output_dir={tmp_path}",
            "train.log_every=1", "data.workers=1", *REFERENCE, "deepspeed.zero_stage=2", "train.run_name=ds"]
    # pytest may itself run inside a SLURM job: the launchers must not see its variables
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"),
                               "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port",
                               str(port), TRAIN, *args],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # the launcher ends its ranks on SIGTERM
                p.wait(timeout=30)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "global_rank_mapping=defaultdict(<class 'list'>, {'n1': [0], 'n2': [1]})" in outs[0]
    assert "[plan] cs_mixer_tiny: world size 2; batch 64/rank x accum 1 x 2 ranks = global 128" in outs[0]
    assert re.search(r"^val_top1=[0-9.]+$", outs[0], re.M) and "val_top1=" not in outs[1]
    assert (tmp_path / "ds/checkpoints/latest").read_text().strip() == "step_00000004"
    assert len(losses(outs[0])) == 4 and losses(outs[0]) == losses(reference_run.stdout)


def test_trainer_benchmarks_print_their_tables(tmp_path):
    bench = str(REPO / "launch/bench_trainer.py")
    out = tmp_path / "overhead.json"
    result = run_script(bench, "overhead", "--steps", "2", "--windows", "1", "--warmup", "1", "--batch", "8",
                        "--compile", "true", "--compile-backend", "aot_eager", "--json", str(out), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["ms_per_step"]) == {"pytorch_ddp", "deepspeed_zero0", "deepspeed_zero1"}
    # like with like: the DDP baseline is compiled where the engines are (it was eager beside compiled engines)
    assert figures["compiled"] == dict.fromkeys(figures["ms_per_step"], True)
    assert all(v > 0 for v in figures["ms_per_step"].values())
    out = tmp_path / "memory.json"
    result = run_script(bench, "memory", "--model", "cs_mixer_tiny", "--img-size", "32", "--stages", "0,2,3",
                        "--json", str(out), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["zero_stage"]: r for r in json.loads(out.read_text())["rows"]}
    assert "state MB | ZeRO paper MB" in result.stdout
    # 1.76 M params: 16 bytes each at stage 0 = 27 MB; partitioning must save memory at stage 2
    assert rows[0]["state_mb"] == pytest.approx(27, abs=3)
    assert rows[2]["state_mb"] < 0.7 * rows[0]["state_mb"]


@pytest.mark.slow
def test_compiled_engine_trains_like_eager(tmp_path, digits_root, reference_run):
    """train.compile=true compiles the model inside the DeepSpeed engine (two processes, ZeRO 2, fp32). On this
    CPU the test uses the aot_eager backend (no code generation: inductor takes ~80 s per process here); the
    losses equal eager ones to float rounding, and the one-time report names graphs and breaks."""
    compiled = ds_run(tmp_path, digits_root, *REFERENCE, "deepspeed.zero_stage=2", "train.compile=true",
                      "train.compile_backend=aot_eager", name="compiled")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    eager = reference_run
    assert "compiled (aot_eager)" in compiled.stdout and "compiled" not in eager.stdout.split("data folder")[0]
    assert re.search(r"\[compile\] aot_eager: 1 graph\(s\), 0 graph break\(s\), 0 recompile\(s\)", compiled.stdout)
    a, b = step_losses(eager.stdout), step_losses(compiled.stdout)
    print(f"eager {a}\ncompiled {b}")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(b[s] == pytest.approx(a[s], abs=1e-4) for s in a), (a, b)


SITECUSTOMIZE = """import os, sys
open(os.path.join(os.path.dirname(__file__), f"seen_{os.getpid()}"), "w").write(" ".join(sys.argv))
"""


def carried_site(tmp_path: Path) -> tuple[Path, dict]:
    """A folder on PYTHONPATH only (as gpu_check.sh's carried wheels are) whose sitecustomize.py records
    every Python process that sees it: the children that lost the inherited PYTHONPATH leave no record."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONPATH": str(site)}
    return site, env


@pytest.mark.slow
def test_gpu_check_dry_mode_writes_its_json(tmp_path):
    """scripts/gpu_check.sh --cpu: the prepared GPU check, on this CPU with tiny sizes, so it keeps working;
    every part's children (train.py, export.py, bench_infer.py, ...) see the inherited PYTHONPATH. All parts but
    `models` (the other variants' rows: the `compiled` part's code with other names), to keep the suite's time."""
    site, env = carried_site(tmp_path)
    result = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), str(tmp_path / "out"), "--cpu", "--parts",
                             "trainer,compiled,stage,dali,inference"], cwd=REPO,
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and report["parts_skipped"] == {}
    assert report["parts_run"] == ["trainer", "compiled", "stage", "dali", "inference"]
    assert {k: v["status"] for k, v in report["parts"].items()} == dict.fromkeys(report["parts_run"], "ok"), \
        {k: v.get("error") for k, v in report["parts"].items()}
    assert not [m for m, v in report["imports"].items() if v.startswith("missing")], report["imports"]
    parts = {k: v["result"] for k, v in report["parts"].items()}
    rows = {(r["model"], r["compile"], r["grad_checkpointing"]): r for r in parts["compiled"]}
    assert set(rows) == {("cs_mixer_tiny", c, g) for c in (False, True) for g in (False, True)}
    assert all(r["images_per_s"] > 0 and r["mfu_pct"] > 0 for r in rows.values())
    assert rows[("cs_mixer_tiny", False, True)]["activation_mb_per_image"] < \
        rows[("cs_mixer_tiny", False, False)]["activation_mb_per_image"]
    t = parts["trainer"]
    assert t["first_rc"] == 0 and t["resume_rc"] == 0 and t["resumed"], t
    assert t["export_parity"]["max_abs_diff"] == 0.0 and t["steady_images_per_s"] > 0
    assert "0 graph break(s)" in t["compile_report"]
    assert parts["stage"]["images_per_s"] > 0, parts["stage"]
    assert {r["name"] for r in parts["dali"]["rows"]} == {"dali (CPU mode)", "  bare DALI pipeline + device stage"}
    assert parts["inference"]["rows"][0]["eager_img_s"] > 0, parts["inference"]
    children = [p.read_text() for p in site.glob("seen_*")]
    for script in ("launch/train.py", "launch/export.py", "engine_vs_export.py", "launch/bench_infer.py",
                   "launch/bench_data.py", "--run-part trainer"):
        assert any(script in argv for argv in children), (script, children)


def test_gpu_check_budget_leaves_a_json_naming_the_parts_run_and_skipped(tmp_path):
    """A budget too small for the parts: the part running when it is spent is stopped, the others never
    start, and the JSON says so (it is rewritten after every part, so a killed check still leaves it)."""
    _, env = carried_site(tmp_path)
    # an empty build folder: DeepSpeed's trainer child JIT-builds its shm op (~45 s) and is stopped mid-build
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    result = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), str(tmp_path / "out"), "--cpu",
                             "--parts", "inference,trainer,stage", "--budget-s", "20"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    print({k: report[k] for k in ("parts_run", "parts_skipped", "seconds")})
    assert report["parts_run"] == ["trainer"]  # in order of value, whatever the order asked
    assert report["parts"]["trainer"]["status"] == "stopped at the budget"
    assert "still running after" in report["parts"]["trainer"]["error"]
    assert report["parts_skipped"] == {"stage": "--budget-s 20 spent", "inference": "--budget-s 20 spent"}
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert left == []  # the part's own children (train.py) were stopped with it
    assert list((tmp_path / "torch_extensions").glob("*/build.ninja"))  # the build had begun ...
    assert not list((tmp_path / "torch_extensions").glob("**/lock"))  # ... and left no lock for the next one
    bad = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), str(tmp_path / "bad"), "--cpu", "--parts",
                          "trainer,speed"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "--parts: unknown speed; choose from trainer" in bad.stderr


def add_bad_files(root: Path) -> dict[str, str]:
    """A truncated, an empty, a non-image and a corrupt-inside (whole-looking) .JPEG among the train images."""
    folder = root / "train" / sorted(p.name for p in (root / "train").iterdir())[0]
    good = next(folder.glob("*.JPEG")).read_bytes()
    files = {"truncated": good[:len(good) // 2], "empty": b"", "notimage": b"<html>404 Not Found</html>\n",
             "corrupt": good[:200] + bytes(range(256)) * 2 + good[-2:]}
    for name, data in files.items():
        (folder / f"zz_{name}.JPEG").write_bytes(data)
    return {name: str(folder / f"zz_{name}.JPEG") for name in files}


def check_bad_files_reported(result, bad: dict[str, str], run_dir: Path, store: Path) -> None:
    """The three unreadable files left out at scan time (named in the log, listed, counted in MLflow), the one
    that does not decode replaced in its batch (named, counted)."""
    from mlflow.tracking import MlflowClient

    out = result.stdout + result.stderr
    assert "[data] WARNING 3 file(s) left out" in result.stdout
    for name in ("truncated", "empty", "notimage"):
        assert bad[name] in result.stdout
    assert f"WARNING {bad['corrupt']}: cannot decode image" in out and "replaced by" in out
    assert (run_dir / "bad_files.txt").read_text().count("\n") == 3
    client = MlflowClient(f"sqlite:///{store}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run.data.metrics["data/bad_files"] == 3 and run.data.metrics["data/replaced_images"] >= 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/bad_files.txt", "data/first_batch.png"} <= artifacts


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_bad_image_files_never_stop_a_run(tmp_path, digits_root, backend):
    """An unverified tree with a truncated, an empty and a non-image .JPEG (left out at scan time: a
    cheap header/end-marker check, named in the log and counted in MLflow) and one that looks whole but
    does not decode (replaced in its batch when read, named and counted). FFCV: prepare_data names and
    leaves them out. Every run finishes. The folder backend's case (2 ranks sharing the scan-time check) is
    test_two_process_training_learns_and_saves_the_run."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(digits_root, root, ignore=shutil.ignore_patterns("*_filelist.txt", "*.beton"))
    bad = add_bad_files(root)
    data_root = root
    if backend == "ffcv":
        prep = run_script(str(REPO / "launch/prepare_data.py"), "ffcv", "--root", str(root), "--out",
                          str(tmp_path / "beton"), "--max-side", "32", "--workers", "1", "--skip-bad")
        assert prep.returncode == 0, prep.stderr[-2000:]
        assert all(path in prep.stdout for path in bad.values()), prep.stdout[-2000:]
        data_root = tmp_path / "beton"
    result = run_script(TRAIN, "--config", "cs_mixer_tiny", f"data.root={data_root}", f"data.backend={backend}",
                        f"train.output_dir={tmp_path}", "train.run_name=bad", "train.epochs=1", "train.log_every=5",
                        "schedule.warmup_epochs=0", "data.workers=1", "deepspeed.zero_stage=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val_top1=" in result.stdout
    if backend == "ffcv":
        return
    check_bad_files_reported(result, bad, tmp_path / "bad", tmp_path / "mlflow.db")
