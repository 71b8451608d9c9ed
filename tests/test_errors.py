"""Bad inputs raise rloss's own errors, naming the file or layer and the limit, before anything huge is
allocated; messages stay short whatever the input (one test per reviewed case)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from PIL import Image

from rloss import io as rio
from rloss.errors import MAX_MESSAGE_CHARS, DataError, LayerError, NetError, ProtoError, RlossError, WeightsError
from rloss.layers import layer_class, prefetching
from rloss.net import Net
from rloss.proto import blob as blob_module
from rloss.proto import caffe_pb2
from rloss.proto.text import parse_net
from tests.helpers import layer_from_text, relative_error
from tests.test_layers_vision import ref_pool

INT_MAX = "2147483647"


def layer_error(text: str, shapes=()) -> str:
    """The LayerError message of building the layer `text` on bottoms of `shapes`."""
    with pytest.raises(LayerError) as caught:
        layer_from_text(text, shapes)
    return str(caught.value)


def conv(filler: str, channels: int = 2) -> tuple[str, list]:
    text = (f'name: "conv" type: "Convolution" bottom: "x" top: "y" '
            f"convolution_param {{ num_output: 2 kernel_size: 1 weight_filler {{ {filler} }} }}")
    return text, [(1, channels, 3, 3)]


# ---- 1, 2: fillers ------------------------------------------------------------------------------
@pytest.mark.parametrize("std", ["-1", "nan", "inf"])
def test_gaussian_filler_needs_std_at_least_zero(std):
    message = layer_error(*conv(f'type: "gaussian" std: {std}'))
    assert "layer 'conv' (type Convolution): parameter blob 0" in message
    assert "finite std >= 0" in message and f"std {float(std)}" in message


def test_uniform_filler_needs_min_at_most_max():
    message = layer_error(*conv('type: "uniform" min: 1 max: -1'))
    assert "layer 'conv'" in message and "min <= max" in message and "min 1.0 and max -1.0" in message


def inner_product(filler: str) -> tuple[str, list]:
    """An InnerProduct on a bottom without inputs: its weight blob (2, 0) is empty."""
    text = (f'name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
            f"inner_product_param {{ num_output: 2 weight_filler {{ {filler} }} }}")
    return text, [(1, 0)]


@pytest.mark.parametrize("kind", ["xavier", "msra", "gaussian", "positive_unitball"])
def test_fan_based_filler_on_an_empty_blob(kind):
    message = layer_error(*inner_product(f'type: "{kind}"'))
    assert "layer 'ip' (type InnerProduct): parameter blob 0" in message
    assert f"the {kind} filler needs a blob with at least one element, got shape (2, 0)" in message


def test_convolution_of_zero_channels():
    message = layer_error(*conv('type: "xavier"', channels=0))
    assert "layer 'conv'" in message and "dims from axis 1 on are > 0, got shape (1, 0, 3, 3)" in message


def test_unknown_filler_names_the_layer():
    message = layer_error(*inner_product('type: "xavierr"'))
    assert "layer 'ip'" in message and "unknown filler type 'xavierr'" in message


# ---- 3: huge blobs are refused before allocation ------------------------------------------------
@pytest.mark.parametrize("text, shapes, shape", [
    ('name: "big" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 2000000000 '
     "kernel_size: 3 }", [(1, 3, 5, 5)], "(2000000000, 3, 3, 3)"),
    ('name: "big" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 4000000000 }',
     [(1, 10)], "(4000000000, 10)"),
    ('name: "big" type: "Input" top: "y" input_param { shape { dim: 100000 dim: 100000 dim: 100000 } }',
     [], "(100000, 100000, 100000)"),
    ('name: "big" type: "SegAccuracy" bottom: "x" bottom: "l" top: "y"', [(1, 1000000, 1, 1), (1, 1, 1, 1)],
     "(1000000, 1000000)"),
    ('name: "big" type: "Deconvolution" bottom: "x" top: "y" convolution_param { num_output: 1 kernel_size: 3 '
     "stride: 2000000000 }", [(1, 1, 3, 3)], "(1, 1, 4000000003, 4000000003)"),
])
def test_huge_blob_is_refused(text, shapes, shape):
    message = layer_error(text, shapes)
    assert "layer 'big'" in message and shape in message and f"the limit is {INT_MAX}" in message


def test_blob_beyond_the_machine_memory(monkeypatch):
    monkeypatch.setattr(blob_module, "physical_memory", lambda: 2**30)
    message = layer_error('name: "big" type: "Input" top: "y" input_param { shape { dim: 20000 dim: 20000 } }')
    assert "layer 'big'" in message and "(20000, 20000) needs 1.5 GiB; the limit is this machine's memory, 1.0 GiB" \
        in message


def test_huge_net_input_is_refused():
    net_param = text_format.Parse('name: "n" input: "data" input_shape { dim: 65536 dim: 65536 }',
                                  caffe_pb2.NetParameter())
    with pytest.raises(NetError, match=rf"net.prototxt: input 'data': shape \(65536, 65536\) .*limit is {INT_MAX}"):
        Net(net_param, source="net.prototxt")


# ---- 4: ImageSegData sizes ----------------------------------------------------------------------
@pytest.fixture
def seg_list(tmp_path: Path) -> Path:
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "label.png")
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/image.png {tmp_path}/label.png\n")
    return source


@pytest.mark.parametrize("data_extra, transform, shape", [
    ("", "crop_size: 100000", "(1, 3, 100000, 100000)"),
    ("new_height: 100000 new_width: 100000", "", "(1, 3, 100000, 100000)"),
    ("batch_size: 1000000000", "crop_size: 3", "(1000000000, 3, 3, 3)"),
])
def test_image_seg_data_sizes_are_refused_at_construction(seg_list, monkeypatch, data_extra, transform, shape):
    monkeypatch.setattr(prefetching, "Prefetcher", None)  # refused before any loader starts
    batch = "" if "batch_size" in data_extra else "batch_size: 1"
    text = (f'name: "data" type: "ImageSegData" top: "data" top: "label" '
            f'image_data_param {{ source: "{seg_list}" label_type: PIXEL {batch} {data_extra} }} '
            f"transform_param {{ {transform} }}")
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    with pytest.raises(LayerError) as caught:
        layer_class("ImageSegData")(param, [], caffe_pb2.TEST)
    message = str(caught.value)
    assert "layer 'data' (type ImageSegData)" in message and shape in message and INT_MAX in message


def test_a_scale_factor_too_large_for_memory_is_refused_naming_the_image(seg_list):
    """The size depends on each image, so the check runs when an image is rescaled (in the loader)."""
    text = (f'name: "data" type: "ImageSegData" top: "data" top: "label" image_data_param {{ source: "{seg_list}" '
            'label_type: PIXEL batch_size: 1 } transform_param { crop_size: 4 scale_factors: 1000000 }')
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    layer = layer_class("ImageSegData")(param, [], caffe_pb2.TRAIN)
    try:
        with pytest.raises(DataError, match=r"layer 'data' \(type ImageSegData\): line 1 of the list .*scale "
                           r"factor 1000000.0 makes the 4x5 image 4000000x5000000: .*limit is"):
            layer()
    finally:
        layer.close()


# ---- 5, 6: blob shapes in binary files ----------------------------------------------------------
def fill_blob(blob, dims: list[int], values: int) -> None:
    blob.shape.dim.extend(dims)
    blob.data.extend([0.5] * values)


def model_with_blob(tmp_path: Path, dims: list[int], values: int = 0) -> Path:
    net = caffe_pb2.NetParameter(name="n")
    fill_blob(net.layer.add(name="conv", type="Convolution").blobs.add(), dims, values)
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(net.SerializeToString())
    return path


def state_with_blob(tmp_path: Path, dims: list[int], values: int = 0) -> Path:
    state = caffe_pb2.SolverState(iter=1)
    fill_blob(state.history.add(), dims, values)
    path = tmp_path / "bad.solverstate"
    path.write_bytes(state.SerializeToString())
    return path


@pytest.mark.parametrize("write", [model_with_blob, state_with_blob])
def test_blob_count_overflowing_int64_is_refused(tmp_path, write):
    path = write(tmp_path, [2**32, 2**32])  # 2**64 elements: wraps to 0 in int64
    read = rio.read_net_param if path.suffix == ".caffemodel" else rio.read_solver_state
    with pytest.raises(WeightsError) as caught:
        read(path)
    message = str(caught.value)
    assert str(path) in message and "blob 0" in message and f"limit is {INT_MAX}" in message
    assert ("layer 'conv'" in message) == (path.suffix == ".caffemodel")


@pytest.mark.parametrize("write", [model_with_blob, state_with_blob])
def test_blob_with_more_than_32_axes_in_a_file(tmp_path, write):
    path = write(tmp_path, [1] * 33, values=1)
    read = rio.read_net_param if path.suffix == ".caffemodel" else rio.read_solver_state
    with pytest.raises(WeightsError, match=rf"{path}: .*blob 0: shape .* has 33 axes; the limit is 32"):
        read(path)


@pytest.mark.parametrize("text, shapes", [
    ('name: "deep" type: "Input" top: "y" input_param { shape { ' + "dim: 1 " * 33 + "} }", []),
    ('name: "deep" type: "DummyData" top: "y" dummy_data_param { shape { ' + "dim: 1 " * 33 + "} }", []),
    ('name: "deep" type: "Reshape" bottom: "x" top: "y" reshape_param { shape { ' + "dim: 1 " * 33 + "} }",
     [(1,)]),
])
def test_more_than_32_axes_from_a_prototxt(text, shapes):
    message = layer_error(text, shapes)
    assert "layer 'deep'" in message and "has 33 axes; the limit is 32" in message


# ---- 7: message length ----------------------------------------------------------------------------
def test_parse_error_of_a_long_line_quotes_only_around_the_column():
    text = 'layer { name: "a" type: "ReLU" } ' * 6000 + "nmae: 1 " + 'layer { name: "b" } ' * 4000  # 280 KB
    with pytest.raises(ProtoError) as caught:
        parse_net(text, "long.prototxt")
    message = str(caught.value)
    column = text.index("nmae") + 1
    assert message.startswith(f"long.prototxt:1:{column}: ") and len(message) < 600
    quoted, caret = message.split("\n")[1:3]
    assert quoted.startswith("    ...") and quoted.endswith("...")
    assert quoted[caret.index("^"):].startswith("nmae: 1")


def test_long_messages_are_clipped_keeping_head_and_tail():
    original = "head " + "x" * 10_000 + " tail"
    message = str(RlossError(original))
    assert len(message) <= MAX_MESSAGE_CHARS
    assert message.startswith("head xxx") and message.endswith("xxx tail")
    marker = re.search(r" \[\.\.\. (\d+) characters cut \.\.\.\] ", message)
    assert len(message) - len(marker.group()) + int(marker.group(1)) == len(original)
    assert len(str(LayerError("l", "T", "y" * 10_000))) <= MAX_MESSAGE_CHARS
    assert str(RlossError("short")) == "short"


# ---- found by fuzzing -----------------------------------------------------------------------------
@pytest.mark.parametrize("method, pad", [("MAX", 0), ("MAX", 1), ("AVE", 0), ("AVE", 1)])
def test_pooling_with_a_stride_beyond_the_image(method, pad):
    """A stride of 2**31 used to pad the input to 2**31 pixels (allocator error); Caffe's values."""
    tops = 'top: "y" top: "mask"' if method == "MAX" else 'top: "y"'
    layer = layer_from_text(f'name: "pool" type: "Pooling" bottom: "x" {tops} pooling_param {{ pool: {method} '
                            f"kernel_size: 3 stride: 2147483648 pad: {pad} }}", [(1, 2, 5, 4)])
    x = torch.randn(1, 2, 5, 4)
    expected, mask, _ = ref_pool(x.numpy(), method, (3, 3), (2**31, 2**31), (pad, pad))
    outputs = layer(x)
    assert relative_error(outputs[0], expected) < 1e-6
    if method == "MAX":
        assert torch.equal(outputs[1], torch.from_numpy(mask).float())


