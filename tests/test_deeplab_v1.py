"""DeepLab v1 (deeplab-public, the fork before DeepLab v2): its own fields upgraded on read (hole ->
dilation, softmaxloss_param -> loss_param, has_label -> label_type, strict_dim dropped), and its
published DeepLab-LargeFOV train and test nets built and run forward.

The real files are read from RLOSS_DEEPLAB_V1_DIR: a folder holding train.prototxt and test.prototxt,
or a git directory of a repository that holds them (by default the read-only mirror of
TheLegendAli/DeepLab-Context, a fork of deeplab-public, where commit bd4aac5 added the LargeFOV model
files as published with the v1 models). Those tests skip, saying why, when neither is there."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.errors import ProtoError
from rloss.net import Net
from rloss.proto import caffe_pb2
from rloss.proto.text import parse_net, read_net
from rloss.wiring import data_layers_to_inputs
from tests.helpers import relative_error
from tests.test_reference_nets import _values

V1_DIR = Path(os.environ.get("RLOSS_DEEPLAB_V1_DIR", "/work/.mirror/TheLegendAli+DeepLab-Context/repo/.git"))
V1_COMMIT = "bd4aac5e14b4d8a3a5e9435d31a9fd08076bc58d"
V1_FOLDER = "config/DeepLab-LargeFOV"
CROP = 65  # 32 k - 31 for k = 3, as the files' comment asks: 65 -> 9 after the three stride-2 poolings
SCORES = (CROP - 1) // 8 + 1
ATROUS = {"conv5_1": 2, "conv5_2": 2, "conv5_3": 2, "fc6": 12}  # hole = pad in the LargeFOV files


def v1_net(body: str, path: str = "v1.prototxt"):
    return parse_net(f'name: "v1"\n{body}', path)


def conv_text(settings: str) -> str:
    return ('layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"\n'
            f"  convolution_param {{ num_output: 2 kernel_size: 3 {settings} }} }}")


# ---- hole -> dilation ------------------------------------------------------------------------------

def test_hole_becomes_dilation():
    (layer,) = v1_net(conv_text("pad: 4 hole: 4")).layer
    assert layer.type == "Convolution"
    assert list(layer.convolution_param.dilation) == [4]
    assert list(layer.convolution_param.pad) == [4]
    assert not layer.convolution_param.HasField("hole")


def test_hole_h_and_hole_w_become_one_dilation_per_axis():
    (layer,) = v1_net(conv_text("hole_h: 2 hole_w: 3")).layer
    assert list(layer.convolution_param.dilation) == [2, 3]
    assert not any(layer.convolution_param.HasField(name) for name in ("hole_h", "hole_w"))


def test_a_v2_layer_with_hole_is_upgraded_too():
    text = 'layer { name: "c" type: "Convolution" convolution_param { kernel_size: 3 hole: 2 } }'
    net = parse_net(text, "v2.prototxt")
    assert list(net.layer[0].convolution_param.dilation) == [2]


def test_hole_and_dilation_together_is_an_error_naming_file_and_layer():
    body = 'layers { name: "data" type: DATA top: "data" }\n' + conv_text("hole: 2 dilation: 2")
    with pytest.raises(ProtoError, match=r"net\.prototxt: layer #1 \('conv'\): .* both DeepLab v1's hole and "
                                         r"dilation \[2\]; .* keep only dilation"):
        v1_net(body, "net.prototxt")


@pytest.mark.parametrize("settings", ["hole: 2 hole_h: 2 hole_w: 2", "hole_h: 2", "hole_w: 3"])
def test_holes_v1_would_refuse_are_an_error(settings):
    with pytest.raises(ProtoError, match=r"v1\.prototxt: layer #0 \('conv'\): .*DeepLab v1 takes hole alone, or "
                                         "hole_h and hole_w together"):
        v1_net(conv_text(settings))


def dilated_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int, hole: int) -> np.ndarray:
    """v1's convolution with holes, from its definition: tap (i, j) reads input pixel
    (y + i * hole - pad, x + j * hole - pad), zero outside; output size H + 2 pad - (k - 1) hole."""
    channels, height, width = x.shape
    k = w.shape[2]
    padded = np.zeros((channels, height + 2 * pad, width + 2 * pad))
    padded[:, pad:pad + height, pad:pad + width] = x
    out_h, out_w = height + 2 * pad - (k - 1) * hole, width + 2 * pad - (k - 1) * hole
    out = np.zeros((w.shape[0], out_h, out_w)) + b[:, None, None]
    for i in range(k):
        for j in range(k):
            window = padded[:, i * hole:i * hole + out_h, j * hole:j * hole + out_w]
            out += np.einsum("oc,chw->ohw", w[:, :, i, j], window)
    return out


def test_a_net_with_hole_computes_v1s_convolution_with_holes():
    text = ('name: "holes" input: "data" input_dim: 1 input_dim: 2 input_dim: 11 input_dim: 10\n'
            'layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"\n'
            '  convolution_param { num_output: 3 kernel_size: 3 pad: 1 hole: 3\n'
            '    weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }')
    net = Net(parse_net(text, "holes.prototxt"), caffe_pb2.TEST)
    x = torch.randn(1, 2, 11, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        net.forward({"data": x})
    weight, bias = (blob.detach().double().numpy() for blob in net.params["conv"])
    expected = dilated_conv(x[0].double().numpy(), weight, bias, pad=1, hole=3)
    assert expected.shape == (3, 7, 6)
    assert relative_error(net.blob_data["conv"][0], expected) < 1e-5


# ---- softmaxloss_param, has_label, strict_dim ----------------------------------------------------

LOSS = 'layers {{ name: "loss" type: {type} bottom: "score" bottom: "label" {settings} }}'


def loss_layer(settings: str, layer_type: str = "SOFTMAX_LOSS"):
    return v1_net(LOSS.format(type=layer_type, settings=settings)).layer[0]


def test_softmaxloss_ignore_label_becomes_loss_param():
    layer = loss_layer("softmaxloss_param { ignore_label: 255 }")
    assert layer.type == "SoftmaxWithLoss"
    assert not layer.HasField("softmaxloss_param")
    assert layer.loss_param == text_format.Parse("ignore_label: 255", caffe_pb2.LossParameter())


def test_softmaxloss_without_ignore_label_leaves_loss_param_unset():
    layer = loss_layer("softmaxloss_param { }")
    assert not layer.HasField("softmaxloss_param") and not layer.HasField("loss_param")


@pytest.mark.parametrize(("settings", "message"), [
    ('softmaxloss_param { weight_source: "w.txt" }',
     r"softmaxloss_param\.weight_source \('w\.txt'\), DeepLab v1's per-class loss weights"),
    ("softmaxloss_param { ignore_label: 0 ignore_label: 255 }", r"softmaxloss_param ignores 2 labels \[0, 255\]"),
    ("softmaxloss_param { ignore_label: 255 } loss_param { ignore_label: 255 }",
     "the layer sets both DeepLab v1's softmaxloss_param and loss_param"),
])
def test_softmaxloss_without_a_v2_form_is_an_error(settings, message):
    with pytest.raises(ProtoError, match=r"v1\.prototxt: layer #0 \('loss'\): " + message):
        loss_layer(settings)


def test_softmaxloss_param_on_another_layer_is_ignored_as_v1_does(caplog):
    with caplog.at_level(logging.WARNING, logger="rloss"):
        layer = loss_layer("softmaxloss_param { ignore_label: 255 }", "EUCLIDEAN_LOSS")
    assert not layer.HasField("softmaxloss_param") and not layer.HasField("loss_param")
    assert "softmaxloss_param is ignored on a EuclideanLoss layer" in caplog.text


DATA = 'layers {{ name: "data" type: IMAGE_SEG_DATA top: "data" top: "label" image_data_param {{ {settings} }} }}'


def data_param(settings: str):
    return v1_net(DATA.format(settings=settings)).layer[0].image_data_param


@pytest.mark.parametrize(("settings", "label_type"), [
    ("has_label: false", "NONE"),
    ("has_label: false label_type: NONE", "NONE"),
    ("has_label: true label_type: PIXEL", "PIXEL"),
    ("has_label: true", "IMAGE"),  # says only that there are labels: label_type (default IMAGE) tells which
])
def test_has_label_becomes_label_type(settings, label_type):
    param = data_param(settings)
    assert not param.HasField("has_label")
    assert caffe_pb2.ImageDataParameter.LabelType.Name(param.label_type) == label_type


@pytest.mark.parametrize("settings", ["has_label: false label_type: PIXEL", "has_label: true label_type: NONE"])
def test_has_label_contradicting_label_type_is_an_error(settings):
    with pytest.raises(ProtoError, match=r"layer #0 \('data'\): .* which disagree; .* keep only label_type"):
        data_param(settings)


def test_strict_dim_is_dropped():
    with_it = v1_net('layers { name: "fc" type: CONVOLUTION strict_dim: false blobs_lr: 1 }')
    without = v1_net('layers { name: "fc" type: CONVOLUTION blobs_lr: 1 }')
    assert with_it == without and len(with_it.layer) == 1


# ---- the published DeepLab-LargeFOV files ---------------------------------------------------------

def v1_file(name: str, folder: Path) -> Path:
    """`name`.prototxt from RLOSS_DEEPLAB_V1_DIR (a folder, or a git directory read at V1_COMMIT) in `folder`."""
    if (V1_DIR / f"{name}.prototxt").is_file():
        return V1_DIR / f"{name}.prototxt"
    if not (V1_DIR / "objects").is_dir():
        pytest.skip(f"{V1_DIR} holds neither {name}.prototxt nor a git repository: the DeepLab v1 files are "
                    "absent (set RLOSS_DEEPLAB_V1_DIR)")
    git = shutil.which("git")
    if git is None:
        pytest.skip(f"reading the DeepLab v1 files from the git directory {V1_DIR} needs git, which is absent")
    shown = subprocess.run([git, f"--git-dir={V1_DIR}", "show", f"{V1_COMMIT}:{V1_FOLDER}/{name}.prototxt"],
                           capture_output=True)
    if shown.returncode:
        pytest.skip(f"{V1_DIR} lacks {V1_FOLDER}/{name}.prototxt at {V1_COMMIT[:7]}: {shown.stderr.decode().strip()}")
    path = folder / f"{name}.prototxt"
    path.write_bytes(shown.stdout)
    return path


def small_fed_net(path: Path, phase: int) -> Net:
    """The file's net for `phase`, its data layer fed (batch 1, CROP x CROP); without MatWrite, a sink
    that writes .mat features and is not one of our layers (inference drops it too)."""
    net_param = read_net(path, phase, values=_values("DeepLab-LargeFOV"))
    for layer in net_param.layer:
        if layer.type == "ImageSegData":
            layer.transform_param.crop_size = CROP
    net_param = data_layers_to_inputs(net_param, batch_size=1)
    kept = [layer for layer in net_param.layer if layer.type != "MatWrite"]
    del net_param.layer[:]
    net_param.layer.extend(kept)
    return Net(net_param, phase, source=str(path))


def randomize(net: Net, seed: int) -> None:
    """He-scaled weights (the files leave most fillers at constant 0, which would make every score 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blobs in net.params.values():
            weight, bias = blobs
            fan_in = weight[0].numel()
            weight.copy_(torch.randn(weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)


def synthetic_batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 21, (1, 1, CROP, CROP), generator=generator)
    label[0, 0, :16] = 255  # the top rows (of the shrunk label too) are ignored
    return {"data": torch.randn(1, 3, CROP, CROP, generator=generator), "label": label.float()}


def softmax_loss(scores: np.ndarray, label: np.ndarray, ignore: int) -> float:
    """-mean log softmax at the label over the pixels not ignored (v1's normalization)."""
    shifted = scores - scores.max(axis=0)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=0))
    valid = label != ignore
    rows, cols = np.nonzero(valid)
    return float(-log_prob[label[valid].astype(int), rows, cols].mean())


