"""RunState: where a run is, saved whole in every checkpoint (meta.json) and nothing else."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunState:
    step: int = 0                  # optimizer steps taken
    epoch: int = 0
    epoch_sample: int = 0          # global samples of this epoch consumed (the same at every world size)
    epoch_end: int = 0             # the global sample offset this epoch ends at; 0: not started
    restarts: int = 0              # starts of this run after its first
    tracking_run_id: str | None = None
    best_top1: float | None = None  # best val top-1 (EMA top-1 with EMA on), for checkpoint.keep_best
    last_top1: float | None = None  # the latest evaluation's, likewise
    rollbacks: int = 0             # reloads after a non-finite loss
    skip: list[list[int]] = field(default_factory=list)  # [epoch, start, end] windows never to read again
    eval_crop_pct: float | None = None  # the evaluation crop fitted on minival at the end of training
    crop_fit: dict[str, float] | None = None  # minival top-1 at each crop_pct tried

    def advance(self, samples: int) -> None:
        """One optimizer step of `samples` global samples taken."""
        self.step += 1
        self.epoch_sample += samples

    @property
    def epoch_done(self) -> bool:
        """Nothing of this epoch is left to read (its end reached, or only skipped windows left)."""
        return self.epoch_end > 0 and not self.windows()

    def next_epoch(self, end: int) -> None:
        self.epoch, self.epoch_sample, self.epoch_end = self.epoch + 1, 0, end

    def windows(self) -> list[tuple[int, int]]:
        """The sample windows of the current epoch still to read: [epoch_sample, epoch_end) minus
        the skipped windows (after a rollback)."""
        out, start = [], self.epoch_sample
        for epoch, a, b in sorted(self.skip):
            if epoch != self.epoch or b <= start:
                continue
            if a > start:
                out.append((start, min(a, self.epoch_end)))
            start = max(start, b)
        if start < self.epoch_end:
            out.append((start, self.epoch_end))
        return [(a, b) for a, b in out if b > a]

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in dataclasses.fields(self)}
        for key, value in state.items():
            if key in known:
                setattr(self, key, value)
