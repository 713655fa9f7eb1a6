"""Everything a lent GPU can tell us, in one run, into one JSON that is never lost (scripts/gpu_check.sh wraps it).

    bash scripts/gpu_check.sh OUTDIR                       # on a GPU: full-size variants, batch 128, bf16
    bash scripts/gpu_check.sh OUTDIR --cpu --budget-s 20   # dry mode on a CPU: tiny variants, a few steps
    bash scripts/gpu_check.sh OUTDIR --parts trainer,compiled

Parts, in order of value (each in its own process: one that fails, hangs or crashes keeps the others):
  trainer    the trainer on that device: ZeRO-2, synthetic data, compile on, train, stop (checkpoint),
             resume, evaluate; then an export whose logits are compared with the engine's
  compiled   forward+backward+AdamW images/s of cs_mixer_t and cs_mixer_l, eager and torch.compile'd,
             with and without grad checkpointing; MFU against the measured matmul peak; peak memory
  stage      the shared augmentation stage (RandAugment m9 n2, erasing, Mixup/CutMix) at batch 128, 224 px
  dali       DALI's decode on that device (launch/bench_data.py; needs nvidia-dali)
  models     the other variants, as `compiled` does
  inference  launch/bench_infer.py: latency at batch 1 and throughput at 256, eager / compiled / onnxruntime
Up front, every dependency the parts need is imported once, in the environment the parts get (the
inherited PYTHONPATH, where gpu_check.sh puts the carried wheels), and named when missing.
OUTDIR/gpu_check.json is rewritten after every part. After --budget-s seconds no part starts, and a
part still running is stopped: the JSON lists the parts run (with their status) and the parts skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "launch")]

PARTS = ["trainer", "compiled", "stage", "dali", "models", "inference"]
# what each part imports beyond torch (the carried wheels on the GPU machine), checked up front
NEEDS = {"trainer": ["deepspeed", "safetensors", "yaml", "psutil", "tqdm"], "compiled": [], "stage": [],
         "dali": ["nvidia.dali"], "models": [], "inference": ["safetensors"]}
OPTIONAL = ["onnx", "onnxscript", "onnxruntime", "mlflow"]
CORE_MODELS = {"gpu": ["cs_mixer_t", "cs_mixer_l"], "cpu": ["cs_mixer_tiny"]}
OTHER_MODELS = {"gpu": ["cs_mixer_s", "cs_mixer_b", "s2mlpv2_small", "s2mlpv2_medium"], "cpu": ["s2mlpv2_tiny"]}

ENGINE_VS_EXPORT = """
import json, sys, torch
from models import count_params, create_model
from trainer.build import build_engine, build_model
from trainer.checkpoint import check_complete, find_checkpoint
from trainer.config import config_from_dict, plan_run
from trainer.distributed import init_distributed, shutdown

tag = find_checkpoint(sys.argv[1])
env = init_distributed()
cfg = config_from_dict(check_complete(tag)["config"], ["train.compile=false"])
model = build_model(cfg)
engine = build_engine(plan_run(cfg, env.world_size, count_params(model), check_data=False), model)
engine.load_checkpoint(str(tag.parent), tag=tag.name)
engine.eval()
dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
x = torch.randn(8, 3, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    ours = engine(x.to(env.device, dtype)).float().cpu()
    exported = create_model(cfg.model.name, checkpoint_path=sys.argv[2]).to(env.device, dtype).eval()
    # the engine's precision: DeepSpeed's torch_autocast (the default bf16_mode) or bf16 weights
    with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=engine.torch_autocast_enabled()):
        theirs = exported(x.to(env.device, dtype)).float().cpu()
