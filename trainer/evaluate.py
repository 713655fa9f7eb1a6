"""Top-1 / top-5 over the whole val set, each image counted once across ranks; every count stays
on the engine's device until the one all-reduce at the end."""
from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(model, loader, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, n
    for images, labels in loader:
        logits = model(images.to(dtype))
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        counts[0] += hits[:, 0].sum()
        counts[1] += hits.any(dim=1).sum()
        counts[2] += labels.shape[0]
    if dist.is_initialized():
        dist.all_reduce(counts)
    top1, top5, n = counts.tolist()
    return 100 * top1 / n, 100 * top5 / n
