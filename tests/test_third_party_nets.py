"""Real third-party Caffe nets build and run in rloss, unchanged: BVLC Caffe's model zoo and examples, the
FCN nets of shelhamer/fcn.berkeleyvision.org (their NetSpec scripts, Python data layers and solver), and
SegNet's (alexgkendall/SegNet-Tutorial, written for its own Caffe fork).

The repositories are read where a clone or bare git dir of each is (the environment variable of its
`Mirror`, else the /work/.mirror snapshot); a test of a repository that is absent skips, saying so (CI
has none). Nothing of them is kept in this repository: each test writes the files it needs into its
tmp_path. Data layers (LMDB, HDF5 and image lists, FCN's Python layers) become Input layers fed with
synthetic blobs of the shapes the real layers give, except where the real layer runs on synthetic files.

The pycaffe-style tests at the end (an FCN-32s-like NetSpec script cropped by coord_map, Transformer and
Classifier on a small deploy net) need no repository.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from PIL import Image

import rloss.caffe.coord_map
from rloss import caffe
from rloss.caffe import layers as L
from rloss.caffe import params as P
from rloss.net import Net
from rloss.proto import caffe_pb2
from rloss.proto.text import read_net
from rloss.wiring import data_layers_to_inputs

Shape = tuple[int, ...]
TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


# ---- where the repositories are --------------------------------------------------------------------

class Mirror:
    """One public repository, read from a bare git dir (`git show HEAD:path`) or from a folder of its
    files: the path in the environment variable `variable`, else its /work/.mirror snapshot."""

    def __init__(self, repo: str, variable: str):
        self.repo = repo
        self.variable = variable
        self.root = Path(os.environ.get(variable) or f"/work/.mirror/{repo.replace('/', '+')}/repo")

    @property
    def is_git_dir(self) -> bool:
        return (self.root / "HEAD").is_file() and (self.root / "objects").is_dir()

    def require(self) -> None:
        """Skip the calling test unless the repository is readable here."""
        if not self.root.is_dir():
            pytest.skip(f"{self.repo} is not here: {self.root} is absent (set {self.variable} to a clone "
                        "or a bare git dir of it)")
        if self.is_git_dir and shutil.which("git") is None:
            pytest.skip(f"{self.repo} is a git dir at {self.root}, and there is no git to read it")

    def text(self, path: str) -> str:
        self.require()
        if not self.is_git_dir:
            return (self.root / path).read_text()
        done = subprocess.run(["git", "--git-dir", str(self.root), "show", f"HEAD:{path}"],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.fail(f"{self.repo}: cannot read {path} from {self.root}: {done.stderr.strip()}")
        return done.stdout

    def copy(self, path: str, folder: Path) -> Path:
        """The file written under `folder` at its path in the repository (so that paths relative to
        it, and modules beside it, are found as in a clone)."""
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.text(path))
        return target


BVLC = Mirror("BVLC/caffe", "RLOSS_MIRROR_BVLC_CAFFE")
FCN = Mirror("shelhamer/fcn.berkeleyvision.org", "RLOSS_MIRROR_FCN")
SEGNET = Mirror("alexgkendall/SegNet-Tutorial", "RLOSS_MIRROR_SEGNET")


@pytest.fixture
def caffe_import(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Third-party code runs unchanged: its `import caffe` (and `caffe.coord_map`) gives rloss.caffe.
    The modules it imports from tmp_path (Python layers) are forgotten after the test."""
    monkeypatch.setitem(sys.modules, "caffe", caffe)
    monkeypatch.setitem(sys.modules, "caffe.coord_map", rloss.caffe.coord_map)
    yield
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").is_relative_to(tmp_path):
            del sys.modules[name]


# ---- feeding and checking a built net ---------------------------------------------------------------

def inputs_instead_of(net_param, shapes: Mapping[str, Shape]):
    """A copy of `net_param` whose data layers (no bottoms, every top in `shapes`) are Input layers of
    those shapes, in their place, so the net runs on fed blobs (data in LMDB or HDF5 files, or read by
    Python layers, has shapes only the data knows)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:]
    for layer in net_param.layer:
        if layer.bottom or not layer.top or not all(top in shapes for top in layer.top):
            out.layer.add().CopyFrom(layer)
            continue
        fed = out.layer.add(name=layer.name, type="Input")
        fed.top.extend(layer.top)
        for top in layer.top:
            fed.input_param.shape.add().dim.extend(shapes[top])
    return out


def synthetic_feeds(net: Net, labels: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Every fed blob: uniform [0, 1) data, or class labels below `labels[name]` for the label tops."""
    feeds = {}
    for name in net.feedable:
        shape = net.blob_shapes[name]
        if name in labels:
            feeds[name] = torch.randint(0, labels[name], shape).float()
        else:
            feeds[name] = torch.rand(shape)
    return feeds