def test_pooling_refuses_a_padded_input_beyond_the_limit():
    message = layer_error('name: "pool" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: MAX '
                          "kernel_size: 2000000000 pad: 1999999999 stride: 2000000000 }", [(1, 1, 3, 3)])
    assert "layer 'pool'" in message and "the input padded for kernel (2000000000, 2000000000)" in message
    assert f"the limit is {INT_MAX}" in message


@pytest.mark.parametrize("text, shapes, expected", [
    ('name: "bn" type: "BatchNorm" bottom: "x" top: "y"', [(1, 0, 3, 3)], "at least one channel"),
    ('name: "seg" type: "SegAccuracy" bottom: "x" bottom: "l" top: "y"', [(1, 0, 3, 3), (1, 1, 3, 3)],
     "at least one class"),
    ('name: "pool" type: "Pooling" bottom: "x" top: "y" pooling_param { kernel_size: 1 }', [(1, 0, 3, 3)],
     "dims from axis 1 on are > 0"),
    ('name: "interp" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 2 }', [(0, 3, 3, 3)],
     "dims from axis 0 on are > 0"),
    ('name: "argmax" type: "ArgMax" bottom: "x" top: "y"', [()], "at least one axis"),
    ('name: "pool" type: "Pooling" bottom: "x" top: "y" pooling_param { kernel_size: 1 }', [()], "4-D bottom"),
    ('name: "in" type: "Input" top: "y" input_param { shape { dim: 0 dim: 1 dim: 65536 dim: 65536 } }', [],
     "(0, 1, 65536, 65536) has 4294967296 elements (counting its 0 dims as 1)"),
])
def test_empty_or_scalar_bottoms_are_refused(text, shapes, expected):
    assert expected in layer_error(text, shapes)


