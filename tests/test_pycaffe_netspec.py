"""pycaffe's NetSpec (rloss.caffe.net_spec): the documented examples (python/caffe/test/test_net_spec.py's
LeNet, named and anonymous, top-less Silence layers, an FCN-like net with Deconvolution and Crop) give
the NetParameters written out below by hand from pycaffe's naming and field rules, and those build and
run in rloss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from rloss import caffe
from rloss.caffe import layers as L
from rloss.caffe import params as P
from rloss.caffe.net_spec import TYPE_PARAMS
from rloss.errors import ProtoError
from rloss.proto import caffe_pb2


def parsed(text: str):
    return text_format.Parse(text, caffe_pb2.NetParameter())


def built(folder: Path, net_param, phase: int = caffe.TEST) -> caffe.Net:
    path = folder / "spec.prototxt"
    path.write_text(str(net_param))  # pycaffe's way: the message's text form, read back as a file
    return caffe.Net(str(path), phase)


def lenet_layers(n, batch: int) -> None:
    """LeNet as pycaffe's test writes it, assigning every top to `n` (a NetSpec or a plain namespace)."""
    n.data, n.label = L.DummyData(shape=[dict(dim=[batch, 1, 28, 28]), dict(dim=[batch, 1, 1, 1])],
                                  transform_param=dict(scale=1.0 / 256), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)


def lenet_text(names: dict[str, str]) -> str:
    """The expected LeNet layers, blob and layer names from `names` (the NetSpec's or pycaffe's auto names)."""
    def n(key: str) -> str:
        return names.get(key, key)

    xavier = 'weight_filler { type: "xavier" }'
    return f"""
layer {{ name: "{n('data')}" type: "DummyData" top: "{n('data')}" top: "{n('label')}"
  transform_param {{ scale: 0.00390625 }}
  dummy_data_param {{ shape {{ dim: 2 dim: 1 dim: 28 dim: 28 }} shape {{ dim: 2 dim: 1 dim: 1 dim: 1 }} }} }}
layer {{ name: "{n('conv1')}" type: "Convolution" bottom: "{n('data')}" top: "{n('conv1')}"
  convolution_param {{ num_output: 20 kernel_size: 5 {xavier} }} }}
layer {{ name: "{n('pool1')}" type: "Pooling" bottom: "{n('conv1')}" top: "{n('pool1')}"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "{n('conv2')}" type: "Convolution" bottom: "{n('pool1')}" top: "{n('conv2')}"
  convolution_param {{ num_output: 50 kernel_size: 5 {xavier} }} }}
layer {{ name: "{n('pool2')}" type: "Pooling" bottom: "{n('conv2')}" top: "{n('pool2')}"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "{n('ip1')}" type: "InnerProduct" bottom: "{n('pool2')}" top: "{n('ip1')}"
  inner_product_param {{ num_output: 500 {xavier} }} }}
layer {{ name: "{n('relu1')}" type: "ReLU" bottom: "{n('ip1')}" top: "{n('ip1')}" }}
layer {{ name: "{n('ip2')}" type: "InnerProduct" bottom: "{n('ip1')}" top: "{n('ip2')}"
  inner_product_param {{ num_output: 10 {xavier} }} }}
layer {{ name: "{n('loss')}" type: "SoftmaxWithLoss" bottom: "{n('ip2')}" bottom: "{n('label')}" top: "{n('loss')}" }}
"""


class Namespace:
    """Plain attributes: LeNet written with local tops, as pycaffe's anon_lenet."""


def test_named_lenet_is_the_expected_net_and_runs(tmp_path: Path) -> None:
    n = caffe.NetSpec()
    lenet_layers(n, batch=2)
    net_param = n.to_proto()
    assert net_param == parsed(lenet_text({}))
    assert net_param.layer[6].bottom == net_param.layer[6].top  # the ReLU is in place
    net = built(tmp_path, net_param)
    assert len(net.layers) == 9 and net.outputs == ["loss"]
    assert net.blobs["ip2"].shape == (2, 10) and net.params["conv2"][0].shape == (50, 20, 5, 5)
    assert np.isfinite(float(net.forward()["loss"]))


def test_anonymous_lenet_gets_pycaffes_automatic_names(tmp_path: Path) -> None:
    tops = Namespace()
    lenet_layers(tops, batch=2)
    auto = {"data": "DummyData1", "label": "DummyData2", "conv1": "Convolution1", "pool1": "Pooling1",
            "conv2": "Convolution2", "pool2": "Pooling2", "ip1": "InnerProduct1", "relu1": "ReLU1",
            "ip2": "InnerProduct2", "loss": "SoftmaxWithLoss1"}
    net_param = tops.loss.to_proto()
    assert net_param == parsed(lenet_text(auto))
    assert caffe.to_proto(tops.loss) == net_param
    assert len(built(tmp_path, net_param).layers) == 9


def test_layers_without_tops_are_functions_named_by_the_spec(tmp_path: Path) -> None:
    n = caffe.NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n["silence_data2"] = L.Silence(n["data2"], ntop=0)
    assert isinstance(n.silence_data, caffe.net_spec.Function)
    assert n.to_proto() == parsed("""
layer { name: "data" type: "DummyData" top: "data" top: "data2" dummy_data_param { shape { dim: 3 } } }
layer { name: "silence_data" type: "Silence" bottom: "data" }
layer { name: "silence_data2" type: "Silence" bottom: "data2" }""")
    assert built(tmp_path, n.to_proto()).forward() == {}
    assert caffe.to_proto(L.Silence(L.Input(shape=dict(dim=[1])), ntop=0)).layer[1].name == "Silence1"
    with pytest.raises(AttributeError, match="no top 'missing'"):
        n.missing  # noqa: B018


