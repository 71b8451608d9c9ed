"""pycaffe's caffe.coord_map: how the coordinates of one NetSpec top relate to another's, and from that
the Crop layer that aligns them (FCN's `crop(upscore, data)`).

A map is (axis, scale, shift): output coordinate = scale * input coordinate + shift along the spatial
axes after `axis` (axis None: the map holds for any axis, as for point-wise layers). Convolution-like
layers scale by 1 / stride and shift by (pad - (kernel extent - 1) / 2) / stride, deconvolution the
inverse, Crop by minus its offset.

The tops are duck-typed, as pycaffe's NetSpec Top/Function: a top has `.fn`, whose `.type_name` is the
layer type, `.params` the layer's keyword parameters (flat, or nested under `convolution_param`,
`pooling_param` or `crop_param`) and `.inputs` the tuple of its bottom tops. `crop` builds its layer
with `rloss.caffe.net_spec.layers`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from rloss.errors import NetError

CoordMap = Tuple[Optional[int], Any, Any]  # (axis, scale, shift); scale and shift scalars or per-axis arrays
IDENTITY: CoordMap = (None, 1, 0)

PASS_THROUGH_LAYERS = frozenset({
    "AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Exp", "Log", "LRN", "MVN", "Power",
    "PReLU", "ReLU", "Scale", "Sigmoid", "Split", "TanH", "Threshold",
})
CONVOLUTION_LIKE = frozenset({"Convolution", "Pooling", "Im2col"})
_LEGACY_SPATIAL = frozenset({"kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w"})


def _nested(fn, name: str) -> Mapping[str, Any]:
    """The layer's parameters: the `name` message's dict when given nested, else the flat keywords."""
    return fn.params.get(name, fn.params)


def _spatial_params(fn) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(axis, stride, kernel extent with dilation, pad) of a convolution-like or deconvolution layer."""
    nested = "pooling_param" if fn.type_name == "Pooling" else "convolution_param"
    params = _nested(fn, nested)
    legacy = _LEGACY_SPATIAL & set(params)
    if legacy:
        raise NetError(f"coord_map: {fn.type_name} uses {sorted(legacy)}; coordinate maps need kernel_size, "
                       "stride and pad (one value, or one per spatial axis)")
    if "kernel_size" not in params:
        raise NetError(f"coord_map: {fn.type_name} has no kernel_size")
    kernel = np.array(params["kernel_size"], ndmin=1)
    dilation = np.array(params.get("dilation", 1), ndmin=1)
    return (int(params.get("axis", 1)), np.array(params.get("stride", 1), ndmin=1),
            (kernel - 1) * dilation + 1, np.array(params.get("pad", 0), ndmin=1))


def layer_map(fn) -> CoordMap | None:
    """The map from a layer's (first) bottom to its top, or None for a layer type without one."""
    if fn.type_name in CONVOLUTION_LIKE:
        if fn.type_name == "Pooling" and _nested(fn, "pooling_param").get("global_pooling"):
            return None  # one output pixel for the whole input: no per-pixel correspondence
        axis, stride, extent, pad = _spatial_params(fn)
        return axis, 1 / stride, (pad - (extent - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, extent, pad = _spatial_params(fn)
        return axis, stride, (extent - 1) / 2 - pad
    if fn.type_name == "Crop":
        params = _nested(fn, "crop_param")
        # Crop's axis names the first cropped axis; maps name the axis before the spatial ones
        return int(params.get("axis", 2)) - 1, 1, -np.array(params.get("offset", 0), ndmin=1)
    if fn.type_name in PASS_THROUGH_LAYERS:
        return IDENTITY
    return None


def compose(base: CoordMap, following: CoordMap) -> CoordMap:
    """`base` then `following`: scales multiply, and the following shift is scaled by the base scale."""
    (axis1, scale1, shift1), (axis2, scale2, shift2) = base, following
    if axis1 is not None and axis2 is not None and axis1 != axis2:
        raise NetError(f"coord_map: maps along different axes ({axis1} and {axis2}) cannot be composed")
    return (axis2 if axis1 is None else axis1), scale1 * scale2, scale1 * shift2 + shift1


def inverse(coord_map: CoordMap) -> CoordMap:
    """The map back: from output coordinates to input ones."""
    axis, scale, shift = coord_map
    return axis, 1 / scale, -shift / scale


def _mapped_bottoms(top) -> tuple:
    """The bottoms a map walks through: all of them, except for Crop, whose second bottom only gives
    the output size."""
    return tuple(top.fn.inputs[:1] if top.fn.type_name == "Crop" else top.fn.inputs)


def _walk(start):
    """(top, map from that ancestor to `start`) for `start` and each ancestor reachable through layers
    with maps, nearest first."""
    maps = {start: IDENTITY}
    frontier = deque([start])
    while frontier:
        top = frontier.popleft()
        yield top, maps[top]
        step = layer_map(top.fn)
        if step is None:
            continue
        for bottom in _mapped_bottoms(top):
            if bottom not in maps:
                maps[bottom] = compose(maps[top], step)
                frontier.append(bottom)


def coord_map_from_to(top_from, top_to) -> CoordMap:
    """The map from `top_from`'s coordinates to `top_to`'s, through their nearest common ancestor."""
    from_maps = dict(_walk(top_from))
    for top, to_map in _walk(top_to):
        if top in from_maps:
            return compose(to_map, inverse(from_maps[top]))
    raise NetError("coord_map: the two tops share no ancestor reachable through layers with coordinate maps "
                   f"(convolution, pooling, deconvolution, crop, point-wise: {sorted(PASS_THROUGH_LAYERS)})")


def crop_parameters(top_from, top_to) -> dict[str, Any]:
    """The `crop_param` that crops `top_from` onto `top_to`'s coordinates: {'axis', 'offset'}. The two
    must have the same scale, and `top_from` must start at or before `top_to` on a whole pixel."""
    axis, scale, shift = coord_map_from_to(top_from, top_to)
    scale, shift = np.atleast_1d(scale), np.atleast_1d(shift)
    if not np.all(scale == 1):
        raise NetError(f"crop: the tops have different scales ({scale.tolist()}); only a scale of 1 can be cropped")
    if not np.all(shift <= 0):
        raise NetError(f"crop: the offset would be negative (shift {shift.tolist()}): top_from starts inside "
                       "top_to; crop the other way round")
    if not np.all(np.round(shift) == shift):
        raise NetError(f"crop: the offset {(-shift).tolist()} is not a whole number of pixels")
    return {"axis": 2 if axis is None else axis + 1, "offset": [int(-s) for s in np.round(shift)]}


def crop(top_from, top_to):
    """A NetSpec Crop layer's top: `top_from` cropped to `top_to` (as FCN's `crop(n.upscore, n.data)`)."""
    from rloss.caffe.net_spec import layers

    return layers.Crop(top_from, top_to, crop_param=crop_parameters(top_from, top_to))