def randomize_weights(net: Net) -> None:
    """He-normal weights in every learnable blob of two or more axes, so that a backward from the loss
    reaches the first layer (nets without fillers, as FCN's, start at zero)."""
    with torch.no_grad():
        for entry in net.learnable:
            blob = entry.tensor
            if blob.dim() >= 2:
                blob.normal_(0.0, math.sqrt(2.0 / (blob.numel() // blob.shape[0])))


def check_backward(net: Net) -> None:
    """Every blob the solver updates has a finite gradient of its shape, and the first layer's is not
    all zero: the loss's gradient ran through the whole net."""
    trained = [entry for entry in net.learnable if entry.lr_mult]
    for entry in trained:
        grad = entry.tensor.grad
        assert grad is not None and grad.shape == entry.tensor.shape, entry.owner
        assert torch.isfinite(grad).all(), entry.owner
    assert trained[0].tensor.grad.abs().max() > 0, trained[0].owner


@dataclass(frozen=True)
class NetCase:
    """One phase of a real net: built with its data layers fed (`feeds`: top -> shape), it must have
    Caffe's outputs (unconsumed tops, sorted) and the blob shapes the net's arithmetic implies; `run`
    is "build", "forward" or "backward" (a forward first)."""

    mirror: Mirror
    path: str
    phase: int
    feeds: Mapping[str, Shape]
    outputs: tuple[str, ...]
    shapes: Mapping[str, Shape]
    run: str = "forward"
    labels: Mapping[str, int] = field(default_factory=dict)  # label top -> its number of classes
    stages: tuple[str, ...] = ()
    parameters: int | None = None  # the learnable blobs' element count, where worked out by hand
    marks: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.path}:{'TRAIN' if self.phase == TRAIN else 'TEST'}"

    def build(self, folder: Path) -> Net:
        path = self.mirror.copy(self.path, folder)
        net_param = read_net(path, self.phase, stages=self.stages)
        if any(layer.type == "ImageData" for layer in net_param.layer):
            net_param = data_layers_to_inputs(net_param, batch_size=1)  # ImageData's own crop shapes
        return Net(inputs_instead_of(net_param, self.feeds), self.phase, source=str(path))


def run_case(case: NetCase, folder: Path) -> None:
    net = case.build(folder)
    assert net.outputs == list(case.outputs)
    for blob, shape in case.shapes.items():
        assert net.blob_shapes[blob] == shape, blob
    if case.parameters is not None:
        assert sum(entry.tensor.numel() for entry in net.learnable) == case.parameters
    if case.run == "build":
        return
    torch.manual_seed(0)
    feeds = synthetic_feeds(net, case.labels)
    if case.run == "backward":
        randomize_weights(net)
        loss = net.forward(feeds)
        loss.backward()
        check_backward(net)
    else:
        with torch.no_grad():
            loss = net.forward(feeds)
    assert torch.isfinite(loss)
    for blob, shape in case.shapes.items():
        assert tuple(net.blob_data[blob].shape) == shape, blob


def params_of(cases: list[NetCase]) -> list:
    return [pytest.param(case, id=case.id, marks=case.marks) for case in cases]


# ---- BVLC Caffe: model zoo and examples ----------------------------------------------------------------

def imagenet(path: str, phase: int, side: int, shapes: Mapping[str, Shape], outputs: tuple[str, ...],
             run: str = "forward", parameters: int | None = None) -> NetCase:
    """An ImageNet classifier's train_val phase at batch 1 (its Data layer gives side x side crops)."""
    return NetCase(BVLC, path, phase, {"data": (1, 3, side, side), "label": (1,)}, outputs, shapes, run,
                   labels={"label": 1000}, parameters=parameters)


# AlexNet/CaffeNet at 227: conv1 11/4 -> 55, pool 3/2 -> 27, conv2 (pad 2) -> 27, pool -> 13, pool5 -> 6
ALEXNET_SHAPES = {"conv1": (1, 96, 55, 55), "pool2": (1, 256, 13, 13), "pool5": (1, 256, 6, 6),
                  "fc8": (1, 1000)}
# weights and biases, conv2, conv4 and conv5 in two groups: 34944 + 307456 + 885120 + 663936 + 442624
# + 37752832 + 16781312 + 4097000
ALEXNET_PARAMETERS = 60965224
# GoogLeNet at 224: conv1 7/2 -> 112, pools 3/2 (ceil) -> 56, 28, 14, 7; the side heads pool 5/3 on 14 -> 4
GOOGLENET_SHAPES = {"inception_3a/output": (1, 256, 28, 28), "inception_4e/output": (1, 832, 14, 14),
                    "inception_5b/output": (1, 1024, 7, 7), "pool5/7x7_s1": (1, 1024, 1, 1),
                    "loss1/conv": (1, 128, 4, 4), "loss1/classifier": (1, 1000), "loss3/classifier": (1, 1000)}
GOOGLENET_TEST_OUTPUTS = tuple(f"loss{k}/{name}" for k in (1, 2, 3) for name in (f"loss{k}", "top-1", "top-5"))
LENET_SHAPES = {"conv1": (2, 20, 24, 24), "pool2": (2, 50, 4, 4), "ip2": (2, 10)}
# cifar10: conv 5 (pad 2) keeps 32, pools 3/2 (ceil) -> 16, 8, 4
CIFAR_SHAPES = {"pool1": (2, 32, 16, 16), "pool3": (2, 64, 4, 4)}
MNIST = {"data": (2, 1, 28, 28), "label": (2,)}
CIFAR = {"data": (2, 3, 32, 32), "label": (2,)}
HDF5 = {"data": (3, 4), "label": (3,)}

BVLC_CASES = [
    imagenet("models/bvlc_alexnet/train_val.prototxt", TRAIN, 227, ALEXNET_SHAPES, ("loss",), "backward",
             ALEXNET_PARAMETERS),
    imagenet("models/bvlc_alexnet/train_val.prototxt", TEST, 227, ALEXNET_SHAPES, ("accuracy", "loss"),
             parameters=ALEXNET_PARAMETERS),
    imagenet("models/bvlc_reference_caffenet/train_val.prototxt", TRAIN, 227, ALEXNET_SHAPES, ("loss",),
             parameters=ALEXNET_PARAMETERS),
    imagenet("models/bvlc_reference_caffenet/train_val.prototxt", TEST, 227, ALEXNET_SHAPES, ("accuracy", "loss"),
             parameters=ALEXNET_PARAMETERS),
    imagenet("models/bvlc_googlenet/train_val.prototxt", TRAIN, 224, GOOGLENET_SHAPES,
             ("loss1/loss1", "loss2/loss2", "loss3/loss3"), "backward"),
    imagenet("models/bvlc_googlenet/train_val.prototxt", TEST, 224, GOOGLENET_SHAPES, GOOGLENET_TEST_OUTPUTS),
    # ImageData with crop 227 (fed by rloss.wiring at batch 1), 20 style classes
    NetCase(BVLC, "models/finetune_flickr_style/train_val.prototxt", TRAIN, {}, ("loss",),
            {"data": (1, 3, 227, 227), "pool5": (1, 256, 6, 6), "fc8_flickr": (1, 20)}, labels={"label": 20}),
    NetCase(BVLC, "models/finetune_flickr_style/train_val.prototxt", TEST, {}, ("accuracy", "loss"),
            {"fc8_flickr": (1, 20)}, labels={"label": 20}),
    NetCase(BVLC, "examples/feature_extraction/imagenet_val.prototxt", TEST, {}, ("accuracy", "loss"),
            {"data": (1, 3, 227, 227), "prob": (1, 1000)}, labels={"label": 1000}),
    # WindowData (R-CNN windows; no rloss layer) fed instead; the loss's top is anonymous, so no output
    NetCase(BVLC, "examples/finetune_pascal_detection/pascal_finetune_trainval_test.prototxt", TRAIN,
            {"data": (1, 3, 227, 227), "label": (1,)}, (), {"fc8_pascal": (1, 21)}, labels={"label": 21}),
    NetCase(BVLC, "examples/finetune_pascal_detection/pascal_finetune_trainval_test.prototxt", TEST,
            {"data": (1, 3, 227, 227), "label": (1,)}, ("accuracy",), {"fc8_pascal": (1, 21)}, labels={"label": 21}),
    NetCase(BVLC, "examples/mnist/lenet_train_test.prototxt", TRAIN, MNIST, ("loss",), LENET_SHAPES, "backward",
            labels={"label": 10}),
    NetCase(BVLC, "examples/mnist/lenet_train_test.prototxt", TEST, MNIST, ("accuracy", "loss"), LENET_SHAPES,
            labels={"label": 10}),
    NetCase(BVLC, "examples/mnist/mnist_autoencoder.prototxt", TRAIN, {"data": (2, 1, 28, 28)},
            ("cross_entropy_loss", "l2_error"), {"encode4": (2, 30), "decode1": (2, 784)}, "backward"),
    NetCase(BVLC, "examples/mnist/mnist_autoencoder.prototxt", TEST, {"data": (2, 1, 28, 28)},
            ("cross_entropy_loss", "l2_error"), {"encode4": (2, 30), "decode1": (2, 784)}, stages=("test-on-test",)),
    NetCase(BVLC, "examples/siamese/mnist_siamese_train_test.prototxt", TRAIN,
            {"pair_data": (2, 2, 28, 28), "sim": (2,)}, ("loss",), {"feat": (2, 2), "feat_p": (2, 2)}, "backward",
            labels={"sim": 2}),
    NetCase(BVLC, "examples/siamese/mnist_siamese_train_test.prototxt", TEST,
            {"pair_data": (2, 2, 28, 28), "sim": (2,)}, ("loss",), {"feat": (2, 2), "feat_p": (2, 2)},
            labels={"sim": 2}),
    *[NetCase(BVLC, f"examples/cifar10/{name}.prototxt", phase, CIFAR, outputs,
              {**CIFAR_SHAPES, "ip2" if "quick" in name else "ip1": (2, 10)},
              "backward" if phase == TRAIN else "forward", labels={"label": 10})
      for name in ("cifar10_quick_train_test", "cifar10_full_train_test", "cifar10_full_sigmoid_train_test",
                   "cifar10_full_sigmoid_train_test_bn")
      for phase, outputs in ((TRAIN, ("loss",)), (TEST, ("accuracy", "loss")))],
    *[NetCase(BVLC, f"examples/hdf5_classification/{name}.prototxt", phase, HDF5, outputs, {}, run,
              labels={"label": 2})
      for name, phase, outputs, run in (
          ("train_val", TRAIN, ("loss",), "backward"), ("train_val", TEST, ("accuracy", "loss"), "forward"),
          ("nonlinear_train_val", TRAIN, ("loss",), "backward"),
          ("nonlinear_train_val", TEST, ("accuracy", "loss"), "forward"),
          ("nonlinear_auto_train", TRAIN, ("accuracy", "loss"), "backward"),
          ("nonlinear_auto_test", TEST, ("accuracy", "loss"), "forward"))],
]


@pytest.mark.parametrize("case", params_of(BVLC_CASES))
def test_bvlc_net_builds_and_runs(case: NetCase, tmp_path: Path) -> None:
    run_case(case, tmp_path)


@dataclass(frozen=True)
class DeployCase:
    """A deploy net as pycaffe runs it: input reshaped to one image, forward, the output's shape."""

    path: str
    side: int
    output: str
    output_shape: Shape
    softmax: bool = True


DEPLOY_CASES = [
    DeployCase("models/bvlc_alexnet/deploy.prototxt", 227, "prob", (1, 1000)),
    DeployCase("models/bvlc_reference_caffenet/deploy.prototxt", 227, "prob", (1, 1000)),
    DeployCase("models/bvlc_googlenet/deploy.prototxt", 224, "prob", (1, 1000)),
    DeployCase("models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt", 227, "fc-rcnn", (1, 200), softmax=False),
    DeployCase("models/finetune_flickr_style/deploy.prototxt", 227, "prob", (1, 20)),
    # fc6-8 as convolutions, at 259 (it declares 451): conv1 63 -> pools 31, 15, 7, then fc6 (6 x 6) -> 2 x 2
    DeployCase("examples/net_surgery/bvlc_caffenet_full_conv.prototxt", 259, "prob", (1, 1000, 2, 2)),
    DeployCase("examples/net_surgery/conv.prototxt", 100, "conv", (1, 3, 96, 96), softmax=False),
    DeployCase("examples/mnist/lenet.prototxt", 28, "prob", (1, 10)),
    DeployCase("examples/cifar10/cifar10_quick.prototxt", 32, "prob", (1, 10)),
    DeployCase("examples/cifar10/cifar10_full.prototxt", 32, "prob", (1, 10)),
    DeployCase("examples/siamese/mnist_siamese.prototxt", 28, "feat", (1, 2), softmax=False),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.path) for case in DEPLOY_CASES])
