"""Both families in timm's registry, so `timm.create_model("cs_mixer_l", ...)` builds them the timm way
(timm's build_model_with_cfg: its pretrained loading, features_only, input-conv adaptation).

`import models` arranges it: at once if timm is already imported, otherwise when timm is first imported (a
one-shot import hook), so processes that never touch timm do not pay its import (~1.7 s) for it.
Weights come from our export files: `timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file="x.safetensors"))`; the file's header gives num_classes and img_size unless the
call overrides them (as `models.create_model(name, checkpoint_path=...)` does).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import torch

from ._registry import list_models, model_info, pretrained_cfg

_registered = False


def register_in_timm() -> None:
    """Register every variant (entry point + pretrained config) in timm's registry; idempotent."""
    global _registered
    if _registered:
        return
    from timm.models import register_model

    cfgs, levels = {}, {}
    for name in list_models():
        info = model_info(name)
        with torch.device("meta"):  # only the shapes are needed
            model = info.model_class(img_size=info.img_size, **info.model_args)
        cfg = pretrained_cfg(info, model)
        cfgs[name] = {k: v for k, v in cfg.items() if k not in ("architecture", "tag", "url")}
        levels[name] = len(model.feature_info)
    _module.default_cfgs = cfgs  # timm reads the entry point's module's default_cfgs
    for name in list_models():
        register_model(_entrypoint(name, levels[name]))
    _registered = True


_module = sys.modules[__name__]


def _entrypoint(name: str, feature_levels: int) -> Callable[..., torch.nn.Module]:
    info = model_info(name)

    def entry(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        from timm.models import build_model_with_cfg

        if "drop_path_rate" in kwargs:  # timm's name for it
            kwargs["drop_path"] = kwargs.pop("drop_path_rate")
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        if pretrained and overlay.get("file"):
            _defaults_from_exported(name, overlay, kwargs)
        args = {**info.model_args, **kwargs}
        args.setdefault("img_size", info.img_size)
        return build_model_with_cfg(
            info.model_class, name, pretrained, pretrained_cfg_overlay=overlay,
            pretrained_filter_fn=_state_filter(info.model_class),
            feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(feature_levels))), **args)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"{name} ({info.family}); see models/{info.family}.py."
    return entry


def _defaults_from_exported(name: str, overlay: dict, kwargs: dict) -> None:
    """An exported file names its model and the num_classes / img_size it was built with: use them (unless the
    call gives its own) and say so in the pretrained config, so timm loads the classifier too."""
    from .exported import FORMAT, read_header

    header = read_header(overlay["file"])
    if header.get("format") != FORMAT:
        return  # some other safetensors / .pth file: timm's own loading applies
    if header["model"] != name:
        raise ValueError(f"{overlay['file']} holds weights of {header['model']!r}, not {name!r}")
    for key, value in header["model_args"].items():
        kwargs.setdefault(key, value)
    overlay.setdefault("num_classes", header["model_args"].get("num_classes", 1000))
    if "img_size" in header["model_args"]:
        side = header["model_args"]["img_size"]
        overlay.setdefault("input_size", (kwargs.get("in_chans", 3), side, side))


def _state_filter(model_class: type) -> Callable[[dict, torch.nn.Module], dict]:
    def filter_fn(state: dict, model: torch.nn.Module) -> dict:
        convert = getattr(model_class, "convert_legacy_state", None)
        return convert(state) if convert else state
    return filter_fn


class _RegisterWhenTimmImports(importlib.abc.MetaPathFinder):
    """Registers the variants right after `import timm` finishes, then steps aside."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            register_in_timm()

        spec.loader.exec_module = exec_then_register
        return spec


def register_when_timm_imports() -> None:
    if "timm" in sys.modules:
        register_in_timm()
    elif importlib.util.find_spec("timm") is not None and \
            not any(isinstance(f, _RegisterWhenTimmImports) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenTimmImports())
