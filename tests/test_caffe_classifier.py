"""pycaffe's net-level helpers in rloss.caffe: Classifier.predict on a tiny deploy net against a numpy
computation of the crops, the preprocessing and the layers; and coord_map over stand-in NetSpec tops
(conv/pool/deconv/crop chains, FCN's), against maps derived by hand and FCN's published crop offsets."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from rloss import caffe
from rloss.caffe import coord_map
from rloss.errors import DataError, NetError

DEPLOY = """name: "tiny_classifier"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                      bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 }
                        bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
MEAN = np.array([0.3, 0.5, 0.7])
RAW_SCALE, INPUT_SCALE, CHANNEL_SWAP = 2.0, 1.5, (2, 1, 0)


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    """The deploy prototxt and weights (random fillers, saved by rloss), and the weights as numpy."""
    folder = tmp_path_factory.mktemp("classifier")
    model, weights = folder / "deploy.prototxt", folder / "weights.caffemodel"
    model.write_text(DEPLOY)
    net = caffe.Net(str(model), caffe.TEST)
    net.save(str(weights))
    arrays = {name: [p.data.copy() for p in params] for name, params in net.params.items()}
    return str(model), str(weights), arrays


def classifier(deploy, **options) -> caffe.Classifier:
    model, weights, _ = deploy
    return caffe.Classifier(model, weights, mean=MEAN, raw_scale=RAW_SCALE, input_scale=INPUT_SCALE,
                            channel_swap=CHANNEL_SWAP, **options)


def numpy_probabilities(crop: np.ndarray, weights) -> np.ndarray:
    """Preprocessing (pycaffe's order) and the net's layers in numpy for one 6 x 6 x 3 crop."""
    blob = (crop.transpose(2, 0, 1)[list(CHANNEL_SWAP)] * RAW_SCALE - MEAN[:, None, None]) * INPUT_SCALE
    conv_w, conv_b = weights["conv"]
    windows = sliding_window_view(blob, (3, 3), axis=(1, 2))  # C x 4 x 4 x 3 x 3
    conv = np.einsum("chwij,ocij->ohw", windows, conv_w) + conv_b[:, None, None]
    fc_w, fc_b = weights["fc"]
    scores = fc_w @ conv.ravel() + fc_b
    exp = np.exp(scores - scores.max())
    return exp / exp.sum()


def ten_crops(image: np.ndarray) -> list[np.ndarray]:
    corners = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]  # 8 x 8 image, 6 x 6 crops
    crops = [image[top:top + 6, left:left + 6] for top, left in corners]
    return crops + [crop[:, ::-1] for crop in crops]


def test_predict_averages_the_ten_crops(deploy):
    images = [np.random.default_rng(seed).uniform(0, 1, (8, 8, 3)) for seed in range(3)]
    predictions = classifier(deploy, image_dims=(8, 8)).predict(images)
    expected = [np.mean([numpy_probabilities(c, deploy[2]) for c in ten_crops(image)], axis=0) for image in images]
    assert predictions.shape == (3, 5)
    np.testing.assert_allclose(predictions, expected, rtol=1e-4, atol=1e-6)


def test_predict_without_oversampling_takes_the_centre(deploy):
    images = [np.random.default_rng(seed).uniform(0, 1, (8, 8, 3)) for seed in range(3)]  # 3: last batch padded
    predictions = classifier(deploy, image_dims=(8, 8)).predict(images, oversample=False)
    expected = [numpy_probabilities(image[1:7, 1:7], deploy[2]) for image in images]
    np.testing.assert_allclose(predictions, expected, rtol=1e-4, atol=1e-6)


def test_default_image_dims_are_the_input_size(deploy):
    net = classifier(deploy)
    np.testing.assert_array_equal(net.image_dims, (6, 6))
    image = np.random.default_rng(5).uniform(0, 1, (6, 6, 3))
    np.testing.assert_allclose(net.predict([image], oversample=False)[0], numpy_probabilities(image, deploy[2]),
                               rtol=1e-4, atol=1e-6)


def test_images_of_other_sizes_are_resized_first(deploy):
    images = [np.random.default_rng(9).uniform(0, 1, (11, 7, 3)), np.random.default_rng(10).uniform(0, 1, (5, 9, 3))]
    predictions = classifier(deploy, image_dims=(8, 8)).predict(images)
    assert predictions.shape == (2, 5)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=1e-5)


