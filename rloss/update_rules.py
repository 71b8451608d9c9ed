"""Caffe's six solver update rules (`type:` SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam).

The solver first turns each learnable parameter's diff into the regularized gradient g (clipped,
divided by iter_size, plus weight decay); a rule then turns g into the step d that is subtracted from
the weights (`w -= d`), updating its history. Each rule does Caffe's float32 operations in Caffe's
order, so weights and histories follow Caffe's within float rounding, and after the update each
parameter's diff holds d, as Caffe's does. `lr` below is the local rate, base rate x lr_mult.

History blobs are laid out as Caffe's `.solverstate` stores them: one set of n blobs (one per learnable
parameter, in net order) for SGD, Nesterov, AdaGrad and RMSProp; two sets (2n blobs, the second set after
the first) for AdaDelta (E[g^2], then E[d^2]) and Adam (m, then v).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from rloss.errors import SolverError
from rloss.proto import caffe_pb2

f32 = np.float32
Tensors = list[torch.Tensor]


class UpdateRule:
    """One solver type: `check` refuses settings Caffe's constructor CHECK-fails on; `step` turns the
    gradients into steps in place (`grads` ends holding d) and updates the history sets."""

    type_name: ClassVar[str] = ""
    history_sets: ClassVar[int] = 1
    # With lr 0 and zero history the step and the history stay 0, so the solver may skip the
    # parameter (SGD, Nesterov); the adaptive rules still accumulate g there, as Caffe does.
    idle_at_zero_rate: ClassVar[bool] = False

    def __init__(self, param: caffe_pb2.SolverParameter):
        self.param = param

    def check(self, source: str) -> None:
        """Caffe's constructor checks for this type."""

    def step(self, grads: Tensors, history: list[Tensors], lr: float, iteration: int) -> None:
        raise NotImplementedError

    def _without_momentum(self, source: str) -> None:
        if self.param.momentum != 0:
            raise SolverError(f"{source}: momentum cannot be used with {self.type_name} "
                              f"(momentum is {self.param.momentum}; set it to 0)")


class SGD(UpdateRule):
    """h = momentum h + lr g; d = h (the rate folded into the history, as Caffe stores it)."""

    type_name = "SGD"
    idle_at_zero_rate = True

    def step(self, grads: Tensors, history: list[Tensors], lr: float, iteration: int) -> None:
        (h,) = history
        torch._foreach_mul_(h, float(f32(self.param.momentum)))
        torch._foreach_add_(h, grads, alpha=lr)
        torch._foreach_copy_(grads, h)


class Nesterov(UpdateRule):
    """h' = momentum h + lr g; d = (1 + momentum) h' - momentum h."""

    type_name = "Nesterov"
    idle_at_zero_rate = True

    def step(self, grads: Tensors, history: list[Tensors], lr: float, iteration: int) -> None:
        (h,) = history
        momentum = float(f32(self.param.momentum))
        previous = [t.clone() for t in h]
        torch._foreach_mul_(h, momentum)
        torch._foreach_add_(h, grads, alpha=lr)
        torch._foreach_copy_(grads, h)
        torch._foreach_mul_(grads, float(f32(1) + f32(momentum)))
        torch._foreach_add_(grads, previous, alpha=-momentum)


class AdaGrad(UpdateRule):
    """h += g^2; d = lr g / (sqrt(h) + delta)."""

    type_name = "AdaGrad"

    def check(self, source: str) -> None:
        self._without_momentum(source)

    def step(self, grads: Tensors, history: list[Tensors], lr: float, iteration: int) -> None:
        (h,) = history
        torch._foreach_addcmul_(h, grads, grads)
        _divide_by_root(grads, h, self.param.delta, lr)


