"""Caffe's rewrite of a net before it is built: a `Split` layer after every blob version that more than
one layer consumes, named exactly as Caffe names them, so blob names, per-consumer diffs and saved
models match Caffe's."""

from __future__ import annotations

from collections import defaultdict

from rloss.errors import NetError
from rloss.layers import layer_class
from rloss.proto import caffe_pb2

INPUT_PRODUCER = -1  # pseudo layer index of the net-level inputs; Caffe names it "input"


def _split_layer_name(blob: str, producer: str, top_index: int) -> str:
    return f"{blob}_{producer}_{top_index}_split"


def insert_splits(net_param, input_names: list[str]):
    """A copy of `net_param` with Split layers inserted, as Caffe's InsertSplits does.

    A use of a top as a loss (an explicit non-zero loss_weight) counts as one consumer."""
    producer_of: dict[str, tuple[int, int]] = {name: (INPUT_PRODUCER, i) for i, name in enumerate(input_names)}
    consumers: dict[tuple[int, int], int] = defaultdict(int)
    bottom_source: dict[tuple[int, int], tuple[int, int]] = {}
    loss_weight_of: dict[tuple[int, int], float] = {}
    for li, layer in enumerate(net_param.layer):
        for bi, name in enumerate(layer.bottom):
            if name in producer_of:  # unknown bottoms are reported by the net builder, with context
                source = producer_of[name]
                bottom_source[(li, bi)] = source
                consumers[source] += 1
        for ti, name in enumerate(layer.top):
            producer_of[name] = (li, ti)
        for ti in range(min(len(layer.loss_weight), len(layer.top))):
            source = producer_of[layer.top[ti]]
            loss_weight_of[source] = layer.loss_weight[ti]
            if layer.loss_weight[ti]:
                consumers[source] += 1

    def producer_name(index: int) -> str:
        return "input" if index == INPUT_PRODUCER else net_param.layer[index].name

    def blob_name(source: tuple[int, int]) -> str:
        index, top = source
        return input_names[top] if index == INPUT_PRODUCER else net_param.layer[index].top[top]

    def split_layer(source: tuple[int, int]):
        name, producer = blob_name(source), producer_name(source[0])
        split = caffe_pb2.LayerParameter(name=_split_layer_name(name, producer, source[1]), type="Split")
        split.bottom.append(name)
        split.top.extend(f"{split.name}_{k}" for k in range(consumers[source]))
        weight = loss_weight_of.get(source, 0.0)
        if weight:
            split.loss_weight.extend([weight] + [0.0] * (consumers[source] - 1))
        return split

    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:]
    used: dict[tuple[int, int], int] = defaultdict(int)
    for i in range(len(input_names)):
        if consumers[(INPUT_PRODUCER, i)] > 1:
            out.layer.append(split_layer((INPUT_PRODUCER, i)))
    for li, layer in enumerate(net_param.layer):
        copy = out.layer.add()
        copy.CopyFrom(layer)
        for bi in range(len(layer.bottom)):
            source = bottom_source.get((li, bi))
            if source is not None and consumers[source] > 1:
                split_name = _split_layer_name(blob_name(source), producer_name(source[0]), source[1])
                copy.bottom[bi] = f"{split_name}_{used[source]}"
                used[source] += 1
        for ti in range(len(layer.top)):
            if consumers[(li, ti)] > 1:
                out.layer.append(split_layer((li, ti)))
    return out


def data_layers_to_inputs(net_param, batch_size: int | None = None):
    """A copy of `net_param` whose image data layers are replaced by net inputs of the same shapes,
    so a net can be built and run on fed tensors (tests, benchmarks, deploy-style use).

    The shapes are the layer's own at its crop (`sample_shapes`; ImageSegData: data (N, 3, crop, crop),
    label (N, 1, crop, crop), data_dim (N, 1, 1, 2))."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:]
    if out.input_dim:  # declare every input by input_shape, so that ours can be added
        dims = list(out.input_dim)
        del out.input_dim[:]
        for i in range(0, len(dims), 4):
            out.input_shape.add().dim.extend(dims[i:i + 4])
    for layer in net_param.layer:
        cls = layer_class(layer.type)
        if not hasattr(cls, "sample_shapes"):
            out.layer.add().CopyFrom(layer)
            continue
        transform = layer.transform_param
        height = transform.crop_height or transform.crop_size
        width = transform.crop_width or transform.crop_size
        if not (height and width):
            raise NetError(
                f"data layer '{layer.name}' (type {layer.type}) has no crop size, so the shape of its "
                "tops is only known from the images; give transform_param.crop_size to feed it"
            )
        n = batch_size or layer.image_data_param.batch_size
        shapes = [(n, *shape) for shape in cls.sample_shapes(layer, height, width)]
        for name, shape in zip(layer.top, shapes):
            out.input.append(name)
            out.input_shape.add().dim.extend(shape)
    return out
