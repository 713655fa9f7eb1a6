"""Parameter and MAC counts, as papers quote them (conv / linear / matmul only)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gmacs(model: nn.Module, img_size: int, in_chans: int = 3) -> float:
    """Multiply-accumulates (in 1e9) of one forward pass on one image. FlopCounterMode counts
    2 FLOPs per MAC of the matmul/conv family and nothing else: exactly the fvcore convention."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, in_chans, img_size, img_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
