"""Build models by name. Each family file registers its variants (as data) with register_model."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the system needs to know about a variant without building it."""
    name: str
    family: str
    model_class: type[nn.Module]
    model_args: dict
    img_size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    paper: dict = field(default_factory=dict)  # figures the paper reports: params_m, gmacs, top1


_MODELS: dict[str, ModelInfo] = {}


def register_model(*infos: ModelInfo) -> None:
    for info in infos:
        if info.name in _MODELS:
            raise ValueError(f"model {info.name!r} registered twice")
        _MODELS[info.name] = info


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, checkpoint_path: str | None = None, **overrides) -> nn.Module:
    """Build variant `name`; keyword overrides replace its constructor arguments
    (num_classes, img_size, drop_path, and each family's structural knobs). With `checkpoint_path`
    (a file from launch/export.py, timm's argument name) the weights are loaded, and the file's
    num_classes/img_size are used unless overridden."""
    info = model_info(name)
    allowed = [p for p in inspect.signature(info.model_class).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"{name}: unknown override(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    state = None
    if checkpoint_path is not None:
        from .exported import load_exported

        state, header = load_exported(checkpoint_path)
        if header["model"] != name:
            raise ValueError(f"{checkpoint_path} holds weights of {header['model']!r}, not {name!r}")
        overrides = {**header["model_args"], **{k: v for k, v in overrides.items() if v is not None}}
    args = {"img_size": info.img_size, **info.model_args}
    args.update({k: v for k, v in overrides.items() if v is not None})
    model = info.model_class(**args)
    model.model_name = name
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{checkpoint_path} does not fit {name} built with {overrides}: {e}") from None
    return model
