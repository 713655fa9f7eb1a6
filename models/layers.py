"""Layers shared by both model families."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples' residual branches with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty([x.shape[0]] + [1] * (x.ndim - 1)).bernoulli_(keep)  # lists: TorchScript-able
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class Mlp(nn.Module):
    """Linear -> GELU -> Linear on the last (channel) axis."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def init_linear_and_norm(module: nn.Module) -> None:
    """The init both papers use: Linear trunc-normal(0.02) / bias 0, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def stochastic_depth_rates(drop_path: float, depths: list[int] | tuple[int, ...]) -> list[list[float]]:
    """Per-stage lists of drop-path rates rising linearly from 0 to drop_path over all blocks."""
    rates = torch.linspace(0, drop_path, sum(depths), device="cpu").tolist()  # cpu: also under a meta-device build
    out, start = [], 0
    for d in depths:
        out.append(rates[start:start + d])
        start += d
    return out


def checkpoint_seq(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run a stage's blocks with activation checkpointing, one checkpoint per block (timm's
    `checkpoint_seq` granularity): each block's activations are recomputed in the backward pass,
    only its input is kept. Drop-path draws are replayed identically (the RNG state is restored)."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x


# ----------------------------------------------------------------------------- timm's model API

def feature_take_indices(num_features: int, indices: int | list[int] | tuple[int, ...] | None = None
                         ) -> tuple[list[int], int]:
    """timm's convention: None -> every stage, an int n -> the last n, a sequence -> those (negative from the
    end). Returns (absolute indices, the largest)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(f"feature index {idx} is out of range (0 to {num_features - 1})")
            take.append(idx)
    return take, max(take)


class FeatureInfo(list):
    """timm's feature_info: a list of dicts (num_chs, reduction, module) with its accessors."""

    def channels(self, idx: int | None = None) -> list[int] | int:
        return self[idx]["num_chs"] if idx is not None else [f["num_chs"] for f in self]

    def reduction(self, idx: int | None = None) -> list[int] | int:
        return self[idx]["reduction"] if idx is not None else [f["reduction"] for f in self]

    def module_name(self, idx: int | None = None) -> list[str] | str:
        return self[idx]["module"] if idx is not None else [f["module"] for f in self]


MATCH_PREV_GROUP = (99999,)  # timm's suffix: this group shares the depth of the one before it


def layer_ids_from_matcher(model: nn.Module) -> dict[str, int]:
    """Each parameter's depth from the model's group_matcher(coarse=False), as timm's layer-decay grouping
    (group_with_matcher) reads it: matchers in order (stem first), a match's numbers (and suffix) as its key,
    distinct keys numbered in sorted order, a key ending in MATCH_PREV_GROUP joining the depth before it;
    what no matcher takes (norm, head) is the top."""
    import re

    compiled = []
    for order, patterns in enumerate(model.group_matcher(coarse=False).values()):
        for pattern, suffix in ([(patterns, None)] if isinstance(patterns, str) else patterns):
            compiled.append((re.compile(pattern), order, suffix or ()))
    keys = {}
    for name, _ in model.named_parameters():
        for regex, order, suffix in compiled:
            match = regex.match(name)
            if match:
                keys[name] = (order, *(float(g) for g in match.groups() if g is not None), *suffix)
                break
        else:
            keys[name] = (float("inf"),)
    ordinal, depth = {}, -1
    for key in sorted(set(keys.values())):
        if depth < 0 or key[-1] != MATCH_PREV_GROUP[0]:
            depth += 1
        ordinal[key] = depth
    return {name: ordinal[key] for name, key in keys.items()}


