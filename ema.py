"""Weight EMA: an exponential moving average of a network's weights, kept beside training.

`--ema DECAY` validates, keeps and scores this average in place of the weights the steps move.
The decay of step t is min(DECAY, (1 + t) / (10 + t)), TensorFlow's ExponentialMovingAverage
with num_updates: early on the average follows the weights closely, so that it does not hold
on to the random start, and 0.999 is reached after 8,990 steps (the real job's 15 epochs of
380 steps end at 0.9984, an average over about the last 640 steps)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class WeightAverage:
    """The average (`net`, a copy of the network trained, in eval mode, without gradients) and
    the steps averaged into it (`updates`). Batch-norm statistics are averaged like weights;
    integer buffers (batches counted) are copied."""

    def __init__(self, trained: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.net = copy.deepcopy(trained).eval().requires_grad_(False)
        # state_dict tensors share storage with the networks' own, which steps and
        # load_state_dict change in place: the pairs stay valid for the run
        pairs = list(
            zip(self.net.state_dict().values(), trained.state_dict().values(), strict=True)
        )
        self._floats = [(mine, theirs) for mine, theirs in pairs if mine.is_floating_point()]
        self._others = [(mine, theirs) for mine, theirs in pairs if not mine.is_floating_point()]

    def decay_now(self) -> float:
        """The decay of the next update: `decay`, or less in the first steps."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Average the trained network's weights as they are now into `net`."""
        weight = 1.0 - self.decay_now()
        for mine, theirs in self._floats:
            mine.lerp_(theirs, weight)
        for mine, theirs in self._others:
            mine.copy_(theirs)
        self.updates += 1
