"""Caffe's learning-rate policies, with Caffe's float arithmetic.

Caffe computes the rate with `float` operands and `pow` in double, then stores it in a float; the
printed `lr = ...` lines and the updates depend on that rounding, so it is reproduced here with
numpy float32 scalars. `iter` is the number of completed updates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from rloss.errors import SolverError

log = logging.getLogger("rloss")
POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
f32 = np.float32


def check_policy(param) -> None:
    """Reject a policy Caffe would reject (or divide by zero with) before any work is done."""
    policy = param.lr_policy
    if policy not in POLICIES:
        raise SolverError(f"unknown lr_policy '{policy}' in the solver (known: {', '.join(POLICIES)})")
    if policy == "step" and param.stepsize <= 0:
        raise SolverError(f"lr_policy 'step' needs stepsize > 0, the solver gives {param.stepsize}")
    if policy == "poly" and param.max_iter <= 0:
        raise SolverError(f"lr_policy 'poly' needs max_iter > 0, the solver gives {param.max_iter}")
    if policy == "multistep" and list(param.stepvalue) != sorted(param.stepvalue):
        raise SolverError(f"lr_policy 'multistep' needs increasing stepvalue, got {list(param.stepvalue)}")


@dataclass
class LearningRate:
    """The rate schedule of one solver; `current_step` is the state Caffe saves in its solverstate."""

    param: object
    current_step: int = 0

    def __call__(self, iteration: int) -> float:
        """The float32 rate for the update that follows `iteration` completed ones."""
        p = self.param
        base = float(f32(p.base_lr))
        policy = p.lr_policy
        if policy == "fixed":
            return base
        if policy == "step":
            self.current_step = iteration // p.stepsize
            return _stored(base * math.pow(f32(p.gamma), self.current_step))
        if policy == "exp":
            return _stored(base * math.pow(f32(p.gamma), iteration))
        if policy == "inv":
            return _stored(base * math.pow(f32(1) + f32(p.gamma) * f32(iteration), -f32(p.power)))
        if policy == "multistep":
            self._advance_multistep(iteration)
            return _stored(base * math.pow(f32(p.gamma), self.current_step))
        if policy == "poly":
            return _stored(base * math.pow(f32(1) - f32(iteration) / f32(p.max_iter), f32(p.power)))
        if policy == "sigmoid":
            exponent = -f32(p.gamma) * (f32(iteration) - f32(p.stepsize))
            with np.errstate(over="ignore"):
                return _stored(base * (f32(1) / (f32(1) + np.exp(f32(exponent)))))
        raise SolverError(f"unknown lr_policy '{policy}'")

    def _advance_multistep(self, iteration: int) -> None:
        values = self.param.stepvalue
        if self.current_step < len(values) and iteration >= values[self.current_step]:
            self.current_step += 1
            log.info("MultiStep Status: Iteration %s, step = %s", iteration, self.current_step)


def _stored(value: float) -> float:
    """A double result stored into Caffe's float `rate`."""
    return float(f32(value))
