"""Export trained weights for use without DeepSpeed: one safetensors file (PyTorch), or ONNX (inference).

    python launch/export.py runs/cs_mixer_l-1234            # the run's latest checkpoint -> safetensors
    python launch/export.py runs/x/checkpoints/step_00050000 --ema --out cs_mixer_l_ema.safetensors
    python launch/export.py cs_mixer_l_ema.safetensors --format onnx --out cs_mixer_l.onnx
    python launch/export.py runs/cs_mixer_l-1234 --format onnx --img-size 448   # another resolution

    model = models.create_model("cs_mixer_l", checkpoint_path="cs_mixer_l_ema.safetensors")

safetensors: the file's header names the model, its num_classes/img_size, the step and the source
checkpoint; weights are the fp32 master copy (gathered from the ZeRO partitions), or the EMA with --ema.
onnx: fp32, opset 18, input `images` (N, 3, H, W) normalised as in training, output `logits`, the
batch axis dynamic; the export is checked against PyTorch with onnxruntime (max |logit difference|
printed, at batch 1 and 5) before it is kept. Source: a checkpoint (any ZeRO stage) or an exported
safetensors file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointError, consolidated_weights, export, find_checkpoint, state_mismatch


def export_onnx_file(source: Path, out: Path | None, ema: bool, img_size: int | None, tolerance: float) -> Path:
    from models import create_model
    from models.exported import export_onnx, onnx_parity

    if source.suffix == ".safetensors":
        model = create_model(_exported_name(source), checkpoint_path=str(source))
        default = source.with_suffix(".onnx")
    else:
        tag_dir = find_checkpoint(source)
        state, meta = consolidated_weights(tag_dir, ema)
        args = {k: meta["config"]["model"][k] for k in ("num_classes", "img_size")}
        model = create_model(meta["model"], **args)
        model.load_state_dict(state)
        model.class_names = meta.get("class_names")
        default = tag_dir.parent.parent / "exported" / f"{meta['model']}-{tag_dir.name}{'-ema' if ema else ''}.onnx"
    if img_size and img_size != model.img_size:
        model = _rebuilt(model, img_size)
    out = out or default
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out, model.img_size, metadata={"model": getattr(model, "model_name", ""),
                                                     "class_names": json.dumps(getattr(model, "class_names", None))})
    diff = onnx_parity(out, model, model.img_size)
    if not diff <= tolerance:
        out.unlink()
        raise CheckpointError(f"ONNX export of {source}: onnxruntime's logits differ from PyTorch's by {diff:.3g} "
                              f"(> --tolerance {tolerance:g}); not kept")
    print(f"onnxruntime vs PyTorch: max |logit difference| {diff:.2e} at batch 1 and 5")
    return out


def _exported_name(path: Path) -> str:
    from models.exported import load_exported
    return load_exported(path)[1]["model"]


def _rebuilt(model: torch.nn.Module, img_size: int) -> torch.nn.Module:
    """The same weights in the model built for another resolution (what the architecture allows)."""
    from models import create_model

    other = create_model(model.model_name, num_classes=model.num_classes, img_size=img_size)
    problems = state_mismatch(other.state_dict(), model.state_dict())
    if problems:
        raise ValueError(f"--img-size {img_size}: {model.model_name} has other weight shapes at that resolution "
                         f"than at {model.img_size} ({problems})")
    other.load_state_dict(model.state_dict())
    return other


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a run directory, its checkpoints/ directory, a step_N directory "
                                                 "(or, for --format onnx, an exported .safetensors file)")
    p.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors")
    p.add_argument("--out", type=Path, help="output file (default: <run dir>/exported/<model>-<step>.<format>)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs with train.model_ema=true)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="safetensors only")
    p.add_argument("--img-size", type=int, help="onnx: the input resolution (default: the one trained at)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="onnx: largest accepted |logit difference|")
    args = p.parse_args(argv)
    try:
        if args.format == "onnx":
            out = export_onnx_file(args.checkpoint, args.out, args.ema, args.img_size, args.tolerance)
            print(f"exported {args.checkpoint} ({'EMA' if args.ema else 'model'} weights, fp32) -> {out}")
            return 0
        tag_dir = find_checkpoint(args.checkpoint)
        out = export(tag_dir, args.out, args.ema, torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {tag_dir} ({'EMA' if args.ema else 'model'} weights, {args.dtype}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
