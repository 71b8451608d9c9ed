"""The numeric precision a net runs in, and the loss scaling fp16 needs.

`fp32` runs everything in float32. `bf16` and `fp16` run the net under `torch.autocast`: convolutions
and matrix products compute in the lower precision on the fly, while the master weights (and so the
momentum history, the snapshots and the .caffemodel files) stay float32; layers that declare
`runs_in_float32` (the losses, the accuracies, Softmax, BatchNorm, the DenseCRF layers) run in float32
(`rloss.net.Net.forward`).

Where each precision runs:

* bf16: on the CPU (fast with AVX-512 BF16 or AMX, emulated and slower than fp32 without them) and on
  CUDA GPUs of compute capability 8.0 or newer (native bfloat16); older GPUs are refused.
* fp16: on CUDA GPUs of compute capability 5.3 or newer (native half arithmetic); older GPUs are
  refused. On the CPU it runs where this torch's CPU autocast supports float16 (refused otherwise), for
  checks only, with a warning: torch's CPU float16 convolutions are slower than float32 in forward and
  fall back to a slow path in backward (DeepLab-LargeFOV at crop 321 on this project's machine: about
  240 s per forward+backward against 1.3 s in fp32). On CPUs use bf16.

fp16's narrow exponent range lets small gradients underflow to 0: `LossScaler` multiplies the loss
before backward and divides the gradients after, skipping the updates whose gradients overflowed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import ContextManager, Sequence

import torch

from rloss.errors import PrecisionError

log = logging.getLogger("rloss")

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOW_PRECISION_DTYPES = tuple(_DTYPES.values())
# The GPU generations with native arithmetic in each type (older ones emulate it, slower than fp32).
_MIN_CUDA_CAPABILITY = {"bf16": (8, 0), "fp16": (5, 3)}


def check_precision(name: str, device: torch.device) -> str:
    """`name` if the net can run in it on `device`; a PrecisionError naming the precision otherwise."""
    if name not in PRECISIONS:
        raise PrecisionError(f"--precision: unknown precision '{name}' (known: {', '.join(PRECISIONS)})")
    if name != "fp32":
        problem = _device_problem(name, torch.device(device))
        if problem:
            raise PrecisionError(f"--precision={name} on {device}: {problem}")
        if name == "fp16" and torch.device(device).type == "cpu":
            _warn_cpu_fp16()
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast computes in for `precision` (None for fp32: no autocast)."""
    return _DTYPES.get(precision)


def autocast(precision: str, device: torch.device) -> ContextManager:
    """torch.autocast on `device` in `precision`'s dtype; for fp32 nothing (an autocast the caller
    entered, if any, stays in force)."""
    dtype = autocast_dtype(check_precision(precision, device))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def float32_region(device: torch.device) -> ContextManager:
    """Autocast off on `device`: what runs inside computes in its inputs' dtypes."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def to_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 tensor as float32 (a differentiable cast); any other tensor unchanged."""
    return tensor.float() if tensor.dtype in LOW_PRECISION_DTYPES else tensor


@functools.cache
def _device_problem(name: str, device: torch.device) -> str:
    """Why `device` cannot run `name` autocast ('' when it can); probed once per device."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "this torch has no CUDA"
        capability = torch.cuda.get_device_capability(device)
        wanted = _MIN_CUDA_CAPABILITY[name]
        if capability < wanted:
            return (f"the GPU (compute capability {capability[0]}.{capability[1]}) has no native "
                    f"{_DTYPES[name]} arithmetic (needs {wanted[0]}.{wanted[1]} or newer); use fp32"
                    + (" or fp16" if name == "bf16" and capability >= _MIN_CUDA_CAPABILITY["fp16"] else ""))
    return _autocast_probe(device, _DTYPES[name])


def _autocast_probe(device: torch.device, dtype: torch.dtype) -> str:
    """'' if a matrix product under torch.autocast on `device` computes in `dtype`; else why not
    (a torch whose autocast lacks the type warns and runs in float32 instead)."""
    ones = torch.ones(2, 2, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type=device.type, dtype=dtype):
                product = ones @ ones
        except RuntimeError as error:
            return f"torch.autocast cannot run there: {error}"
    if product.dtype != dtype:
        return f"torch {torch.__version__}'s {device.type} autocast does not support {dtype}; use fp32 or bf16"
    return ""


@functools.cache
def _warn_cpu_fp16() -> None:
    log.warning("--precision=fp16 on the CPU is for checks only: torch's CPU float16 convolutions are slower than "
                "float32, their backward up to 200x slower; use --precision=bf16 on CPUs")


class LossScaler:
    """Dynamic loss scaling for fp16 (hand-written: the solver applies Caffe's update rule itself).

    Each iteration: back-propagate `scale(loss)` (every iter_size pass), then `finite =
    unscale(grads)` on the accumulated (for several ranks: all-reduced) gradients; when it is False
    the update is skipped. Then `update(finite)`: an overflow halves the scale, `growth_interval`
    finite steps in a row double it. Scales are powers of two, so scaling and unscaling are exact.
    A disabled scaler (any precision but fp16) is the identity: scale 1, no check, `unscale` True.
    """

    def __init__(self, enabled: bool, initial: float = 2.0 ** 16, growth_interval: int = 2000,
                 backoff: float = 0.5, growth: float = 2.0):
        self.enabled = enabled
        self._scale = float(initial) if enabled else 1.0
        self.growth_interval = growth_interval
        self.backoff = backoff
        self.growth = growth
        self._finite_steps = 0

    @classmethod
    def for_precision(cls, precision: str) -> LossScaler:
        """Enabled for fp16 only (bf16 has float32's exponent range: nothing underflows)."""
        return cls(enabled=precision == "fp16")

    @property
    def value(self) -> float:
        """The current loss scale (1 when disabled)."""
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: `loss` times the scale."""
        return loss * self._scale if self.enabled else loss

    def unscale(self, grads: Sequence[torch.Tensor]) -> bool:
        """Divide the gradients in place by the scale; False if any of them holds inf or NaN."""
        if not self.enabled:
            return True
        flags = []
        for grad in grads:
            grad.div_(self._scale)
            flags.append(torch.isfinite(grad).all())
        return bool(torch.stack(flags).all()) if flags else True

    def update(self, finite: bool) -> None:
        """Back off after an overflow; grow after `growth_interval` finite steps in a row."""
        if not self.enabled:
            return
        if not finite:
            self._scale *= self.backoff
            self._finite_steps = 0
            return
        self._finite_steps += 1
        if self._finite_steps >= self.growth_interval:
            self._scale *= self.growth
            self._finite_steps = 0

    def state_dict(self) -> dict[str, float]:
        """The scale and the finite-step count, for a resumed run to go on exactly."""
        return {"scale": self._scale, "finite_steps": self._finite_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if self.enabled:
            self._scale = float(state["scale"])
            self._finite_steps = int(state["finite_steps"])