@pytest.mark.parametrize("text, shape, top", [
    ('name: "argmax" type: "ArgMax" bottom: "x" top: "y"', (0, 3, 2), (0, 1, 1)),
    ('name: "reshape" type: "Reshape" bottom: "x" top: "y" reshape_param { shape { } }', (1, 1, 1), ()),
    ('name: "reshape" type: "Reshape" bottom: "x" top: "y" reshape_param { shape { dim: 0 dim: -1 } }',
     (0, 2, 3), None),
])
def test_forward_on_empty_or_scalar_tops(text, shape, top):
    """Forward used to fail in torch (ambiguous -1 for 0 values, reshape() of no dims)."""
    if top is None:
        with pytest.raises(LayerError, match="not divisible"):  # Caffe cannot infer -1 from 0 values either
            layer_from_text(text, [shape])
        return
    layer = layer_from_text(text, [shape])
    assert tuple(layer(torch.zeros(shape))[0].shape) == top == layer.top_shapes[0]


def test_solver_state_with_a_name_that_is_not_utf8(tmp_path):
    path = tmp_path / "bad.solverstate"
    path.write_bytes(caffe_pb2.SolverState(iter=1, learned_net="abc").SerializeToString().replace(b"abc", b"a\x80c"))
    with pytest.raises(WeightsError, match=rf"{path}: the text field caffe.SolverState.learned_net is not UTF-8"):
        rio.read_solver_state(path)


def test_a_layer_error_survives_pickling_whole() -> None:
    """A rank's error reaches the others through pickling (multiprocessing, torch elastic)."""
    import pickle

    error = LayerError("conv1", "Convolution", "kernel_size must be > 0")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is LayerError and str(copy) == str(error)
    assert (copy.layer_name, copy.layer_type, copy.message) == ("conv1", "Convolution", "kernel_size must be > 0")
