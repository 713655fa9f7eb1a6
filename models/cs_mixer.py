"""CS-Mixer: a cross-scale vision MLP with spatial-channel mixing.

Paper: "CS-Mixer: A Cross-Scale Vision MLP Model with Spatial-Channel Mixing" (Cui et al., 2023).
Specification followed here: shared/spec/models.md. Four stages over a cross-scale conv stem;
blocks alternate local (G x G windows) and global (dilated lattice) token grouping, and each
group is mixed across tokens and channels at once by a per-head low-rank matrix M_m.
Tensors stay channels-last, (B, H, W, C), inside the stages.
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


def group_tokens(x: torch.Tensor, g: int, dilated: bool) -> torch.Tensor:
    """(B, H, W, C) -> (B*H*W/g^2, g^2, C). Local: contiguous g x g windows. Dilated (global):
    each group takes g x g tokens spaced H/g apart. Never mixes samples of a batch."""
    b, h, w, c = x.shape
    if dilated:
        x = x.view(b, g, h // g, g, w // g, c).permute(0, 2, 4, 1, 3, 5)
    else:
        x = x.view(b, h // g, g, w // g, g, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, g * g, c)


def ungroup_tokens(x: torch.Tensor, g: int, dilated: bool, h: int, w: int) -> torch.Tensor:
    """The inverse of group_tokens."""
    c = x.shape[-1]
    x = x.view(-1, h // g, w // g, g, g, c)
    x = x.permute(0, 3, 1, 4, 2, 5) if dilated else x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class CrossScaleStem(nn.Module):
    """Four parallel stride-4 convs with kernels 4, 8, 16, 32, concatenated, then LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, kernels: tuple[int, ...] = (4, 8, 16, 32)) -> None:
        super().__init__()
        widths = [embed_dim // 2, embed_dim // 4, embed_dim // 8]
        widths.append(embed_dim - sum(widths))  # the last takes the remainder
        self.convs = nn.ModuleList(
            nn.Conv2d(in_chans, c, k, stride=4, padding=(k - 4) // 2) for c, k in zip(widths, kernels))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [conv(x) for conv in self.convs]
        return self.norm(torch.cat(maps, dim=1).permute(0, 2, 3, 1))


class CrossScaleDownsample(nn.Module):
    """LayerNorm, then two parallel stride-2 convs (kernels 2 and 4), concatenated: C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, stride=2, padding=(k - 2) // 2) for k in (2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).permute(0, 3, 1, 2)
        return torch.cat([conv(x) for conv in self.convs], dim=1).permute(0, 2, 3, 1)


class SpatialChannelMixer(nn.Module):
    """Mixes each group X (L x C): Y = (U * Z') W_o, U = X W_u, Z' = Z W_p, where head m's
    Z_m = unvec(vec(V_m) M_m + beta_m) and V = X W_v. M_m is (L*d) x (L*d): tokens and channels
    mix at once. All heads' products run as one batched matmul."""

    def __init__(self, dim: int, tokens: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.tokens, self.num_heads, self.head_dim = tokens, num_heads, head_dim
        n = tokens * head_dim
        self.u = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, num_heads * head_dim)
        self.mix_weight = nn.Parameter(torch.empty(num_heads, n, n))   # M_m
        self.mix_bias = nn.Parameter(torch.empty(num_heads, 1, n))     # beta_m
        self.p = nn.Linear(num_heads * head_dim, dim)
        self.o = nn.Linear(dim, dim)

    def reset_parameters(self) -> None:
        """Applied after the model-wide Linear init: so that at init Z' ~ 1 and Y ~ proj(U)."""
        nn.init.trunc_normal_(self.mix_weight, std=0.02)
        nn.init.zeros_(self.mix_bias)
        bound = 1e-3 / self.tokens
        nn.init.uniform_(self.p.weight, -bound, bound)
        nn.init.ones_(self.p.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, L, _ = x.shape
        h, d = self.num_heads, self.head_dim
        # (n, L, h*d) -> (h, n, L*d): vec() flattens each head token-major.
        v = self.v(x).view(n, L, h, d).permute(2, 0, 1, 3).reshape(h, n, L * d)
        z = torch.baddbmm(self.mix_bias, v, self.mix_weight)          # (h, n, L*d)
        z = z.view(h, n, L, d).permute(1, 2, 0, 3).reshape(n, L, h * d)
        return self.o(self.u(x) * self.p(z))


class CSMixerBlock(nn.Module):
    def __init__(self, dim: int, group_size: int, dilated: bool, num_heads: int, head_dim: int,
                 mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.group_size, self.dilated = group_size, dilated
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = SpatialChannelMixer(dim, group_size ** 2, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        g, dilated = self.group_size, self.dilated
        y = ungroup_tokens(self.mixer(group_tokens(self.norm1(x), g, dilated)), g, dilated, h, w)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, {'global' if self.dilated else 'local'}"


class CSMixer(TimmModelApi, nn.Module):
    first_conv = tuple(f"stem.convs.{i}" for i in range(4))  # timm's pretrained_cfg: the input's convs
    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), head_dim: int = 4, group_size: int = 7,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, global_pool: str = "avg",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_global_pool(global_pool)
        img_size = square_side(img_size, "CSMixer")
        if len(depths) != len(num_heads):
            raise ValueError(f"CSMixer: depths {depths} and num_heads {num_heads} differ in length")
        if img_size % 4:
            raise ValueError(f"CSMixer: img_size {img_size} is not divisible by the stem's stride 4")
        self.num_classes, self.img_size, self.global_pool, self.in_chans = num_classes, img_size, global_pool, in_chans
        self.grad_checkpointing = False
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.feature_info = FeatureInfo(dict(num_chs=d, reduction=4 * 2 ** i, module=f"stages.{i}")
                                        for i, d in enumerate(dims))
        self.num_features = dims[-1]
        side = img_size // 4
        self.stem = CrossScaleStem(in_chans, embed_dim)
        rates = stochastic_depth_rates(drop_path, depths)
        self.stages = nn.ModuleList()
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            if i > 0:
                if side % 2:
                    raise ValueError(f"CSMixer: stage {i + 1} downsamples a side of {side}, which is odd "
                                     f"(img_size {img_size})")
                side //= 2
            g = min(group_size, side)
            if side % g:
                raise ValueError(f"CSMixer: stage {i + 1} has side {side}, not divisible by group size {g} "
                                 f"(img_size {img_size}, group_size {group_size})")
            blocks = [CSMixerBlock(dim, g, dilated=(j % 2 == 1 and side > g), num_heads=heads,
                                   head_dim=head_dim, mlp_ratio=mlp_ratio, drop_path=rates[i][j])
                      for j in range(depth)]
            down = CrossScaleDownsample(dims[i - 1]) if i > 0 else nn.Identity()
            self.stages.append(nn.Sequential(down, *blocks))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.apply(init_linear_and_norm)
        for m in self.modules():
            if isinstance(m, SpatialChannelMixer):
                m.reset_parameters()
        if device is not None or dtype is not None:  # timm's factory passes them
            self.to(device=device, dtype=dtype)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay beyond norms and biases (the 1-D ones)."""
        return {n for n, _ in self.named_parameters() if n.endswith("mix_bias")}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (layer decay, freezing): the stem, then the blocks in order (a stage's
        downsample, stages.i.0, with its first block); the final norm and head after them."""
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.0\.", (1,)), (r"^stages\.(\d+)\.(\d+)", None)]}

    def stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


def _variant(name: str, paper: dict | None = None, img_size: int = 224, **model_args) -> ModelInfo:
    return ModelInfo(name=name, family="cs_mixer", model_class=CSMixer, model_args=model_args,
                     img_size=img_size, crop_pct=0.875 if img_size == 224 else 1.0, paper=paper or {})


register_model(
    _variant("cs_mixer_t", embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16), head_dim=2,
             drop_path=0.1),
    _variant("cs_mixer_s", embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), head_dim=4,
             drop_path=0.2),
    _variant("cs_mixer_b", embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), head_dim=4,
             drop_path=0.3),
    _variant("cs_mixer_l", paper=dict(params_m=94, gmacs=13.7, top1=83.2), embed_dim=128,
             depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), head_dim=4, drop_path=0.5),
    # For tests, the demo and CPU work: 32-64 px inputs.
    _variant("cs_mixer_tiny", img_size=32, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
             head_dim=2, group_size=4, drop_path=0.0),
    # A larger CPU variant (twice tiny's width, stage 3 twice as deep; 4.4x its MACs): the teacher of the
    # distillation measured on digits (docs/budgets.md).
    _variant("cs_mixer_mini", img_size=32, embed_dim=64, depths=(1, 1, 4, 1), num_heads=(2, 4, 8, 16),
             head_dim=2, group_size=4, drop_path=0.0),
)