def test_predict_errors(deploy):
    net = classifier(deploy)
    with pytest.raises(DataError, match="no images"):
        net.predict([])
    with pytest.raises(NetError, match="do not fit input 'data'"):
        caffe.Classifier(deploy[0], deploy[1]).predict([np.zeros((6, 6, 1))])


# ---- coord_map over stand-in NetSpec tops ----------------------------------------------------------

class StubFunction:
    """What coord_map reads of a NetSpec Function: the layer type, its keyword params, its bottoms."""

    def __init__(self, type_name: str, inputs: tuple, params: dict):
        self.type_name, self.inputs, self.params = type_name, inputs, params


class StubTop:
    def __init__(self, fn: StubFunction):
        self.fn = fn


def layer(type_name: str, *bottoms: StubTop, **params) -> StubTop:
    return StubTop(StubFunction(type_name, bottoms, params))


def data() -> StubTop:
    return layer("Input")


def assert_map(actual, axis, scale, shift):
    assert actual[0] == axis
    np.testing.assert_allclose(np.atleast_1d(actual[1]), scale)
    np.testing.assert_allclose(np.atleast_1d(actual[2]), shift)


def test_valid_convolution_shifts_by_half_its_kernel():
    x = data()
    conv = layer("Convolution", x, kernel_size=3, num_output=8)
    # output pixel i is centred on input pixel i + 1: x -> conv is i - 1
    assert_map(coord_map.coord_map_from_to(x, conv), 1, 1, -1)
    assert coord_map.crop_parameters(x, conv) == {"axis": 2, "offset": [1]}


def test_dilation_and_per_axis_parameters():
    x = data()
    dilated = layer("Convolution", x, kernel_size=3, dilation=2)  # extent 5: shift (0 - 2) / 1
    assert coord_map.crop_parameters(x, dilated) == {"axis": 2, "offset": [2]}
    rectangular = layer("Convolution", x, kernel_size=[3, 5], pad=[0, 1])  # shifts 0 - 1, 1 - 2
    assert coord_map.crop_parameters(x, rectangular) == {"axis": 2, "offset": [1, 1]}


def test_pool_then_deconvolution_maps_back_with_an_offset():
    x = data()
    pooled = layer("Pooling", x, kernel_size=2, stride=2)  # scale 1/2, shift (0 - 1/2) / 2 = -1/4
    up = layer("Deconvolution", pooled, convolution_param=dict(kernel_size=4, stride=2, num_output=1))  # 2, 3/2
    assert_map(coord_map.coord_map_from_to(up, x), 1, 1, -1)  # x -> up is 2 * (-1/4) + 3/2 = 1; inverted
    assert coord_map.crop_parameters(up, x) == {"axis": 2, "offset": [1]}


def test_strided_chain_with_nested_pooling_params():
    x = data()
    conv = layer("Convolution", x, kernel_size=3, stride=2, pad=1)  # scale 1/2, shift 0
    relu = layer("ReLU", conv)
    pool = layer("Pooling", relu, pooling_param=dict(kernel_size=3, stride=2, pad=1))  # 1/2, 0
    assert_map(coord_map.coord_map_from_to(x, pool), 1, 0.25, 0)


def test_half_pixel_offset_cannot_be_cropped():
    x = data()
    conv = layer("Convolution", x, kernel_size=3, stride=2, pad=1)  # 1/2, 0
    up = layer("Deconvolution", conv, convolution_param=dict(kernel_size=4, stride=2, pad=1))  # 2, 3/2 - 1
    assert_map(coord_map.coord_map_from_to(up, x), 1, 1, -0.5)
    with pytest.raises(NetError, match="whole number"):
        coord_map.crop_parameters(up, x)


def test_crop_direction_and_scale_are_checked():
    x = data()
    conv = layer("Convolution", x, kernel_size=3)
    with pytest.raises(NetError, match="negative"):
        coord_map.crop_parameters(conv, x)
    pooled = layer("Pooling", x, kernel_size=2, stride=2)
    with pytest.raises(NetError, match="scales"):
        coord_map.crop_parameters(x, pooled)


def test_crop_layer_maps_by_its_offset_through_its_first_bottom_only():
    x = data()
    conv = layer("Convolution", x, kernel_size=3)
    reference = layer("Pooling", x, kernel_size=2, stride=2)
    cropped = layer("Crop", conv, reference, crop_param=dict(axis=2, offset=[3]))
    # x -> conv is -1, conv -> cropped is -3; the reference bottom (scale 1/2) is not walked
    assert_map(coord_map.coord_map_from_to(x, cropped), 1, 1, -4)


