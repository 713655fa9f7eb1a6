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


def pretrained_cfg(info: ModelInfo, model: nn.Module) -> dict:
    """timm's pretrained_cfg (default_cfg) of a built variant, from the model table: the evaluation transform
    (input size, crop_pct, interpolation, mean, std), the pooled map's size, the first conv and the classifier.
    No download URL: weights come from an exported file (`checkpoint_path`, or timm's `pretrained_cfg_overlay=
    dict(file=...)`)."""
    side = model.img_size // model.feature_info[-1]["reduction"]
    return {"architecture": info.name, "tag": "", "url": "", "num_classes": model.num_classes,
            "input_size": (3, model.img_size, model.img_size), "pool_size": (side, side), "crop_pct": info.crop_pct,
            "crop_mode": "center", "interpolation": "bicubic", "mean": info.mean, "std": info.std,
            "first_conv": model.first_conv, "classifier": "head", "license": "apache-2.0",
            "paper_name": {"cs_mixer": "CS-Mixer", "s2mlpv2": "S2-MLPv2"}[info.family],
            # CS-Mixer's token mixing is sized for its G x G windows at every stage: only the built size runs
            "fixed_input_size": info.family == "cs_mixer"}


def create_model(name: str, checkpoint_path: str | None = None, features_only: bool = False,
                 out_indices: int | list[int] | tuple[int, ...] | None = None, **overrides) -> nn.Module:
    """Build variant `name`; keyword overrides replace its constructor arguments
    (num_classes, img_size, drop_path, global_pool, and each family's structural knobs). With `checkpoint_path`
    (a file from launch/export.py, timm's argument name) the weights are loaded, and the file's
    num_classes/img_size are used unless overridden. features_only=True (timm's): a backbone returning the
    stages' maps, NCHW (out_indices: which stages; default all), with feature_info.channels()/.reduction()."""
    info = model_info(name)
    allowed = [p for p in inspect.signature(info.model_class).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"{name}: unknown override(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    state, class_names = None, None
    if checkpoint_path is not None:
        from .exported import load_exported

        state, header = load_exported(checkpoint_path)
        class_names = header.get("class_names")
        convert = getattr(info.model_class, "convert_legacy_state", None)
        state = convert(state) if convert else state
        if header["model"] != name:
            raise ValueError(f"{checkpoint_path} holds weights of {header['model']!r}, not {name!r}")
        overrides = {**header["model_args"], **{k: v for k, v in overrides.items() if v is not None}}
    args = {"img_size": info.img_size, **info.model_args}
    args.update({k: v for k, v in overrides.items() if v is not None})
    model = info.model_class(**args)
    model.model_name = name
    model.pretrained_cfg = model.default_cfg = pretrained_cfg(info, model)
    # the training tree's class folders (wnids), in output order; None for a file exported without them
    model.class_names = class_names if state is not None else None
    if model.class_names:
        model.pretrained_cfg["label_names"] = tuple(model.class_names)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{checkpoint_path} does not fit {name} built with {overrides}: {e}") from None
    if features_only:
        from .layers import FeatureMaps

        return FeatureMaps(model, out_indices)
    return model
