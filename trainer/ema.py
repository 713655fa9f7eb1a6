"""Exponential moving average of the weights, kept in fp32 beside the (bf16) engine weights."""
from __future__ import annotations

import torch
from torch import nn


class ModelEma:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights, one fused op over all tensors."""
        state = model.state_dict()
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [state[n].float() for n in names], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for n, t in state.items():
            self.shadow[n].copy_(t)
