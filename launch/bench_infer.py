"""Inference speed per variant: latency at batch 1 and throughput at a large batch, for PyTorch eager,
torch.compile and onnxruntime (the ONNX file launch/export.py writes), plus that file's parity.

    python launch/bench_infer.py                                  # every variant, this CPU
    python launch/bench_infer.py --models cs_mixer_t,s2mlpv2_small --large-batch 64 --json out.json
    python launch/bench_infer.py --checkpoint cs_mixer_l.safetensors   # a trained model's own weights

fp32 on the CPU (onnxruntime's CPU provider, as many intra-op threads as torch uses); on a GPU, PyTorch
runs bf16 autocast and onnxruntime its CUDA provider when installed (fp32). Latency is the median of
--iters forward passes at batch 1; throughput the images/s of the median pass at --large-batch.
`parity` is onnxruntime's max |logit difference| to PyTorch eager in fp32. Weights are random unless
--checkpoint (speed does not depend on them). A benchmark, not a test: it prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models import create_model, list_models, model_info  # noqa: E402
from models.exported import export_onnx, onnx_parity  # noqa: E402


def timed(fn, x: torch.Tensor, iters: int, device: torch.device) -> float:
    """Median seconds of one call, after one warm-up call."""
    fn(x)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(name: str, checkpoint: str | None, large: int, iters: int, backends: list[str], device: torch.device,
          tmp: Path) -> dict:
    model = (create_model(name, checkpoint_path=checkpoint) if checkpoint else create_model(name)).eval()
    size = model.img_size
    row: dict = {"model": name, "img_size": size, "large_batch": large}
    gpu = device.type == "cuda"
    x1, xl = torch.randn(1, 3, size, size), torch.randn(large, 3, size, size)
    for backend in backends:
        if backend == "onnxruntime":
            import onnxruntime as ort

            path = tmp / f"{name}.onnx"
            t = time.perf_counter()
            export_onnx(model, path, size)
            row["onnx_export_s"] = round(time.perf_counter() - t, 1)
            row["parity"] = onnx_parity(path, model, size)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            providers = ["CUDAExecutionProvider"] if gpu and "CUDAExecutionProvider" in ort.get_available_providers() \
                else ["CPUExecutionProvider"]
            session = ort.InferenceSession(str(path), options, providers=providers)
            fn = lambda x, s=session: s.run(["logits"], {"images": x.numpy()})  # noqa: E731 - host arrays in, out
            row["onnxruntime_provider"] = providers[0]
            b1, bl = timed(fn, x1, iters, torch.device("cpu")), timed(fn, xl, max(2, iters // 4), torch.device("cpu"))
        else:
            # a copy on the device: Module.to() moves in place, and the onnxruntime row exports `model` with
            # host inputs (with the model moved to CUDA by an earlier row, every row of the run failed)
            net = copy.deepcopy(model).to(device) if device != torch.device("cpu") else model
            if backend == "compiled":
                # variants of a family share forward()'s code: without a reset their graphs add up against
                # dynamo's recompile limit (8), after which it silently runs eager
                torch._dynamo.reset()
                t = time.perf_counter()
                net = torch.compile(net)
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else nullcontext()

            def fn(x, net=net, amp=amp):
                with torch.no_grad(), amp:
                    return net(x.to(device, non_blocking=True))
            if backend == "compiled":  # both shapes compiled before timing
                fn(x1)
                fn(xl)
                row["compile_s"] = round(time.perf_counter() - t, 1)
            b1, bl = timed(fn, x1, iters, device), timed(fn, xl, max(2, iters // 4), device)
        row[f"{backend}_b1_ms"] = round(1000 * b1, 2)
        row[f"{backend}_img_s"] = round(large / bl, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="all", help="comma-separated variant names, or 'all'")
    p.add_argument("--checkpoint", help="an exported .safetensors file (then --models is its model)")
    p.add_argument("--large-batch", type=int, default=None, help="default: 256 on a GPU, 16 on a CPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--backends", default="eager,compiled,onnxruntime")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends.split(",")
    unknown = set(backends) - {"eager", "compiled", "onnxruntime"}
    if unknown:
        p.error(f"--backends: unknown {', '.join(sorted(unknown))}; choose from eager, compiled, onnxruntime")
    if args.checkpoint:
        from models.exported import load_exported
        names = [load_exported(args.checkpoint)[1]["model"]]
    else:
        names = list_models() if args.models == "all" else args.models.split(",")
        for n in names:
            model_info(n)  # an unknown name: a clear error listing the known ones
    large = args.large_batch or (256 if device.type == "cuda" else 16)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# {where}; torch {torch.__version__}; latency at batch 1 (ms), throughput at batch {large} (img/s)")
    cols = [f"{b}_{k}" for b in backends for k in ("b1_ms", "img_s")] + (["parity"] if "onnxruntime" in backends else [])
    print(f"{'model':<16}{'px':>5}" + "".join(f"{c:>20}" for c in cols))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = bench(name, args.checkpoint, large, args.iters, backends, device, Path(tmp))
            rows.append(row)
            print(f"{name:<16}{row['img_size']:>5}" + "".join(
                f"{row[c]:>20.2e}" if c == "parity" else f"{row[c]:>20}" for c in cols), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
