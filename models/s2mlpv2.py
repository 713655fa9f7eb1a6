"""S²-MLPv2: an improved spatial-shift MLP.

Paper: "S²-MLPv2: Improved Spatial-Shift MLP Architecture for Vision" (Yu et al., 2021).
Specification followed here: shared/spec/models.md. A two-stage pyramid over a 7 x 7 patch
embedding; each block expands channels threefold, shifts two of the three parts in opposite
patterns, and merges the three with split attention. Channels-last, (B, H, W, C), in blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from ._registry import ModelInfo, register_model
from .layers import (
    DropPath,
    FeatureInfo,
    Mlp,
    TimmModelApi,
    check_global_pool,
    init_linear_and_norm,
    square_side,
    stochastic_depth_rates,
)


def _shift(x: torch.Tensor, axis: int, step: int) -> torch.Tensor:
    """Move x by `step` (+1/-1) along `axis`; the vacated border keeps its old value."""
    n = x.shape[axis]
    if step > 0:
        return torch.cat([x.narrow(axis, 0, 1), x.narrow(axis, 0, n - 1)], dim=axis)
    return torch.cat([x.narrow(axis, 1, n - 1), x.narrow(axis, n - 1, 1)], dim=axis)


def _shift_groups(x: torch.Tensor, moves: list[tuple[int, int]]) -> torch.Tensor:
    """Split channels into 4 groups and move group i by moves[i] = (axis, step). Out of place:
    assigning a shifted slice onto an overlapping view of x gives device-dependent results."""
    q = x.shape[-1] // 4  # slices rather than chunk(): torch.fx can trace them (a chunk's parts cannot be iterated)
    parts: list[torch.Tensor] = []
    for i, move in enumerate(moves):
        parts.append(_shift(x[..., i * q:(i + 1) * q], move[0], move[1]))
    return torch.cat(parts, dim=-1)


# The moves as (axis, step) of a (B, H, W, C) tensor: axis 1 is H, axis 2 is W (literals: TorchScript).
def shift1(x: torch.Tensor) -> torch.Tensor:
    return _shift_groups(x, [(2, 1), (2, -1), (1, 1), (1, -1)])  # W+, W-, H+, H-


def shift2(x: torch.Tensor) -> torch.Tensor:
    return _shift_groups(x, [(1, 1), (1, -1), (2, 1), (2, -1)])  # H+, H-, W+, W-


class SplitAttention(nn.Module):
    """Weights for the three branches from their pooled sum, via a C -> C/4 -> 3C bottleneck."""

    def __init__(self, dim: int, branches: int = 3) -> None:
        super().__init__()
        self.branches = branches
        self.fc1 = nn.Linear(dim, dim // 4)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim // 4, dim * branches)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """xs: (K, B, H, W, C) -> (B, H, W, C), the attention-weighted sum over the K branches."""
        k, b, _, _, c = xs.shape
        a = xs.sum(dim=0).mean(dim=(1, 2))                            # (B, C)
        w = self.fc2(self.act(self.fc1(a))).view(b, k, c).softmax(dim=1)
        return (xs * w.transpose(0, 1)[:, :, None, None, :]).sum(dim=0)


class S2Block(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"S2MLPv2: block width {dim} is not divisible by the 4 shift groups")
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim)
        self.expand = nn.Linear(dim, dim * 3)
        self.attn = SplitAttention(dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, d = self.expand(self.norm1(x)), self.dim
        x1, x2, x3 = y[..., :d], y[..., d:2 * d], y[..., 2 * d:]  # as chunk(3), but traceable by torch.fx
        y = self.proj(self.attn(torch.stack([shift1(x1), shift2(x2), x3])))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Downsample(nn.Conv2d):
    """The 2x2 stride-2 patch merge between stages, on channels-last maps (a Conv2d, so its weights keep the
    conv's names)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x.permute(0, 3, 1, 2), self.weight, self.bias).permute(0, 2, 3, 1)


class S2MLPv2(TimmModelApi, nn.Module):
    first_conv = "patch_embed"  # timm's pretrained_cfg: the input's conv
    stem_is_feature = True  # feature level 0 is the patch embedding (see feature_info)
    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 patch_size: int = 7, embed_dims: tuple[int, ...] = (192, 384),
                 depths: tuple[int, ...] = (4, 14), mlp_ratio: float = 3.0, drop_path: float = 0.0,
                 global_pool: str = "avg", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_global_pool(global_pool)
        img_size = square_side(img_size, "S2MLPv2")
        if len(depths) != len(embed_dims):
            raise ValueError(f"S2MLPv2: depths {depths} and embed_dims {embed_dims} differ in length")
        if img_size % patch_size:
            raise ValueError(f"S2MLPv2: stage 1: img_size {img_size} is not divisible by the patch "
                             f"size {patch_size}")
        side = img_size // patch_size
        for i in range(1, len(depths)):
            if side % 2:
                raise ValueError(f"S2MLPv2: stage {i + 1} downsamples a side of {side}, which is odd "
                                 f"(img_size {img_size}, patch size {patch_size})")
            side //= 2
        self.num_classes, self.img_size, self.global_pool, self.in_chans = num_classes, img_size, global_pool, in_chans
        self.grad_checkpointing = False
        self.num_features = embed_dims[-1]
        # The patch embedding is a feature level too (timm exposes a CNN's stem the same way): with only two
        # stages, a backbone would otherwise give a two-level pyramid.
        self.feature_info = FeatureInfo([dict(num_chs=embed_dims[0], reduction=patch_size, module="patch_embed")] + [
            dict(num_chs=d, reduction=patch_size * 2 ** i, module=f"stages.{i}") for i, d in enumerate(embed_dims)])
        self.patch_embed = nn.Conv2d(in_chans, embed_dims[0], patch_size, stride=patch_size)
        rates = stochastic_depth_rates(drop_path, depths)
        # stages.i.0 is the stage's 2x2 stride-2 downsample (an identity in the first), as in CS-Mixer
        self.stages = nn.ModuleList(
            nn.Sequential(Downsample(embed_dims[i - 1], dim) if i else nn.Identity(),
                          *[S2Block(dim, mlp_ratio, rates[i][j]) for j in range(depth)])
            for i, (dim, depth) in enumerate(zip(embed_dims, depths)))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.apply(init_linear_and_norm)
        if device is not None or dtype is not None:  # timm's factory passes them
            self.to(device=device, dtype=dtype)

    @staticmethod
    def convert_legacy_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights saved before the downsamples moved into their stages (downsamples.i -> stages.i+1.0, and each
        stage's blocks one place on): renamed, so older exported files still load. Others pass unchanged."""
        if not any(k.startswith("downsamples.") for k in state):
            return state
        import re

        def rename(key: str) -> str:
            if m := re.match(r"downsamples\.(\d+)\.(.*)", key):
                return f"stages.{int(m[1]) + 1}.0.{m[2]}"
            if m := re.match(r"stages\.(\d+)\.(\d+)\.(.*)", key):
                return f"stages.{m[1]}.{int(m[2]) + 1}.{m[3]}"
            return key
        return {rename(k): v for k, v in state.items()}

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond norms and biases (the 1-D parameters)."""
        return set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (layer decay, freezing): the patch embedding, then the blocks in order (a
        stage's downsample, stages.i.0, with its first block); the final norm and head after them."""
        return {"stem": r"^patch_embed", "blocks": r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.0\.", (1,)), (r"^stages\.(\d+)\.(\d+)", None)]}

    def stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x).permute(0, 2, 3, 1)


def _variant(name: str, paper: dict | None = None, img_size: int = 224, crop_pct: float = 0.875,
             **model_args) -> ModelInfo:
    return ModelInfo(name=name, family="s2mlpv2", model_class=S2MLPv2, model_args=model_args,
                     img_size=img_size, crop_pct=crop_pct, paper=paper or {})


register_model(
    _variant("s2mlpv2_small", paper=dict(params_m=25, gmacs=6.9, top1=82.0),
             embed_dims=(192, 384), depths=(4, 14), drop_path=0.1),
    _variant("s2mlpv2_medium", paper=dict(params_m=55, gmacs=16.3, top1=83.6), crop_pct=0.9,
             embed_dims=(256, 512), depths=(7, 17), drop_path=0.1),
    # For tests, the demo and CPU work: 4-px patches for 32-64 px inputs.
    _variant("s2mlpv2_tiny", img_size=32, crop_pct=1.0, patch_size=4, embed_dims=(64, 128), depths=(2, 2),
             drop_path=0.0),
)