print("PARITY " + json.dumps({"max_abs_diff": (ours - theirs).abs().max().item(), "bit_identical": torch.equal(ours, theirs)}))
shutdown()
"""


def model_rows(names: list[str], batch: int, steps: int, warmup: int, bf16: bool, backend: str, device,
               partial: Path) -> list[dict]:
    """One row per (variant, compile, grad checkpointing); each row is written to `partial` as it ends, so a
    part stopped at the budget keeps the rows it measured."""
    import torch
    from bench_model import bench

    from trainer.mfu import measured_peak_tflops

    peak = measured_peak_tflops(device, bf16)
    rows = []
    for name in names:
        for compiled in (False, True):
            for gc in (False, True):
                row = dict(model=name, compile=compiled, grad_checkpointing=gc)
                try:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    torch._dynamo.reset()
                    row.update(bench(name, batch, steps, warmup, bf16, compiled, device, None, peak, gc,
                                     compile_backend=backend))
                    if device.type == "cuda":
                        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, measure the rest
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(dict(row, matmul_peak_tflops=round(peak, 3)))
                print(json.dumps(row), flush=True)
                partial.write_text(json.dumps(rows))
    return rows


def augment_row(batch: int, size: int, device, batches: int = 20) -> dict:
    """The device stage's throughput on uint8 batches (random pixels: the ops' cost does not depend on them)."""
    import torch

    from data_pipeline.augment import DeviceAugment

    stage = DeviceAugment(auto_augment="rand-m9-mstd0.5-inc1", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          num_classes=1000, device=device)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    for i in range(3):  # warm-up
        stage(x, y, seed=i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(batches):
        stage(x, y, seed=100 + i)
    sync()
    dt = time.perf_counter() - t0
    return {"spec": "rand-m9-mstd0.5-inc1 + reprob 0.25 + mixup/cutmix", "batch": batch, "img_size": size,
            "images_per_s": round(batch * batches / dt, 1), "ms_per_batch": round(1000 * dt / batches, 2)}


def child_env() -> dict[str, str]:
    """The environment of every child: the repository first, then the inherited PYTHONPATH (where
    gpu_check.sh installs the carried wheels: replacing it hid DeepSpeed from every child)."""
    inherited = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), *([inherited] if inherited else [])])}


def run(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    env = child_env()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    return result


def trainer_check(out: Path, model: str, batch: int, steps: int, img_size: int | None, backend: str) -> dict:
    """Train steps/2, stop (checkpoint), resume to `steps` (evaluation at the end), export, compare logits."""
    common = [sys.executable, "launch/train.py", "--config", model, "data.backend=synthetic",
              f"data.synthetic_size={batch * steps}", f"train.batch_size={batch}", "train.global_batch=null",
              "train.grad_accum=1", "deepspeed.zero_stage=2", "train.compile=true",
              f"train.compile_backend={backend}", f"train.log_every={max(1, steps // 10)}", "tracking.enabled=false",
              f"train.output_dir={out / 'runs'}", "train.run_name=check", "schedule.warmup_epochs=0",
              "train.epochs=1000", "checkpoint.every_steps=0", *([f"model.img_size={img_size}"] if img_size else [])]
    first = run([*common, f"train.max_steps={steps // 2}"], out / "trainer_first.log", 1800)
    second = run([*common, f"train.max_steps={steps}"], out / "trainer_resume.log", 1800)
    result: dict = {"model": model, "batch": batch, "steps": steps, "first_rc": first.returncode,
                    "resume_rc": second.returncode}
    if first.returncode or second.returncode:
        result["error"] = (first.stderr if first.returncode else second.stderr)[-2000:]
        return result
    windows = [float(v) for v in re.findall(r" (\d+) img/s", second.stdout)]
    result.update(resumed="[resume]" in second.stdout, steady_images_per_s=windows[-1] if windows else None,
                  val_top1=float(second.stdout.strip().splitlines()[-1].removeprefix("val_top1=")),
                  compile_report=(re.findall(r"\[compile\] .*", first.stdout) or [None])[0],
                  mfu_log=(re.findall(r"MFU [0-9.]+%", second.stdout) or [None])[-1])
    exported = out / "runs" / "check.safetensors"
    exp = run([sys.executable, "launch/export.py", str(out / "runs" / "check"), "--out", str(exported)],
              out / "export.log", 600)
    if exp.returncode:
        result["export_error"] = exp.stderr[-2000:]
        return result
    script = out / "engine_vs_export.py"
    script.write_text(ENGINE_VS_EXPORT)
    parity = run([sys.executable, str(script), str(out / "runs" / "check"), str(exported)], out / "parity.log", 600)
    found = re.search(r"PARITY (.*)", parity.stdout)
    result["export_parity"] = json.loads(found.group(1)) if found else {"error": parity.stderr[-2000:]}
    return result


def inference_rows(out: Path, gpu: bool) -> dict:
    """launch/bench_infer.py: latency and throughput, eager / compiled / onnxruntime (when onnx, onnxscript
    and onnxruntime import). Dry mode: the tiny model, eager only."""
    import importlib.util

    onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
    args = ["--models", "cs_mixer_t,s2mlpv2_small", "--backends", "eager,compiled" + (",onnxruntime" if onnx else "")] \
        if gpu else ["--models", "cs_mixer_tiny", "--backends", "eager", "--iters", "2", "--large-batch", "4"]
    try:
        r = run([sys.executable, "launch/bench_infer.py", *args, "--json", str(out / "bench_infer.json")],
                out / "bench_infer.log", 900)
    except subprocess.TimeoutExpired:
        return {"error": "bench_infer.py ran past 900 s"}
    if r.returncode:
        return {"error": r.stderr[-2000:]}
    return json.loads((out / "bench_infer.json").read_text())


def dali_rows(out: Path, gpu: bool) -> dict:
    """launch/bench_data.py's DALI rows on this device (GPU: mixed decode and the stage on the GPU)."""
    args = ["--backends", "dali", "--json", "--device", "cuda" if gpu else "cpu"] + \
        ([] if gpu else ["--images", "200", "--batch", "16", "--img-size", "64"])
    r = run([sys.executable, "launch/bench_data.py", *args], out / "bench_data_dali.log", 900)
    if r.returncode:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout[r.stdout.index("{"):])


