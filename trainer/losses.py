"""The training loss: cross-entropy against soft targets (the data pipeline folds label smoothing
and Mixup/CutMix into the targets, as timm's SoftTargetCrossEntropy expects), and knowledge distillation on
top of it (DeiT's soft and hard distillation)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SoftTargetCrossEntropy(nn.Module):
    """mean_b sum_c -t log p, computed in fp32 whatever the logits' dtype."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class DistillationLoss(nn.Module):
    """(1 - alpha) x the base loss + alpha x the distillation term, with DeiT's definitions on the one head:
    soft: KL(softmax(teacher / tau) || softmax(student / tau)) x tau^2 (summed over classes, mean over the batch);
    hard: cross-entropy against the teacher's top-1. The teacher sees the same (augmented, mixed) inputs, in eval
    mode and without gradients. Both terms are summed on the device for the log windows (no host sync)."""

    def __init__(self, base: nn.Module, teacher: nn.Module, kind: str, alpha: float, tau: float,
                 precision=contextlib.nullcontext) -> None:
        super().__init__()
        self.base, self.kind, self.alpha, self.tau = base, kind, alpha, tau
        self.teacher = [teacher]  # not a submodule: not in the student's state or parameters
        self.precision = precision  # the run's compute precision (bf16 autocast where the student has it)
        self.terms: Tensor | None = None  # sums of (base, distillation) since the last log window

    def forward(self, logits: Tensor, target: Tensor, images: Tensor) -> Tensor:
        base = self.base(logits, target)
        with torch.no_grad(), self.precision():
            teacher = self.teacher[0](images).float()
        if self.kind == "soft":
            t = self.tau
            distill = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                               reduction="batchmean", log_target=True) * t * t
        else:
            distill = F.cross_entropy(logits.float(), teacher.argmax(dim=-1))
        terms = torch.stack([base.detach(), distill.detach()])
        self.terms = terms if self.terms is None else self.terms + terms
        return (1 - self.alpha) * base + self.alpha * distill