def check_atrous_layers(net: Net) -> None:
    for layer in net.layers:
        if layer.type_name == "Convolution":
            expected = ATROUS.get(layer.name, 1)
            assert list(layer.param.convolution_param.dilation or [1]) == [expected], layer.name
    assert net.blob_shapes["fc6"][2:] == (SCORES, SCORES)  # pad 12 with hole 12 keeps the size


def test_largefov_train_net_builds_and_runs_forward(tmp_path):
    net = small_fed_net(v1_file("train", tmp_path), caffe_pb2.TRAIN)
    check_atrous_layers(net)
    assert net.inputs == {"data": (1, 3, CROP, CROP), "label": (1, 1, CROP, CROP)}
    assert net.blob_shapes["fc8_pascal_scribble"] == (1, 21, SCORES, SCORES)
    assert net.blob_shapes["label_shrink"] == (1, 1, SCORES, SCORES)
    (loss_layer,) = [layer for layer in net.layers if layer.type_name == "SoftmaxWithLoss"]
    assert loss_layer.param.loss_param.ignore_label == 255
    randomize(net, seed=1)
    with torch.no_grad():
        loss = net.forward(synthetic_batch(seed=2))
    scores = net.blob_data["fc8_pascal_scribble"][0].double().numpy()
    label = net.blob_data["label_shrink"][0, 0].numpy()
    assert (label == 255).any() and (label != 255).any()
    assert abs(float(loss) - softmax_loss(scores, label, 255)) < 1e-4 * max(1.0, float(loss))
    assert net.blob_data["accuracy"].shape == (1, 1, 1, 3)


def test_largefov_test_net_builds_and_runs_forward(tmp_path):
    net = small_fed_net(v1_file("test", tmp_path), caffe_pb2.TEST)
    check_atrous_layers(net)
    (data_layer,) = [layer for layer in read_net(v1_file("test", tmp_path), caffe_pb2.TEST,
                                                   values=_values("DeepLab-LargeFOV")).layer
                     if layer.type == "ImageSegData"]
    assert data_layer.image_data_param.label_type == caffe_pb2.ImageDataParameter.NONE  # has_label: false
    randomize(net, seed=3)
    with torch.no_grad():
        net.forward(synthetic_batch(seed=4))
    assert net.blob_data["fc8_interp"].shape == (1, 21, CROP, CROP)  # zoom_factor 8: (9 - 1) * 8 + 1
    (fc6,) = [layer for layer in net.layers if layer.name == "fc6"]
    weight, bias = (blob.detach().double().numpy() for blob in fc6.blobs)
    expected = np.maximum(dilated_conv(net.blob_data["pool5a"][0].double().numpy(), weight, bias, 12, 12), 0)
    assert relative_error(net.blob_data["fc6"][0], expected) < 1e-4  # relu6 and (TEST) drop6 are in place