def test_bvlc_deploy_net_runs_one_image_pycaffe_style(case: DeployCase, tmp_path: Path) -> None:
    net = caffe.Net(str(BVLC.copy(case.path, tmp_path)), caffe.TEST)
    data = net.inputs[0]
    channels = net.blobs[data].shape[1]
    net.blobs[data].reshape(1, channels, case.side, case.side)
    net.blobs[data].data[...] = np.random.RandomState(0).rand(1, channels, case.side, case.side)
    out = net.forward()
    assert out[case.output].shape == case.output_shape
    assert np.isfinite(out[case.output]).all()
    if case.softmax:
        np.testing.assert_allclose(out[case.output].sum(axis=1), 1.0, rtol=1e-5)


def test_caffenet_classifies_with_pycaffe_transformer_and_classifier(tmp_path: Path) -> None:
    """The 00-classification notebook's steps on CaffeNet's deploy net (no weights: the scores are
    uniform, so the checks are the shapes and what oversampling averages)."""
    deploy = str(BVLC.copy("models/bvlc_reference_caffenet/deploy.prototxt", tmp_path))
    mean = np.array([104.0, 117.0, 123.0])
    image = np.random.RandomState(1).rand(256, 300, 3).astype(np.float32)
    net = caffe.Net(deploy, caffe.TEST)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_mean("data", mean)
    transformer.set_raw_scale("data", 255)
    transformer.set_channel_swap("data", (2, 1, 0))
    net.blobs["data"].reshape(1, 3, 227, 227)
    net.blobs["data"].data[...] = transformer.preprocess("data", image)
    assert net.forward()["prob"].shape == (1, 1000)
    classifier = caffe.Classifier(deploy, None, image_dims=(256, 256), mean=mean, raw_scale=255,
                                  channel_swap=(2, 1, 0))
    predictions = classifier.predict([image])  # ten crops in one batch of the deploy net's 10
    assert predictions.shape == (1, 1000)
    np.testing.assert_allclose(predictions, 1.0 / 1000, rtol=1e-5)


