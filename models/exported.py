"""Exported weights: one safetensors file that names its model, so `create_model` can rebuild it
without DeepSpeed or the training config (`create_model(name, checkpoint_path=file)`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FORMAT = "vision-mlp-train/1"


def save_exported(path: str | Path, model_name: str, state: dict[str, torch.Tensor], model_args: dict[str, Any],
                  **info: Any) -> None:
    """Write `state` with its model name and constructor arguments in the safetensors header;
    `info` (step, source checkpoint, EMA or not) is kept there too, as JSON."""
    from safetensors.torch import save_file

    header = {"format": FORMAT, "model": model_name, "model_args": json.dumps(model_args),
              **{k: json.dumps(v) for k, v in info.items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=header)


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of a safetensors file without reading its tensors; our JSON values decoded where it is ours."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    if header.get("format") != FORMAT:
        return header
    return {k: (v if k in ("format", "model") else json.loads(v)) for k, v in header.items()}


def load_exported(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, header) of an exported file; the header's JSON values decoded."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported weights {path} do not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by launch/export.py (no '{FORMAT}' header); "
                         "load it with safetensors and model.load_state_dict instead")
    return state, {k: (v if k in ("format", "model") else json.loads(v)) for k, v in header.items()}


def export_onnx(model: torch.nn.Module, path: str | Path, img_size: int, opset: int = 18,
                metadata: dict[str, str] | None = None) -> None:
    """The model (fp32, eval) as ONNX with a dynamic batch axis: input `images` (N, 3, H, W), normalised as
    in training; output `logits` (N, classes). torch.export-based exporter (needs onnxscript). `metadata`
    (model name, class names as JSON) goes into the file's metadata_props."""
    import contextlib
    import io
    import logging
    import warnings

    model = model.eval().float()
    example = torch.randn(2, 3, img_size, img_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # it narrates each stage
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, opset_version=opset, dynamo=True, external_data=False)
    if metadata:
        import onnx

        proto = onnx.load(str(tmp))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
    tmp.replace(path)


def onnx_parity(path: str | Path, model: torch.nn.Module, img_size: int, batches: tuple[int, ...] = (1, 5)) -> float:
    """Max |logit difference| between onnxruntime (CPU) and the PyTorch model, over random batches of
    the given sizes (more than one: the batch axis really is dynamic)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    model = model.eval().float()
    for n in batches:
        x = torch.randn(n, 3, img_size, img_size, generator=gen)
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
        if out.shape != ref.shape:
            raise ValueError(f"{path}: onnxruntime gave logits of shape {tuple(out.shape)} for a batch of {n}, "
                             f"PyTorch {tuple(ref.shape)}")
        worst = max(worst, (out - ref).abs().max().item())
    return worst