class RMSProp(UpdateRule):
    """h = rms_decay h + (1 - rms_decay) g^2; d = lr g / (sqrt(h) + delta)."""

    type_name = "RMSProp"

    def check(self, source: str) -> None:
        self._without_momentum(source)
        if not 0 <= self.param.rms_decay < 1:
            raise SolverError(f"{source}: rms_decay must lie in [0, 1), got {self.param.rms_decay}")

    def step(self, grads: Tensors, history: list[Tensors], lr: float, iteration: int) -> None:
        (h,) = history
        decay = f32(self.param.rms_decay)
        _moving_average(h, torch._foreach_mul(grads, grads), decay)
        _divide_by_root(grads, h, self.param.delta, lr)


class AdaDelta(UpdateRule):
    """With momentum as the decay: h1 = momentum h1 + (1 - momentum) g^2;
    d0 = g sqrt((h2 + delta) / (h1 + delta)); h2 = momentum h2 + (1 - momentum) d0^2; d = lr d0
    (h2 is updated before the rate is applied, as in Caffe; base_lr is usually 1)."""

    type_name = "AdaDelta"
    history_sets = 2

    def step(self, grads: Tensors, history: list[Tensors], lr: float, iteration: int) -> None:
        gradients, updates = history
        decay, delta = f32(self.param.momentum), float(f32(self.param.delta))
        _moving_average(gradients, torch._foreach_mul(grads, grads), decay)
        ratio = torch._foreach_div(torch._foreach_add(updates, delta), torch._foreach_add(gradients, delta))
        torch._foreach_sqrt_(ratio)
        torch._foreach_mul_(grads, ratio)
        _moving_average(updates, torch._foreach_mul(grads, grads), decay)
        torch._foreach_mul_(grads, lr)


class Adam(UpdateRule):
    """m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2 (beta1 = momentum, beta2 =
    momentum2); d = lr sqrt(1 - beta2^t) / (1 - beta1^t) m / (sqrt(v) + delta) with t = iter + 1."""

    type_name = "Adam"
    history_sets = 2

    def step(self, grads: Tensors, history: list[Tensors], lr: float, iteration: int) -> None:
        m, v = history
        beta1, beta2 = f32(self.param.momentum), f32(self.param.momentum2)
        t = iteration + 1
        # Caffe's correction: pow(float, int) is double arithmetic, the quotient then stored as float.
        correction = f32(math.sqrt(1.0 - float(beta2) ** t) / (1.0 - float(beta1) ** t))
        _moving_average(m, grads, beta1)
        _moving_average(v, torch._foreach_mul(grads, grads), beta2)
        denominator = torch._foreach_sqrt(v)
        torch._foreach_add_(denominator, float(f32(self.param.delta)))
        torch._foreach_copy_(grads, torch._foreach_div(m, denominator))
        torch._foreach_mul_(grads, float(f32(lr) * correction))


def _moving_average(average: Tensors, values: Tensors, decay: np.float32) -> None:
    """average = decay average + (1 - decay) values (Caffe's axpby)."""
    torch._foreach_mul_(average, float(decay))
    torch._foreach_add_(average, values, alpha=float(f32(1) - decay))


def _divide_by_root(grads: Tensors, history: Tensors, delta: float, lr: float) -> None:
    """grads = lr grads / (sqrt(history) + delta)."""
    denominator = torch._foreach_sqrt(history)
    torch._foreach_add_(denominator, float(f32(delta)))
    torch._foreach_div_(grads, denominator)
    torch._foreach_mul_(grads, lr)


RULES: dict[str, type[UpdateRule]] = {rule.type_name: rule for rule in (SGD, Nesterov, AdaGrad, RMSProp,
                                                                          AdaDelta, Adam)}


def update_rule(param: caffe_pb2.SolverParameter, source: str, type_name: str | None = None) -> UpdateRule:
    """The rule of `type_name` (default: the solver file's `type`), its settings checked."""
    name = param.type if type_name is None else type_name
    if name not in RULES:
        raise SolverError(f"{source}: unknown solver type '{name}' (known types: {', '.join(RULES)})")
    rule = RULES[name](param)
    rule.check(source)
    return rule
