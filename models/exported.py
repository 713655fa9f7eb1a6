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
