"""Small helpers the layer and golden tests share."""

from __future__ import annotations

import numpy as np
import torch
from google.protobuf import text_format

from rloss.layers import layer_class
from rloss.proto import caffe_pb2


def layer_from_text(text: str, shapes, phase: int = caffe_pb2.TRAIN):
    """A layer built from one prototxt `layer { ... }` body and its bottoms' shapes."""
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class(param.type)(param, list(shapes), phase)


def relative_error(actual, expected) -> float:
    """max |actual - expected| relative to max |expected| (the float32 round-off scale)."""
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    if not expected.size:
        return 0.0
    scale = max(float(np.abs(expected).max()), 1e-30)
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale
