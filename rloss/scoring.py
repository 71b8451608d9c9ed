"""Caffe's test loop, shared by the solver's test nets and `python -m rloss test`: forward passes
without gradients, the float sum of the loss and of every element of every output, and their means
(float arithmetic in Caffe's order, so the logged values are Caffe's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from rloss.net import Net

f32 = np.float32
Outputs = list[tuple[str, float]]


@dataclass
class Scores:
    """What `score` accumulated: the loss and per-output sums over `iterations` forward passes."""

    iterations: int = 0
    loss: np.float32 = f32(0)
    names: list[str] = field(default_factory=list)
    sums: list[np.float32] = field(default_factory=list)

    def add(self, loss: float, outputs: Outputs) -> None:
        self.loss = f32(self.loss + f32(loss))
        if not self.iterations:
            self.names, self.sums = [name for name, _ in outputs], [f32(v) for _, v in outputs]
        else:
            self.sums = [f32(s + f32(v)) for s, (_, v) in zip(self.sums, outputs)]
        self.iterations += 1

    def mean_loss(self) -> np.float32:
        return f32(self.loss / f32(max(1, self.iterations)))

    def means(self) -> list[tuple[str, np.float32]]:
        count = f32(max(1, self.iterations))
        return [(name, f32(total / count)) for name, total in zip(self.names, self.sums)]


def output_values(net: Net) -> Outputs:
    """(blob name, value) for every element of every output blob, in Caffe's output order."""
    return [(name, value) for name in net.outputs
            for value in net.blob_data[name].detach().reshape(-1).cpu().tolist()]


Step = Callable[[], tuple[float, Outputs]]


def net_step(net: Net) -> Step:
    """One forward pass of `net`: its loss and outputs (Caffe's test iteration)."""

    def step() -> tuple[float, Outputs]:
        loss = net.forward()
        return loss.item(), output_values(net)

    return step


def score(net: Net, iterations: int, after_batch: Callable[[int, Outputs], None] | None = None,
          stop: Callable[[], bool] | None = None, step: Step | None = None) -> Scores | None:
    """Run `iterations` test iterations, each one forward pass of `net` unless `step` runs it
    otherwise (whole-image scoring); `after_batch(i, outputs)` sees each one. None when `stop()`
    (asked before each iteration) says to stop."""
    run = step or net_step(net)
    scores = Scores()
    with torch.no_grad():
        for i in range(iterations):
            if stop is not None and stop():
                return None
            loss, outputs = run()
            scores.add(loss, outputs)
            if after_batch is not None:
                after_batch(i, outputs)
    return scores