def run_part(name: str, out: Path, gpu: bool) -> object:
    """One part, in this (child) process; its result is what the parent records."""
    import torch

    device = torch.device("cuda" if gpu else "cpu")
    backend = "inductor" if gpu else "aot_eager"  # no code generation on the CPU dry run: seconds, not minutes
    size = "gpu" if gpu else "cpu"
    if name == "trainer":
        model, batch, steps = ("cs_mixer_l", 128, 150) if gpu else ("cs_mixer_tiny", 16, 8)
        return trainer_check(out, model, batch, steps, None, backend)
    if name in ("compiled", "models"):
        names = (CORE_MODELS if name == "compiled" else OTHER_MODELS)[size]
        return model_rows(names, 128 if gpu else 4, 10 if gpu else 2, 3 if gpu else 1, gpu, backend, device,
                          out / "parts" / f"{name}.partial.json")
    if name == "stage":
        return augment_row(128 if gpu else 16, 224 if gpu else 64, device)
    if name == "dali":
        return dali_rows(out, gpu)
    if name == "inference":
        return inference_rows(out, gpu)
    raise ValueError(name)


def check_imports(parts: list[str]) -> dict:
    """Every module the chosen parts need (and the optional ones), imported once in a child with the
    children's environment: {module: version or 'missing: why'}."""
    modules = sorted({m for p in parts for m in NEEDS[p]} | set(OPTIONAL) | {"torch"})
    probe = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n    try:\n"
             "        out[m] = str(getattr(importlib.import_module(m), '__version__', 'ok'))\n"
             "    except Exception as e:\n        out[m] = f'missing: {type(e).__name__}: {e}'[:300]\n"
             "print('IMPORTS ' + json.dumps(out))")
    r = subprocess.run([sys.executable, "-c", probe, *modules], cwd=REPO, env=child_env(), capture_output=True,
                       text=True, timeout=300)
    found = re.search(r"IMPORTS (.*)", r.stdout)
    return json.loads(found.group(1)) if found else {m: f"missing: the import check failed: {r.stderr[-300:]}"
                                                     for m in modules}