class TimmModelApi:
    """timm's model API over a family's layout: a stem, `stages` (a ModuleList of Sequentials, each starting with
    its downsample), channels-last features (B, H, W, C), a final `norm` and a `head`; the family gives
    `stem_forward`, `group_matcher` and `feature_info` (whose level 0 is the stem where `stem_is_feature`).
    Pooling follows timm's `global_pool` ('avg', 'max', 'avgmax', or '' for none). `forward` is TorchScript-able
    and torch.fx-traceable."""

    output_fmt = "NHWC"  # what forward_features returns
    feature_dim = -1  # where its channels are, in forward_features' output and in the pooled features alike
    stem_is_feature = False

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = self.norm.weight if isinstance(self.norm, nn.LayerNorm) else next(self.parameters())
        self.head = nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype) \
            if num_classes else nn.Identity()
        self.head.train(self.training)
        if num_classes:
            init_linear_and_norm(self.head)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            return x.mean(dim=(1, 2))
        if self.global_pool == "max":
            return x.amax(dim=(1, 2))
        if self.global_pool == "avgmax":
            return 0.5 * (x.mean(dim=(1, 2)) + x.amax(dim=(1, 2)))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_forward(x)
        for stage in self.stages:
            if torch.jit.is_scripting() or not (self.grad_checkpointing and torch.is_grad_enabled()):
                x = stage(x)
            else:
                x = checkpoint_seq(stage, x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: recompute each block's activations in the backward pass (less memory, ~1/3 more
        compute)."""
        self.grad_checkpointing = enable

    def layer_ids(self) -> dict[str, int]:
        """Depth of each parameter for layer-wise lr decay: timm's reading of group_matcher."""
        return layer_ids_from_matcher(self)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's forward_intermediates: the chosen feature levels (NCHW, or NHWC), and the final features.
        Levels are feature_info's: each stage's output (after the stem, where it is a level). `norm` applies
        the final norm to the last stage's map (the only one of its width)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt {output_fmt!r}: expected 'NCHW' or 'NHWC'")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        offset = int(self.stem_is_feature)
        last = len(self.feature_info) - 1
        intermediates = []

        def keep(level: int, y: torch.Tensor) -> None:
            if level in take:
                y = self.norm(y) if norm and level == last else y
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)

        x = self.stem_forward(x)
        if offset:
            keep(0, x)
        for i, stage in enumerate(self.stages):
            if stop_early and i + offset > max_index:
                break
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and torch.is_grad_enabled() else stage(x)
            keep(i + offset, x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if not stop_early or max_index == last else x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last level `indices` needs (and the norm / head): a backbone of the rest."""
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        self.stages = self.stages[:max(max_index + 1 - int(self.stem_is_feature), 0)]
        self.feature_info = FeatureInfo(self.feature_info[:max_index + 1])
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


def square_side(img_size: int | tuple[int, int] | list[int], family: str) -> int:
    """img_size as an int; timm passes (H, W), which must be square here (both families are built for one side)."""
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2 or img_size[0] != img_size[1]:
            raise ValueError(f"{family}: img_size {tuple(img_size)}: expected one side or a square (H, W)")
        return int(img_size[0])
    return int(img_size)


def check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", "max", "avgmax", ""):
        raise ValueError(f"global_pool {global_pool!r}: expected 'avg', 'max', 'avgmax' or '' (none)")


class FeatureMaps(nn.Module):
    """features_only=True: the model as a backbone that returns the chosen stages' maps (NCHW), as timm's
    feature extractors do, with `feature_info` for those stages (channels(), reduction()). out_indices: timm's
    convention (None: every stage, n: the last n, a sequence: those). The stages after the last one taken, the
    final norm and the head are dropped."""

    def __init__(self, model: nn.Module, out_indices: int | list[int] | tuple[int, ...] | None = None) -> None:
        super().__init__()
        take, _ = feature_take_indices(len(model.feature_info), None if out_indices is None else
                                       out_indices if isinstance(out_indices, int) else list(out_indices))
        self.out_indices = take
        self.feature_info = FeatureInfo(model.feature_info[i] for i in take)
        model.prune_intermediate_layers(take, prune_norm=True, prune_head=True)
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True, stop_early=True)
