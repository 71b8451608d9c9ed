"""Caffe's weight fillers (FillerParameter), drawing from torch's global generator so a solver's
random_seed makes initialisation repeatable."""

from __future__ import annotations

import math

import torch

from rloss.errors import NetError
from rloss.proto import caffe_pb2


def _fan(shape: tuple[int, ...], filler) -> float:
    count = math.prod(shape)
    fan_in = count / shape[0] if shape else 1
    fan_out = count / shape[1] if len(shape) > 1 else count
    norm = caffe_pb2.FillerParameter
    if filler.variance_norm == norm.FAN_OUT:
        return fan_out
    if filler.variance_norm == norm.AVERAGE:
        return (fan_in + fan_out) / 2
    return fan_in


def _bilinear(shape: tuple[int, ...]) -> torch.Tensor:
    """Upsampling kernel for a Deconvolution: the separable tent centred in the kernel."""
    if len(shape) != 4 or shape[2] != shape[3]:
        raise NetError(f"bilinear filler needs a 4-D blob with square kernels, got shape {shape}")
    k = shape[3]
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    axis = 1 - torch.abs(torch.arange(k, dtype=torch.float64) / f - c)
    return (axis[:, None] * axis[None, :]).to(torch.float32).expand(shape).clone()


FLT_MAX = 3.4028234663852886e38
KINDS = ("constant", "uniform", "gaussian", "positive_unitball", "xavier", "msra", "bilinear")


def _check_filler(shape: tuple[int, ...], filler) -> None:
    """Caffe's checks before filling (every filler but constant needs a non-empty blob), plus the
    ranges torch's samplers need, so that a bad filler is an error naming it, not a torch crash."""
    if filler.type not in KINDS:
        raise NetError(f"unknown filler type '{filler.type}' (known: {', '.join(KINDS)})")
    if filler.type != "constant" and math.prod(shape) == 0:
        raise NetError(f"the {filler.type} filler needs a blob with at least one element, got shape {shape} "
                       "(a bottom with 0 channels?)")
    if filler.type == "gaussian" and not 0 <= filler.std <= FLT_MAX:
        raise NetError(f"the gaussian filler needs a finite std >= 0, got std {filler.std}")
    if filler.type == "uniform" and not -FLT_MAX <= filler.min <= filler.max <= filler.min + FLT_MAX:
        raise NetError(f"the uniform filler needs finite min <= max with max - min <= {FLT_MAX:.7g}, "
                       f"got min {filler.min} and max {filler.max}")


def fill(shape: tuple[int, ...], filler=None) -> torch.Tensor:
    """A float32 tensor of `shape` filled as Caffe's filler `filler` would (None = constant 0)."""
    if filler is None:
        filler = caffe_pb2.FillerParameter()
    _check_filler(shape, filler)
    kind = filler.type
    out = torch.empty(shape, dtype=torch.float32)
    if kind == "constant":
        return out.fill_(filler.value)
    if kind == "uniform":
        return out.uniform_(filler.min, filler.max)
    if kind == "gaussian":
        out.normal_(filler.mean, filler.std)
        if filler.sparse >= 0:
            if len(shape) < 2:
                raise NetError(f"sparse gaussian filler needs a blob with >= 2 axes, got {shape}")
            keep = torch.rand(shape) < filler.sparse / shape[0]
            out.mul_(keep)
        return out
    if kind == "positive_unitball":
        out.uniform_(0, 1)
        flat = out.view(shape[0], -1) if shape else out.view(1, -1)
        flat.div_(flat.sum(dim=1, keepdim=True))
        return out
    if kind == "xavier":
        bound = math.sqrt(3.0 / _fan(shape, filler))
        return out.uniform_(-bound, bound)
    if kind == "msra":
        return out.normal_(0.0, math.sqrt(2.0 / _fan(shape, filler)))
    return _bilinear(shape)