def remove_build_locks(since: float) -> None:
    """A part stopped during a JIT build of DeepSpeed's ops leaves torch's build lock behind, and every later
    build waits on it for ever (seen: the next check hung until its budget ran out). Remove the locks made
    since the stopped part began: nothing else builds while gpu_check runs."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    for lock in root.glob("**/lock"):
        if lock.stat().st_mtime >= since - 1:
            print(f"gpu_check: removing {lock}, left by the stopped part's build", flush=True)
            lock.unlink(missing_ok=True)


def run_child(name: str, out: Path, cpu: bool, timeout: float) -> dict:
    """Run one part in its own process group (its trainer children included), stopped at `timeout`."""
    result_file = out / "parts" / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out), "--run-part", name, *(["--cpu"] if cpu else [])]
    t0 = time.time()
    with open(out / f"part_{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "stopped at the budget"
            remove_build_locks(t0)
    entry: dict = {"status": status, "seconds": round(time.time() - t0, 1)}
    if result_file.is_file():
        entry["result"] = json.loads(result_file.read_text())
    elif (out / "parts" / f"{name}.partial.json").is_file():  # rows measured before it was stopped
        entry["result"] = json.loads((out / "parts" / f"{name}.partial.json").read_text())
    if status != "ok":
        tail = (out / f"part_{name}.log").read_text()[-3000:]
        entry["error"] = f"exit code {rc}: {tail}" if rc is not None else \
            f"still running after {timeout:.0f} s (the rest of --budget-s); its log ends: {tail[-1500:]}"
    return entry


def summarise(report: dict, gpu: bool) -> None:
    """The figures the README's GPU table takes, from the parts' results."""
    parts = report["parts"]
    trainer = parts.get("trainer", {}).get("result") or {}
    rows = [r for p in ("compiled", "models") for r in (parts.get(p, {}).get("result") or [])]
    compiled = [r for r in rows if r.get("model") == trainer.get("model") and r.get("compile")
                and not r.get("grad_checkpointing") and "images_per_s" in r]
    if gpu and compiled and trainer.get("steady_images_per_s"):
        report["trainer_share_of_compiled_fwd_bwd"] = round(trainer["steady_images_per_s"] /
                                                            compiled[0]["images_per_s"], 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--cpu", action="store_true", help="dry mode: tiny variants and sizes, on the CPU")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="no part starts after this many seconds, and a running part is stopped (default 480)")
    p.add_argument("--run-part", choices=PARTS, help=argparse.SUPPRESS)  # the child that runs one part
    args = p.parse_args()
    (args.out / "parts").mkdir(parents=True, exist_ok=True)
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    if args.run_part:
        from trainer import distributed  # noqa: F401  (names DeepSpeed's accelerator before it is imported)
        result = run_part(args.run_part, args.out, gpu)
        (args.out / "parts" / f"{args.run_part}.json").write_text(json.dumps(result, indent=1))
        return 0
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    parts = [x for x in PARTS if x in parts]  # always in order of value
    t_start = time.time()
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "mode": "gpu" if gpu else "cpu",
                    "device": torch.cuda.get_device_name() if gpu else (platform.processor() or "cpu"),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "compile_backend": "inductor" if gpu else "aot_eager", "budget_s": args.budget_s,
                    "parts_run": [], "parts_skipped": {}, "parts": {}}
    path = args.out / "gpu_check.json"

    def write() -> None:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(path)  # a reader never sees half a file

    write()
    report["imports"] = imports = check_imports(parts)
    for module, version in imports.items():
        if version.startswith("missing"):
            print(f"gpu_check: {module} is not importable here ({version}); the parts that need it are skipped. "
                  "On the GPU machine it travels as a wheel: scripts/gpu_wheels.sh, then carry .whl/", flush=True)
    write()
    for name in parts:
        left = args.budget_s - (time.time() - t_start)
        missing = [m for m in NEEDS[name] if imports.get(m, "").startswith("missing")]
        if left <= 0:
            report["parts_skipped"][name] = f"--budget-s {args.budget_s:g} spent"
        elif missing:
            report["parts_skipped"][name] = f"needs {', '.join(missing)}, not importable"
        else:
            print(f"gpu_check: part {name} ({left:.0f} s of the budget left)", flush=True)
            report["parts"][name] = run_child(name, args.out, args.cpu, left)
            report["parts_run"].append(name)
            summarise(report, gpu)
        write()
    report["seconds"] = round(time.time() - t_start, 1)
    write()
    print(json.dumps({k: v for k, v in report.items() if k != "parts"}, indent=1))
    for name, entry in report["parts"].items():
        print(f"  {name}: {entry['status']} in {entry['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
