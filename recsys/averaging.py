"""Polyak averaging of a sharded ranker's weights: an exponential moving average (EMA) of every
rank-local weight, kept beside the training weights. Validation, early stopping and the saved
model read the average; training keeps stepping the live weights.

With row-wise Adagrad at the learning rates the grid chooses, the live weights of the tables
wander from step to step (the validation AUC of the demo moves by +-0.005 between epochs); the
average smooths that walk. Measured on the demo world (``codes``, seeds 0/1/2, test AUC): 0.7475,
0.7484, 0.7531 without it, 0.7555, 0.7519, 0.7536 with a decay of 0.99 (README, the ranker's
training).

Cost: one more copy of the rank's weights in memory, and one multiply-add over them per update.
The update runs every step while the rank holds at most ``VALUES_PER_UPDATE`` values, and every
``ceil(values / VALUES_PER_UPDATE)`` steps beyond (with the decay raised to that power, so the
horizon in steps stays ``1 / (1 - decay)``): big tables pay at most that many values per step.

The average is normalised (bias-corrected like Adam's moments): the first update takes the
live weights whole, so the untrained initial weights never weigh in, and a short run is not
pulled back to its start. Its horizon is at most one validation interval (``valid_every``, or
an epoch): data of a few steps per epoch average over those steps.

The frozen content table is constant and skipped; so are integer buffers. The average is kept
in checkpoints (``checkpoints/average_<N>/``, beside ``step_<N>``), so a resumed run ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from recsys import checkpoint as ck

#: Values one update may touch per training step, on average.
VALUES_PER_UPDATE = 1 << 22


def _views(state: dict) -> dict[str, Any]:
    """path -> the rank-local tensor(s) of every averaged weight (views, not copies)."""
    sharded = ck.sharded_type()
    out: dict[str, Any] = {}
    for path, v in ck.flatten(state).items():
        if path.endswith("frozen_table"):
            continue
        if isinstance(v, sharded):
            local = [s.tensor for s in v.local_shards()]
            if local and local[0].is_floating_point():
                out[path] = local
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            out[path] = v
    return out


class WeightAverage:
    """The EMA of ``dmp``'s rank-local weights (``decay`` per step, at most one
    ``max_horizon`` of steps long)."""

    def __init__(self, dmp, decay: float, max_horizon: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.average must be in (0, 1) or 0 (off), got {decay}")
        if max_horizon > 1:
            # The average reaches back at most one validation interval: a run of a few steps
            # per epoch averages over those, not over a horizon longer than its training.
            decay = min(decay, 1.0 - 1.0 / max_horizon)
        self.dmp = dmp
        self.updates = 0
        self.views = _views(dmp.state_dict())
        self.avg = {k: [t.detach().clone() for t in v] if isinstance(v, list)
                    else v.detach().clone() for k, v in self.views.items()}
        values = sum(sum(t.numel() for t in v) if isinstance(v, list) else v.numel()
                     for v in self.views.values())
        self.every = max(1, math.ceil(values / VALUES_PER_UPDATE))
        self.decay = decay ** self.every

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the model's current weights."""
        self.updates = 0
        for a, live in self._pairs():
            a.copy_(live)

    def _pairs(self):
        for k, v in self.views.items():
            if isinstance(v, list):
                yield from zip(self.avg[k], v)
            else:
                yield self.avg[k], v

    @torch.no_grad()
    def update(self, done: int) -> None:
        """After the optimizer step that completes global step ``done``."""
        if done % self.every:
            return
        # The normalised average of the weights after each update so far (bias-corrected, as
        # Adam's moments): the first update takes the live weights whole, so the initial
        # weights never weigh in; later ones tend to 1 - decay.
        self.updates += 1
        w = (1.0 - self.decay) / (1.0 - self.decay ** self.updates)
        for a, live in self._pairs():
            a.lerp_(live, w)                  # exact where a row did not move

    @torch.no_grad()
    def swap_in(self) -> list[torch.Tensor]:
        """Put the average into the model; returns the live weights for :meth:`swap_out`
        (copies of the averaged ones only: the frozen table and integer buffers stay put)."""
        live = []
        for a, v in self._pairs():
            live.append(v.clone())
            v.copy_(a)
        return live

    @torch.no_grad()
    def swap_out(self, live: list[torch.Tensor]) -> None:
        for (_, v), saved in zip(self._pairs(), live):
            v.copy_(saved)

    # Checkpoints: the average goes through the model's own (sharded) state dict, so DCP
    # reshards it like the weights when a run resumes on another number of ranks.
    def save(self, folder: Path, rank: int, meta: dict) -> None:
        live = self.swap_in()
        ck.save(folder, {"model": self.dmp.state_dict()}, rank,
                meta={**meta, "updates": self.updates})
        self.swap_out(live)

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        """Read a saved average (call before loading the live weights: it goes through the
        model)."""
        self.updates = ck.load(folder, {"model": self.dmp.state_dict()}).get("updates", 0)
        for a, v in self._pairs():
            a.copy_(v)