def test_pycaffe_python_loss_layer_of_the_linreg_example(tmp_path: Path, caffe_import: None) -> None:
    """examples/pycaffe/linreg.prototxt with its EuclideanLossLayer (examples/pycaffe/layers/pyloss.py,
    found beside the net): the loss and the diffs it writes are the Euclidean loss's."""
    net_file = BVLC.copy("examples/pycaffe/linreg.prototxt", tmp_path)
    (net_file.parent / "pyloss.py").write_text(BVLC.text("examples/pycaffe/layers/pyloss.py"))
    net = caffe.Net(str(net_file), caffe.TRAIN)
    loss = float(net.forward()["loss"].flat[0])
    ipx, ipy = net.blobs["ipx"].data.astype(np.float64), net.blobs["ipy"].data.astype(np.float64)
    assert loss == pytest.approx(((ipx - ipy) ** 2).sum() / ipx.shape[0] / 2, rel=1e-5)
    net.backward()
    np.testing.assert_allclose(net.blobs["ipx"].diff, (ipx - ipy) / ipx.shape[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(net.blobs["ipy"].diff, (ipy - ipx) / ipx.shape[0], rtol=1e-5, atol=1e-7)
    assert np.abs(net.params["ipx"][0].diff).max() > 0


# ---- FCN (shelhamer/fcn.berkeleyvision.org) ------------------------------------------------------------

FCN_SIZE = (8, 12)  # any size: conv1's pad of 100 keeps fc6 valid, and the Crops give it back


def fcn_case(folder: str, name: str, phase: int, tops: Mapping[str, int], scores: Mapping[str, tuple[str, int]],
             run: str, losses: tuple[str, ...] = ("loss",), marks: tuple = (),
             parameters: int | None = None) -> NetCase:
    """An FCN phase with its Python data layer fed: `tops` are its tops' channels, `scores` each loss's
    score blob and its label top's classes; a score is cropped to the input's size."""
    height, width = FCN_SIZE
    feeds = {top: (1, channels, height, width) for top, channels in tops.items()}
    shapes = {score: (1, classes, height, width) for score, (_, classes) in scores.items()}
    labels = {label: classes for label, classes in scores.values()}
    return NetCase(FCN, f"{folder}/{name}", phase, feeds, losses, shapes, run, labels, marks=marks,
                   parameters=parameters)


VOC = {"data": 3, "label": 1}
VOC_SCORE = {"score": ("label", 21)}
# VGG-16's convolutions 14714688, fc6 (7 x 7 x 512 -> 4096) 102764544, fc7 16781312, score_fr 86037, the
# bias-free 64 x 64 upscore 21 x 21 x 64 x 64
FCN32S_PARAMETERS = 14714688 + 102764544 + 16781312 + 86037 + 1806336
# A VGG-16 FCN's forward takes a second on a shared core, its backward several: their train nets run
# forward (fcn8s's layers in its deploy net), FCN-AlexNet's (the same layer types) trains in its solver
# test, the val nets (the train nets' layers) are built. Beside fcn32s and fcn8s, the VGG-16 FCNs
# (fcn16s, fcn8s-atonce, PASCAL-Context, SIFT Flow, NYUDv2) are marked slow.
SLOW = (pytest.mark.slow,)
FCN_CASES = [
    fcn_case("voc-fcn32s", "train.prototxt", TRAIN, VOC, VOC_SCORE, "forward", parameters=FCN32S_PARAMETERS),
    fcn_case("voc-fcn32s", "val.prototxt", TEST, VOC, VOC_SCORE, "build", parameters=FCN32S_PARAMETERS),
    fcn_case("voc-fcn16s", "train.prototxt", TRAIN, VOC, VOC_SCORE, "forward", marks=SLOW),
    fcn_case("voc-fcn16s", "val.prototxt", TEST, VOC, VOC_SCORE, "build", marks=SLOW),
    fcn_case("voc-fcn8s", "train.prototxt", TRAIN, VOC, VOC_SCORE, "build"),  # deploy.prototxt runs its layers
    fcn_case("voc-fcn8s", "val.prototxt", TEST, VOC, VOC_SCORE, "build"),
    fcn_case("voc-fcn8s-atonce", "train.prototxt", TRAIN, VOC, VOC_SCORE, "forward", marks=SLOW),
    fcn_case("voc-fcn8s-atonce", "val.prototxt", TEST, VOC, VOC_SCORE, "build", marks=SLOW),
    fcn_case("voc-fcn-alexnet", "train.prototxt", TRAIN, VOC, VOC_SCORE, "forward"),  # and trains below
    fcn_case("voc-fcn-alexnet", "val.prototxt", TEST, VOC, VOC_SCORE, "forward"),
    *[fcn_case(f"pascalcontext-fcn{k}", name, phase, VOC, {"score": ("label", 60)}, run, marks=SLOW)
      for k in ("32s", "16s", "8s")
      for name, phase, run in (("train.prototxt", TRAIN, "forward"), ("val.prototxt", TEST, "build"))],
    *[fcn_case(f"siftflow-fcn{k}", name, phase, {"data": 3, "sem": 1, "geo": 1},
               {"score_sem": ("sem", 33), "score_geo": ("geo", 3)}, run, ("loss", "loss_geo"), SLOW)
      for k in ("32s", "16s", "8s")
      for name, phase, run in (("trainval.prototxt", TRAIN, "forward"), ("test.prototxt", TEST, "build"))],
    *[fcn_case(f"nyud-fcn32s-{kind}", name, phase, {**tops, "label": 1}, {"score": ("label", 40)}, run, marks=SLOW)
      for kind, tops in (("color", {"data": 3}), ("hha", {"data": 3}), ("color-d", {"color": 3, "depth": 1}),
                         ("color-hha", {"color": 3, "hha": 3}))
      for name, phase, run in (("trainval.prototxt", TRAIN, "forward"), ("test.prototxt", TEST, "build"))],
]


@pytest.mark.parametrize("case", params_of(FCN_CASES))
def test_fcn_net_builds_and_runs(case: NetCase, tmp_path: Path) -> None:
    run_case(case, tmp_path)


def test_fcn8s_deploy_net_scores_an_image_of_any_size(tmp_path: Path) -> None:
    net = caffe.Net(str(FCN.copy("voc-fcn8s/deploy.prototxt", tmp_path)), caffe.TEST)
    net.blobs["data"].reshape(1, 3, *FCN_SIZE)
    net.blobs["data"].data[...] = np.random.RandomState(0).rand(1, 3, *FCN_SIZE)
    assert net.forward()["score"].shape == (1, 21, *FCN_SIZE)


FCN_NET_SCRIPTS = ["voc-fcn32s", "voc-fcn16s", "voc-fcn8s", "voc-fcn8s-atonce", "voc-fcn-alexnet",
                   "pascalcontext-fcn32s", "pascalcontext-fcn16s", "pascalcontext-fcn8s", "siftflow-fcn32s",
                   "siftflow-fcn16s", "siftflow-fcn8s", "nyud-fcn32s-color", "nyud-fcn32s-hha",
                   "nyud-fcn32s-color-d", "nyud-fcn32s-color-hha"]


def without_python_param_order(net_param):
    """The net with each Python layer's param_str (a dict's repr) as its sorted items: FCN's files were
    written by Python 2, whose dicts list their keys in another order."""
    for layer in net_param.layer:
        if layer.type == "Python":
            items = sorted(ast.literal_eval(layer.python_param.param_str).items())
            layer.python_param.param_str = repr(items)
    return net_param


@pytest.mark.parametrize("folder", FCN_NET_SCRIPTS)
def test_fcn_net_script_writes_the_repositorys_prototxt(folder: str, tmp_path: Path, caffe_import: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each net.py (NetSpec, L, P and coord_map.crop) run on rloss.caffe writes its folder's prototxt
    files exactly as committed (made with pycaffe)."""
    script = FCN.copy(f"{folder}/net.py", tmp_path)
    spec = importlib.util.spec_from_file_location(f"fcn_net_{folder.replace('-', '_')}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(script.parent)
    module.make_net()
    written = sorted(script.parent.glob("*.prototxt"))
    assert len(written) == 2
    for path in written:
        ours = text_format.Parse(path.read_text(), caffe_pb2.NetParameter())
        theirs = text_format.Parse(FCN.text(f"{folder}/{path.name}"), caffe_pb2.NetParameter())
        assert without_python_param_order(ours) == without_python_param_order(theirs), path.name


# FCN's PASCAL data layers on synthetic files: VOCSegDataLayer reads VOC2011/{ImageSets/Segmentation/
# <split>.txt, JPEGImages/<id>.jpg, SegmentationClass/<id>.png}, SBDDSegDataLayer dataset/{<split>.txt,
# img/<id>.jpg, cls/<id>.mat (GTcls.Segmentation)}; the nets name them ../data/... from the net folder.
IMAGE_SIZE = (22, 30)


def write_pascal_sample(image_file: Path, rng: np.random.RandomState) -> np.ndarray:
    """A random JPEG image; returns a label image of its size (classes 0-20 and ignored 255 pixels)."""
    image_file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.randint(0, 256, (*IMAGE_SIZE, 3)).astype(np.uint8)).save(image_file)
    label = rng.randint(0, 21, IMAGE_SIZE).astype(np.uint8)
    label[0, :] = 255
    return label


def write_voc(root: Path, split: str, ids: list[str], rng: np.random.RandomState) -> None:
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "SegmentationClass").mkdir()
    for name in ids:
        label = write_pascal_sample(root / "JPEGImages" / f"{name}.jpg", rng)
        Image.fromarray(label).save(root / "SegmentationClass" / f"{name}.png")


def write_sbdd(root: Path, split: str, ids: list[str], rng: np.random.RandomState) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    root.mkdir(parents=True)
    (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "cls").mkdir()
    for name in ids:
        label = write_pascal_sample(root / "img" / f"{name}.jpg", rng)
        scipy_io.savemat(str(root / "cls" / f"{name}.mat"), {"GTcls": {"Segmentation": label}})


def bilinear_filter(size: int) -> np.ndarray:
    """FCN's interpolation kernel (surgery.upsample_filt), for its upscore layers."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    grid = np.ogrid[:size, :size]
    return (1 - abs(grid[0] - center) / factor) * (1 - abs(grid[1] - center) / factor)


def test_fcn_alexnet_solves_and_scores_with_its_own_python_data_layers(
        tmp_path: Path, caffe_import: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """voc-fcn-alexnet as its solve.py runs it (Python 2's surgery.py and score.py redone here): the
    solver file's nets read synthetic SBDD/VOC files through FCN's voc_layers.py, the upscore layers get
    bilinear kernels, one SGD step trains, and the test net, sharing the weights, scores whole images."""
    monkeypatch.setenv("RLOSS_SKIP_MEMORY_CHECK", "1")  # its trial iterations would take longer than the test
    rng = np.random.RandomState(0)
    write_sbdd(tmp_path / "data" / "sbdd" / "dataset", "train", ["a", "b"], rng)
    write_voc(tmp_path / "data" / "pascal" / "VOC2011", "seg11valid", ["c", "d"], rng)
    for name in ("train.prototxt", "val.prototxt"):
        FCN.copy(f"voc-fcn-alexnet/{name}", tmp_path)
    solver_text = FCN.text("voc-fcn-alexnet/solver.prototxt")
    assert "iter_size: 20" in solver_text
    (tmp_path / "voc-fcn-alexnet" / "solver.prototxt").write_text(solver_text.replace("iter_size: 20", "iter_size: 1"))
    FCN.copy("voc_layers.py", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # FCN's README: the layer modules on the PYTHONPATH
    monkeypatch.chdir(tmp_path / "voc-fcn-alexnet")

    solver = caffe.SGDSolver("solver.prototxt")
    upscore = [name for name in solver.net.params if "up" in name]
    assert upscore == ["upscore"]
    for name in upscore:
        weights = solver.net.params[name][0].data
        channels, _, size, _ = weights.shape
        weights[range(channels), range(channels), :, :] = bilinear_filter(size)
    solver.step(1)
    assert solver.iter == 1
    assert solver.net.blobs["data"].shape == (1, 3, *IMAGE_SIZE)
    assert np.abs(solver.net.params["score_fr"][1].data).max() > 0  # zero-initialized; the step moved it

    test_net = solver.test_nets[0]
    test_net.share_with(solver.net)
    histogram = np.zeros((21, 21))
    for _ in range(2):
        test_net.forward()
        assert test_net.blobs["score"].shape == (1, 21, *IMAGE_SIZE)
        truth = test_net.blobs["label"].data[0, 0].astype(int).ravel()
        guess = test_net.blobs["score"].data[0].argmax(axis=0).ravel()
        valid = truth < 21
        np.add.at(histogram, (truth[valid], guess[valid]), 1)
        assert np.isfinite(test_net.blobs["loss"].data).all()
    assert histogram.sum() == 2 * (IMAGE_SIZE[0] - 1) * IMAGE_SIZE[1]  # every pixel but the 255 row


# ---- SegNet (alexgkendall/SegNet-Tutorial, for the caffe-segnet fork) -----------------------------------

# SegNet's layers (BN, Upsample by the pooling masks, DenseImageData, the class-weighted loss) are
# rloss.layers.segnet's. SegNet-Basic's Upsamples scale by 2 (pad_out_h once), so it runs small: at
# 24 x 32 the pools give 12 x 16, 6 x 8, 3 x 4 and 2 x 2 (ceil), pad_out_h brings 4 back to 3. The
# VGG-16 SegNets name their Upsamples' sizes (23 x 30, 45 x 60), so they run at CamVid's 360 x 480:
# seconds each on a shared core, marked slow.
SEGNET_CLASSES = 11  # CamVid's; the loss ignores 11 (void), the Accuracy layers do not: fed labels are 0-10
SEGNET_SIZE = (360, 480)
SEGNET_BASIC_SIZE = (24, 32)
SEGNET_TRAIN_OUTPUTS = ("accuracy", "loss", "per_class_accuracy")


def segnet_case(path: str, phase: int, size: tuple[int, int], outputs: tuple[str, ...], shapes: Mapping[str, Shape],
                run: str = "forward", marks: tuple = ()) -> NetCase:
    """A SegNet net at batch 1 with its DenseImageData fed: data (1, 3, H, W), label (1, 1, H, W)."""
    feeds = {"data": (1, 3, *size), "label": (1, 1, *size)}
    return NetCase(SEGNET, path, phase, feeds, outputs, shapes, run, labels={"label": SEGNET_CLASSES}, marks=marks)


def vgg_segnet_shapes(classifier: str) -> dict[str, Shape]:
    """The pools (ceil: 23 -> 12) and their Upsamples (named pool<k>_D) back to 23 x 30 ... 360 x 480."""
    return {"pool5": (1, 512, 12, 15), "pool5_mask": (1, 512, 12, 15), "pool5_D": (1, 512, 23, 30),
            "pool4_D": (1, 512, 45, 60), "pool1_D": (1, 64, 360, 480), classifier: (1, SEGNET_CLASSES, 360, 480)}


SEGNET_CASES = [
    segnet_case("Models/segnet_basic_train.prototxt", TRAIN, SEGNET_BASIC_SIZE, SEGNET_TRAIN_OUTPUTS,
                {"pool4": (1, 64, 2, 2), "pool4_mask": (1, 64, 2, 2), "upsample4": (1, 64, 3, 4),
                 "upsample1": (1, 64, 24, 32), "conv_classifier": (1, SEGNET_CLASSES, 24, 32)}, "backward"),
    segnet_case("Models/segnet_train.prototxt", TRAIN, SEGNET_SIZE, SEGNET_TRAIN_OUTPUTS,
                vgg_segnet_shapes("conv1_1_D"), marks=SLOW),
    segnet_case("Models/segnet_inference.prototxt", TEST, SEGNET_SIZE, ("label", "prob"),
                {**vgg_segnet_shapes("conv1_1_D"), "prob": (1, SEGNET_CLASSES, 360, 480)}, marks=SLOW),
    segnet_case("Models/bayesian_segnet_train.prototxt", TRAIN, SEGNET_SIZE, SEGNET_TRAIN_OUTPUTS,
                vgg_segnet_shapes("conv1_1_D"), marks=SLOW),
]


@pytest.mark.parametrize("case", params_of(SEGNET_CASES))
def test_segnet_net_builds_and_runs(case: NetCase, tmp_path: Path) -> None:
    run_case(case, tmp_path)


# ---- pycaffe-style scripts, without a repository ------------------------------------------------------

def conv_relu(bottom, nout: int, ks: int = 3, pad: int = 1):
    """FCN's net.py helper: a convolution and its in-place ReLU."""
    conv = L.Convolution(bottom, kernel_size=ks, num_output=nout, pad=pad, weight_filler=dict(type="msra"),
                         param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
    return conv, L.ReLU(conv, in_place=True)


def tiny_fcn32s(height: int, width: int, classes: int):
    """An FCN-32s-like net the way FCN's net.py writes one: two pooling stages, a 3 x 3 'fc6', a
    score layer, a stride-4 Deconvolution back up and coord_map's Crop to the input."""
    n = caffe.NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[1, 3, height, width]), dict(dim=[1, 1, height, width])], ntop=2)
    n.conv1, n.relu1 = conv_relu(n.data, 4, pad=16)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2, n.relu2 = conv_relu(n.pool1, 8)
    n.pool2 = L.Pooling(n.relu2, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.fc6, n.relu6 = conv_relu(n.pool2, 8, pad=0)
    n.drop6 = L.Dropout(n.relu6, dropout_ratio=0.5, in_place=True)
    n.score_fr = L.Convolution(n.drop6, num_output=classes, kernel_size=1, weight_filler=dict(type="msra"))
    n.upscore = L.Deconvolution(n.score_fr, param=[dict(lr_mult=0)],
                                convolution_param=dict(num_output=classes, kernel_size=8, stride=4, bias_term=False,
                                                       weight_filler=dict(type="bilinear")))
    n.score = rloss.caffe.coord_map.crop(n.upscore, n.data)
    n.loss = L.SoftmaxWithLoss(n.score, n.label, loss_param=dict(normalize=False, ignore_label=255))
    return n.to_proto()


def test_fcn_style_netspec_script_crops_by_coord_map_builds_and_runs(tmp_path: Path) -> None:
    height, width, classes = 20, 24, 5
    net_param = tiny_fcn32s(height, width, classes)
    crop = next(layer for layer in net_param.layer if layer.type == "Crop")
    # data -> upscore: conv1 (3, pad 16) +15, pools (2/2) (x - 0.5) / 2 twice, fc6 (3, pad 0) -1,
    # Deconvolution (8/4) 4x + 3.5: upscore x = data x + 13
    assert (crop.crop_param.axis, list(crop.crop_param.offset)) == (2, [13])
    net_file = tmp_path / "train.prototxt"
    net_file.write_text(str(net_param))
    net = caffe.Net(str(net_file), caffe.TRAIN)
    rng = np.random.RandomState(0)
    label = rng.randint(0, classes, (1, 1, height, width)).astype(np.float32)
    label[0, 0, :2] = 255
    out = net.forward(data=rng.rand(1, 3, height, width).astype(np.float32), label=label)
    score = net.blobs["score"].data.astype(np.float64)
    assert score.shape == (1, classes, height, width)
    np.testing.assert_array_equal(score, net.blobs["upscore"].data[:, :, 13:13 + height, 13:13 + width])
    log_p = score - score.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    rows, cols = np.nonzero(label[0, 0] != 255)
    expected = -log_p[0, label[0, 0, rows, cols].astype(int), rows, cols].sum()  # normalize false: / batch 1
    assert float(out["loss"].flat[0]) == pytest.approx(expected, rel=1e-5)
    net.backward()
    assert np.abs(net.params["conv1"][0].diff).max() > 0


def tiny_deploy(folder: Path, weights: np.ndarray, bias: np.ndarray) -> tuple[Path, Path]:
    """A 3 x 6 x 6-input InnerProduct + Softmax deploy net and a .caffemodel with these weights."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 6, 6]))
    n.fc = L.InnerProduct(n.data, num_output=len(bias))
    n.prob = L.Softmax(n.fc)
    deploy = folder / "deploy.prototxt"
    deploy.write_text(str(n.to_proto()))
    net = caffe.Net(str(deploy), caffe.TEST)
    net.params["fc"][0].data[...] = weights
    net.params["fc"][1].data[...] = bias
    model = folder / "tiny.caffemodel"
    net.save(str(model))
    return deploy, model


def test_transformer_and_classifier_on_a_tiny_deploy_net(tmp_path: Path) -> None:
    """Classifier's preprocessing (transpose, channel swap, raw scale, mean) and its centre crop and
    ten-crop average, against the same steps written in numpy."""
    rng = np.random.RandomState(3)
    weights, bias = rng.randn(4, 3 * 6 * 6) * 0.05, rng.randn(4) * 0.1
    deploy, model = tiny_deploy(tmp_path, weights, bias)
    mean = np.array([100.0, 110.0, 120.0])
    classifier = caffe.Classifier(str(deploy), str(model), image_dims=(8, 8), mean=mean, raw_scale=255,
                                  channel_swap=(2, 1, 0))
    image = rng.rand(8, 8, 3).astype(np.float32)

    def probabilities(crop: np.ndarray) -> np.ndarray:
        x = crop.transpose(2, 0, 1)[[2, 1, 0]] * 255 - mean[:, None, None]
        logits = weights @ x.ravel() + bias
        return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    centre = classifier.predict([image], oversample=False)
    np.testing.assert_allclose(centre[0], probabilities(image[1:7, 1:7]), rtol=1e-4, atol=1e-6)
    corners = [image[r:r + 6, c:c + 6] for r, c in ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))]
    ten = np.mean([probabilities(crop) for crop in corners + [crop[:, ::-1] for crop in corners]], axis=0)
    np.testing.assert_allclose(classifier.predict([image])[0], ten, rtol=1e-4, atol=1e-6)
    transformer = classifier.transformer
    np.testing.assert_allclose(transformer.deprocess("data", transformer.preprocess("data", image[1:7, 1:7])),
                               image[1:7, 1:7], rtol=1e-5, atol=1e-6)
