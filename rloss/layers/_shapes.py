"""Window geometry of 2-D convolution and pooling: how Caffe reads kernel/stride/pad/dilation from
the prototxt (the two layers read them differently) and the output-size formulas."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rloss.layers.base import Layer

Pair = tuple[int, int]


def _hw_names(param, name: str) -> tuple[str, str] | None:
    """The `_h`/`_w` override fields of `name` (kernel_size -> kernel_h, kernel_w), if any."""
    stem = name[: -len("_size")] if name.endswith("_size") else name
    names = (f"{stem}_h", f"{stem}_w")
    return names if names[0] in param.DESCRIPTOR.fields_by_name else None


def conv_pair(layer: Layer, param, name: str, default: int | None) -> Pair:
    """(h, w) of the repeated ConvolutionParameter field `name` (0, 1 or 2 values); `name_h` /
    `name_w` take over when either is present (the absent one is then 0, as in Caffe).
    `default` None means the field is required."""
    values = [int(v) for v in getattr(param, name)]
    hw = _hw_names(param, name)
    if hw and (param.HasField(hw[0]) or param.HasField(hw[1])):
        if values:
            raise layer.error(f"give either {name} or {hw[0]}/{hw[1]}, not both")
        return int(getattr(param, hw[0])), int(getattr(param, hw[1]))
    if not values:
        if default is None:
            alternative = f" (or {hw[0]} and {hw[1]})" if hw else ""
            raise layer.error(f"{name}{alternative} is required")
        return default, default
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise layer.error(f"{name} is given {len(values)} times; give it once or once per spatial axis (2)")


def pool_pair(layer: Layer, param, name: str, default: int | None) -> Pair:
    """(h, w) of the scalar PoolingParameter field `name`, or of both `name_h` and `name_w`
    (Caffe's pooling demands the pair complete and exclusive). `default` None = required."""
    name_h, name_w = _hw_names(param, name)
    has_h, has_w = param.HasField(name_h), param.HasField(name_w)
    if has_h or has_w:
        if param.HasField(name) or not (has_h and has_w):
            raise layer.error(f"give either {name} or both {name_h} and {name_w}")
        return int(getattr(param, name_h)), int(getattr(param, name_w))
    if param.HasField(name):
        value = int(getattr(param, name))
        return value, value
    if default is None:
        raise layer.error(f"{name} (or {name_h} and {name_w}) is required")
    return default, default


def kernel_extent(kernel: int, dilation: int = 1) -> int:
    """Span of a dilated kernel in input pixels."""
    return dilation * (kernel - 1) + 1


def conv_out(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    """Convolution output length (floor); -1 when the kernel does not fit the padded input."""
    room = size + 2 * pad - kernel_extent(kernel, dilation)
    return -1 if room < 0 else room // stride + 1


def deconv_out(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    """Deconvolution (transposed convolution) output length."""
    return stride * (size - 1) + kernel_extent(kernel, dilation) - 2 * pad


def pool_out(size: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe's pooling output length: ceil rounding, then, only when pad > 0, drop the last window
    if it would start at or beyond image + left pad. -1 when the kernel exceeds the padded input."""
    room = size + 2 * pad - kernel
    if room < 0:
        return -1
    out = -(-room // stride) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def torch_ceil_pool_out(size: int, kernel: int, stride: int, pad: int) -> int:
    """PyTorch's `ceil_mode=True` pooling length, which drops a last window starting beyond
    image + pad whatever the pad (Caffe only does so when pad > 0)."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return out
