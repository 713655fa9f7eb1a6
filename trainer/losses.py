"""The training loss: cross-entropy against soft targets (the data pipeline folds label smoothing
and Mixup/CutMix into the targets, as timm's SoftTargetCrossEntropy expects)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SoftTargetCrossEntropy(nn.Module):
    """mean_b sum_c -t log p, computed in fp32 whatever the logits' dtype."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
