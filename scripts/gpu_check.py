"""Everything a lent GPU can tell us, in one run, into one JSON (scripts/gpu_check.sh wraps it).

    python scripts/gpu_check.py OUTDIR          # on a GPU: full-size variants, batch 128, bf16
    python scripts/gpu_check.py OUTDIR --cpu    # dry mode on a CPU: tiny variants, a few steps

1. Model speed per variant: forward+backward+AdamW images/s, eager and torch.compile'd, with and
   without grad checkpointing; MFU against the measured bf16 matmul peak (trainer/mfu.py); peak memory.
2. The trainer on that device: ZeRO-2, synthetic data, compile on, steps with evaluation, a
   checkpoint, a resume; then an export whose logits are compared with the engine's.
3. The trainer's steady-state images/s as a share of the compiled forward+backward figure.
4. The shared augmentation stage on the device (RandAugment m9 n2, erasing, Mixup/CutMix; what
   every backend, DALI included, runs per batch): images/s at batch 128, 224 px.
5. Inference (launch/bench_infer.py): latency at batch 1 and throughput at 256 for CS-Mixer-T and
   S2-MLPv2-Small, eager / compiled / onnxruntime (when the ONNX packages import), ONNX parity.
Writes OUTDIR/gpu_check.json and each step's log; prints a summary. A failed part is recorded in the
JSON with its error, and the other parts still run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "launch")]

FULL = ["cs_mixer_t", "cs_mixer_s", "cs_mixer_b", "cs_mixer_l", "s2mlpv2_small", "s2mlpv2_medium"]
TINY = ["cs_mixer_tiny"]

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


def model_rows(names: list[str], batch: int, steps: int, warmup: int, bf16: bool, backend: str, device) -> list[dict]:
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
                rows.append(row)
                print(json.dumps(row), flush=True)
    return [dict(r, matmul_peak_tflops=round(peak, 3)) for r in rows]


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


def run(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--cpu", action="store_true", help="dry mode: tiny variants and sizes, on whatever device")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    gpu = device.type == "cuda"
    backend = "inductor" if gpu else "aot_eager"  # no code generation on the CPU dry run: seconds, not minutes
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "mode": "gpu" if gpu else "cpu",
                    "device": torch.cuda.get_device_name() if gpu else (platform.processor() or "cpu"),
                    "torch": torch.__version__, "python": platform.python_version(), "compile_backend": backend}
    try:
        from trainer import distributed  # noqa: F401  (names DeepSpeed's accelerator before it is imported)
        report["deepspeed"] = __import__("deepspeed").__version__
    except ImportError as e:
        report["deepspeed"] = f"missing: {e}"
    t0 = time.time()
    try:
        report["models"] = model_rows(FULL if gpu else TINY, 128 if gpu else 4, 10 if gpu else 2, 3 if gpu else 1,
                                      gpu, backend, device)
    except Exception:  # noqa: BLE001
        report["models_error"] = traceback.format_exc()[-3000:]
    report["models_s"] = round(time.time() - t0)
    try:
        report["augment"] = augment_row(128 if gpu else 16, 224 if gpu else 64, device)
    except Exception:  # noqa: BLE001
        report["augment"] = {"error": traceback.format_exc()[-3000:]}
    t0 = time.time()
    model, batch, steps = ("cs_mixer_l", 128, 300) if gpu else ("cs_mixer_tiny", 16, 8)
    try:
        report["trainer"] = trainer_check(args.out, model, batch, steps, None, backend)
    except Exception:  # noqa: BLE001
        report["trainer"] = {"error": traceback.format_exc()[-3000:]}
    report["trainer_s"] = round(time.time() - t0)
    compiled = [r for r in report.get("models", []) if r["model"] == model and r["compile"]
                and not r["grad_checkpointing"] and "images_per_s" in r]
    trainer_ips = report["trainer"].get("steady_images_per_s")
    if compiled and trainer_ips and gpu:
        report["trainer_share_of_compiled_fwd_bwd"] = round(trainer_ips / compiled[0]["images_per_s"], 3)
    report["inference"] = inference_rows(args.out, gpu)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "models"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