def test_an_input_that_is_not_a_top_is_a_type_error() -> None:
    tops = L.DummyData(ntop=2)
    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is <class 'tuple'>\)$"):
        L.Silence(tops, ntop=0)
    L.Silence(*tops, ntop=0)


def fcn_spec() -> caffe.NetSpec:
    """An FCN-like net: convolutions, a 2x pooling, a learned 2x upsampling and a Crop back to the input."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 20, 20]))
    n.conv1 = L.Convolution(n.data, kernel_size=3, pad=1, num_output=8, param=[dict(lr_mult=1, decay_mult=1),
                            dict(lr_mult=2, decay_mult=0)], weight_filler=dict(type="gaussian", std=0.1))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.score = L.Convolution(n.pool1, kernel_size=1, num_output=4, weight_filler=dict(type="gaussian", std=0.1))
    n.upscore = L.Deconvolution(n.score, kernel_size=4, stride=2, num_output=4, bias_term=False,
                                weight_filler=dict(type="bilinear"), param=[dict(lr_mult=0)])
    n.crop = L.Crop(n.upscore, n.data, crop_param=dict(axis=np.int64(2), offset=np.array([1])))
    n.loss = L.SoftmaxWithLoss(n.crop, L.Input(shape=dict(dim=[1, 1, 20, 20])), loss_weight=2,
                               loss_param=dict(ignore_label=255, normalize=False),
                               include=dict(phase=caffe.TRAIN), propagate_down=[True, False])
    return n


FCN = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 20 dim: 20 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 8 pad: 1 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "score" type: "Convolution" bottom: "pool1" top: "score"
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "upscore" type: "Deconvolution" bottom: "score" top: "upscore" param { lr_mult: 0 }
  convolution_param { num_output: 4 bias_term: false kernel_size: 4 stride: 2 weight_filler { type: "bilinear" } } }
layer { name: "crop" type: "Crop" bottom: "upscore" bottom: "data" top: "crop" crop_param { axis: 2 offset: 1 } }
layer { name: "Input1" type: "Input" top: "Input1" input_param { shape { dim: 1 dim: 1 dim: 20 dim: 20 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "crop" bottom: "Input1" top: "loss"
  include { phase: TRAIN } loss_weight: 2 propagate_down: true propagate_down: false
  loss_param { ignore_label: 255 normalize: false } }
"""


def test_fcn_with_deconvolution_and_crop_is_the_expected_net_and_crops(tmp_path: Path) -> None:
    n = fcn_spec()
    assert n.to_proto() == parsed(FCN)
    net = built(tmp_path, n.to_proto(), caffe.TRAIN)
    assert net.blobs["upscore"].shape == (1, 4, 22, 22) and net.blobs["crop"].shape == (1, 4, 20, 20)
    image = np.random.RandomState(0).randn(1, 3, 20, 20).astype(np.float32)
    net.forward(data=image, Input1=np.zeros((1, 1, 20, 20)))
    np.testing.assert_array_equal(net.blobs["crop"].data, net.blobs["upscore"].data[:, :, 1:21, 1:21])
    assert "loss" not in built(tmp_path, n.to_proto(), caffe.TEST).blobs  # include { phase: TRAIN }


def test_tops_show_their_function_as_coord_map_reads_it() -> None:
    n = fcn_spec()
    fn = n.upscore.fn
    assert fn.type_name == "Deconvolution" and fn.inputs == (n.score,) and n.score.fn.tops == (n.score,)
    assert fn.params == {"kernel_size": 4, "stride": 2, "num_output": 4, "bias_term": False,
                         "weight_filler": {"type": "bilinear"}, "param": [{"lr_mult": 0}]}  # no ntop, in_place
    assert n.relu1.fn.in_place and n.relu1.fn.inputs == (n.conv1,) and "in_place" not in n.relu1.fn.params
    assert n.crop.fn.inputs == (n.upscore, n.data) and n.crop.n == 0


def test_fields_go_to_the_type_message_else_the_layer() -> None:
    assert TYPE_PARAMS["InnerProduct"] == "inner_product_param" and TYPE_PARAMS["ReLU"] == "relu_param"
    assert TYPE_PARAMS["DenseCRFLoss"] == "densecrf_loss_param" and TYPE_PARAMS["LRN"] == "lrn_param"
    assert TYPE_PARAMS["Deconvolution"] == "convolution_param" and "SoftmaxWithLoss" not in TYPE_PARAMS
    layer = caffe.to_proto(L.Pooling(L.Input(shape=dict(dim=[1, 1, 4, 4])), pool="AVE", kernel_size=2,
                                     name="avg", exclude=[dict(stage="deploy")])).layer[1]
    assert layer.pooling_param.pool == caffe_pb2.PoolingParameter.AVE and layer.pooling_param.kernel_size == 2
    assert layer.name == "avg" and layer.top == ["Pooling1"]  # a `name` field names the layer, as in pycaffe
    assert layer.exclude[0].stage == ["deploy"]
    with pytest.raises(ProtoError, match="layer type Convolution, field 'kernel_sise'"):
        caffe.to_proto(L.Convolution(L.Input(shape=dict(dim=[1])), kernel_sise=3))
    with pytest.raises(AttributeError):
        P.Pooling.CUBIC  # noqa: B018
