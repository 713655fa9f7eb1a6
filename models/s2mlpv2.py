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
    MATCH_PREV_GROUP,
    DropPath,
    FeatureInfo,
    Mlp,
    TimmModelApi,
    check_global_pool,
    checkpoint_seq,
    init_linear_and_norm,
    stochastic_depth_rates,
)


def _shift(x: torch.Tensor, axis: int, step: int) -> torch.Tensor:
    """Move x by `step` (+1/-1) along `axis`; the vacated border keeps its old value."""
    n = x.shape[axis]
    if step > 0:
        return torch.cat([x.narrow(axis, 0, 1), x.narrow(axis, 0, n - 1)], dim=axis)
    return torch.cat([x.narrow(axis, 1, n - 1), x.narrow(axis, n - 1, 1)], dim=axis)


def _shift_groups(x: torch.Tensor, moves: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Split channels into 4 groups and move group i by moves[i] = (axis, step). Out of place:
    assigning a shifted slice onto an overlapping view of x gives device-dependent results."""
    q = x.shape[-1] // 4  # slices rather than chunk(): torch.fx can trace them (a chunk's parts cannot be iterated)
    return torch.cat([_shift(x[..., i * q:(i + 1) * q], axis, step) for i, (axis, step) in enumerate(moves)], dim=-1)


_H, _W = 1, 2  # spatial axes of a (B, H, W, C) tensor


def shift1(x: torch.Tensor) -> torch.Tensor:
    return _shift_groups(x, ((_W, 1), (_W, -1), (_H, 1), (_H, -1)))


def shift2(x: torch.Tensor) -> torch.Tensor:
    return _shift_groups(x, ((_H, 1), (_H, -1), (_W, 1), (_W, -1)))


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


class S2MLPv2(TimmModelApi, nn.Module):
    first_conv = "patch_embed"  # timm's pretrained_cfg: the input's conv
    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 patch_size: int = 7, embed_dims: tuple[int, ...] = (192, 384),
                 depths: tuple[int, ...] = (4, 14), mlp_ratio: float = 3.0, drop_path: float = 0.0,
                 global_pool: str = "avg", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_global_pool(global_pool)
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
        self.feature_info = FeatureInfo(dict(num_chs=d, reduction=patch_size * 2 ** i, module=f"stages.{i}")
                                        for i, d in enumerate(embed_dims))
        self.patch_embed = nn.Conv2d(in_chans, embed_dims[0], patch_size, stride=patch_size)
        rates = stochastic_depth_rates(drop_path, depths)
        self.downsamples = nn.ModuleList(
            nn.Conv2d(embed_dims[i - 1], embed_dims[i], 2, stride=2) for i in range(1, len(depths)))
        self.stages = nn.ModuleList(
            nn.Sequential(*[S2Block(dim, mlp_ratio, rates[i][j]) for j in range(depth)])
            for i, (dim, depth) in enumerate(zip(embed_dims, depths)))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.apply(init_linear_and_norm)
        if device is not None or dtype is not None:  # timm's factory passes them
            self.to(device=device, dtype=dtype)

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond norms and biases (the 1-D parameters)."""
        return set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (layer decay, freezing): the patch embedding, then the blocks in order,
        each downsample with the block before it (timm's MATCH_PREV_GROUP); the final norm and head after them."""
        return {"stem": r"^patch_embed", "blocks": r"^stages\.(\d+)|^downsamples\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.(\d+)", None), (r"^downsamples\.(\d+)", MATCH_PREV_GROUP)]}

    def stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x).permute(0, 2, 3, 1)

    def stage_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i > 0:
            x = self.downsamples[i - 1](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        stage = self.stages[i]
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)


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