def test_point_wise_layers_keep_coordinates():
    x = data()
    top = layer("Dropout", layer("ReLU", layer("Scale", x)))
    assert_map(coord_map.coord_map_from_to(x, top), None, 1, 0)
    assert coord_map.crop_parameters(x, top) == {"axis": 2, "offset": [0]}


def test_unmappable_or_inconsistent_graphs_are_net_errors():
    x = data()
    with pytest.raises(NetError, match="share no ancestor"):
        coord_map.crop_parameters(x, layer("InnerProduct", x, num_output=3))
    with pytest.raises(NetError, match="share no ancestor"):
        coord_map.crop_parameters(x, data())
    with pytest.raises(NetError, match="kernel_h"):
        coord_map.coord_map_from_to(x, layer("Convolution", x, kernel_h=3, kernel_w=3))
    channel_crop = layer("Crop", layer("Convolution", x, kernel_size=3), x, crop_param=dict(axis=3))
    with pytest.raises(NetError, match="different axes"):
        coord_map.coord_map_from_to(x, channel_crop)


def vgg_trunk(x: StubTop) -> dict[str, StubTop]:
    """FCN's VGG16 trunk (conv1_1 padded by 100, 3x3 convs, 2x2 pools, fc6 7x7, fc7 and score 1x1)."""
    tops, bottom = {}, x
    for stage, convs in enumerate([2, 2, 3, 3, 3], start=1):
        for index in range(convs):
            pad = 100 if (stage, index) == (1, 0) else 1
            bottom = layer("ReLU", layer("Convolution", bottom, kernel_size=3, pad=pad, num_output=64))
        bottom = tops[f"pool{stage}"] = layer("Pooling", bottom, kernel_size=2, stride=2)
    fc6 = layer("Dropout", layer("ReLU", layer("Convolution", bottom, kernel_size=7, num_output=4096)))
    fc7 = layer("Dropout", layer("ReLU", layer("Convolution", fc6, kernel_size=1, num_output=4096)))
    tops["score_fr"] = layer("Convolution", fc7, kernel_size=1, num_output=21)
    return tops


def upscore(bottom: StubTop, factor: int) -> StubTop:
    return layer("Deconvolution", bottom, convolution_param=dict(num_output=21, kernel_size=2 * factor, stride=factor))


def cropped(top_from: StubTop, top_to: StubTop) -> tuple[StubTop, list[int]]:
    params = coord_map.crop_parameters(top_from, top_to)
    return layer("Crop", top_from, top_to, crop_param=params), params["offset"]


def test_fcn32s_offset():
    x = data()
    _, offset = cropped(upscore(vgg_trunk(x)["score_fr"], 32), x)
    assert offset == [19]  # voc-fcn32s's crop offset


def test_fcn8s_offsets():
    x = data()
    trunk = vgg_trunk(x)
    upscore2 = upscore(trunk["score_fr"], 2)
    score_pool4c, offset4 = cropped(layer("Convolution", trunk["pool4"], kernel_size=1), upscore2)
    upscore_pool4 = upscore(layer("Eltwise", upscore2, score_pool4c), 2)
    score_pool3c, offset3 = cropped(layer("Convolution", trunk["pool3"], kernel_size=1), upscore_pool4)
    _, offset = cropped(upscore(layer("Eltwise", upscore_pool4, score_pool3c), 8), x)
    assert (offset4, offset3, offset) == ([5], [9], [31])  # voc-fcn8s's crop offsets
    _, offset16 = cropped(upscore(layer("Eltwise", upscore2, score_pool4c), 16), x)
    assert offset16 == [27]  # voc-fcn16s's final crop


def test_crop_builds_a_net_spec_crop_layer(monkeypatch):
    calls = []
    fake_layers = types.SimpleNamespace(Crop=lambda *bottoms, **params: calls.append((bottoms, params)) or "top")
    monkeypatch.setitem(sys.modules, "rloss.caffe.net_spec", types.SimpleNamespace(layers=fake_layers))
    x = data()
    conv = layer("Convolution", x, kernel_size=5)
    assert coord_map.crop(x, conv) == "top"
    assert calls == [((x, conv), {"crop_param": {"axis": 2, "offset": [2]}})]
