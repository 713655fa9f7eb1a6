"""CS-Mixer and S²-MLPv2, built by name: `create_model("cs_mixer_l", num_classes=100)`."""
from . import cs_mixer, s2mlpv2  # noqa: F401  (registers the variants)
from ._registry import ModelInfo, create_model, list_models, model_info, register_model
from ._timm import register_when_timm_imports
from .profile import count_gmacs, count_params

register_when_timm_imports()  # timm.create_model("cs_mixer_l") where timm is installed

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model",
           "count_gmacs", "count_params"]
