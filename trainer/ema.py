"""Exponential moving average of the weights, kept in fp32 beside the (bf16) engine weights."""
from __future__ import annotations

import torch
from torch import nn


class ModelEma:
    """The module's tensors are looked up once; an update is one fused lerp over all of them (no
    state-dict copy, no host sync). With `every` k > 1 it runs every k-th optimizer step with
    decay ** k, which tracks the per-step EMA closely for k << 1 / (1 - decay)."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1) -> None:
        self.decay, self.every = decay, every
        self.sources = model.state_dict(keep_vars=True)  # the live parameters and buffers
        self.shadow = {n: t.detach().float().clone() for n, t in self.sources.items()}
        self._shadow_list = list(self.shadow.values())
        self._fp32 = all(t.dtype == torch.float32 for t in self.sources.values())

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step`: shadow <- d * shadow + (1 - d) * weights, d = decay ** every."""
        if step % self.every:
            return
        sources = [t.detach() if self._fp32 else t.detach().float() for t in self.sources.values()]
        torch._foreach_lerp_(self._shadow_list, sources, 1.0 - self.decay ** self.every)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for n, t in state.items():
            self.shadow[n].copy_(t)
