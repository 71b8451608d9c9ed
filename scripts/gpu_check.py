"""The GPU check: rloss's CUDA paths against the CPU, on synthetic inputs, from the repository alone.

    bash scripts/gpu_check.sh [--batch 20] [--crop 321]

Every registered layer type's forward and backward (small generated nets: tops, bottom and parameter
gradients, parameters after the step); 5 Solver iterations of a small net (weights and momentum
history); the DenseCRF layer and the loss modules (rloss.DenseCRFLoss, ...) with CUDA tensors; one bf16 and one
fp16 autocast step against fp32 (Net.precision); 2-rank NCCL training
through `python -m rloss train --gpu=0,1` when 2 GPUs exist (exit 0 and one snapshot); LargeFOV
forward+backward seconds per iteration in fp32 and bf16. Comparisons run with TF32 off. Prints a
table and exits 1 on any mismatch or error; without a CUDA device it says so and exits 0.

`--device cpu` (hidden) runs the same comparisons CPU against CPU, so that the machinery is tested
where there is no GPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from rloss.errors import PrecisionError  # noqa: E402
from rloss.layers import layer_types  # noqa: E402
from rloss.layers.python_layer import PythonLayerBase  # noqa: E402
from rloss.net import Net  # noqa: E402
from rloss.proto import caffe_pb2  # noqa: E402

SEED = 7
TOLERANCE = 1e-4  # float32 on two devices: summation order differs (max abs error / max(1, max |value|))
SOLVER_TOLERANCE = 1e-3  # after 5 updates with momentum
PRECISION_TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2}  # gradients of one step against fp32
FAILED = ("MISMATCH", "error", "missing")
NCCL_CHECK = "2-rank NCCL: rloss train --gpu=0,1"
Results = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Row:
    check: str
    result: str  # ok, MISMATCH, error, missing, n/a, or a timing
    detail: str = ""


# ---- the layer cases ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerCase:
    """One layer under test: its prototxt body ({files} placeholders filled with generated data files),
    the net inputs it reads as name -> (shape, kind of values), the phase, and for a layer that draws
    random numbers a function giving its expected results from the device's own run."""

    layer: str
    inputs: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    phase: int = caffe_pb2.TRAIN
    label: str = ""
    expected: Callable[[Results, Results], Results] | None = None
    needs: str = ""  # a module the case needs ("h5py")
    fed: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # Input layer tops to feed
    arrays: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # MemoryData's data, label


def dropout_expected(run: Results, inputs: Results) -> Results:
    """Dropout's results from the device's own mask: the kept values scaled by 1/(1-p), the same
    for the gradient; and the kept share near 1-p."""
    kept = (run["top y"] != 0).to(run["top y"].dtype)
    scale = 1 / (1 - 0.5)
    share = float(kept.mean())
    if abs(share - 0.5) > 0.1:
        raise AssertionError(f"dropout kept {share:.2f} of the values, expected about 0.5")
    return {"top y": inputs["x"] * kept * scale, "grad x": inputs["diff y"] * kept * scale}


class ScaledSquare(PythonLayerBase):
    """The Python case's user layer: y = w x^2 with w a learnable scalar starting at param_str, so the
    round trip through host numpy carries a bottom gradient and a parameter gradient. The case names
    its module by this script's `__name__`: `__main__` when run, `gpu_check` when the tests import it."""

    def setup(self, bottom, top) -> None:
        self.blobs.add_blob(1)
        self.blobs[0].data[...] = float(self.param_str)

    def reshape(self, bottom, top) -> None:
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top) -> None:
        top[0].data[...] = self.blobs[0].data[0] * bottom[0].data ** 2

    def backward(self, top, propagate_down, bottom) -> None:
        self.blobs[0].diff[...] = (bottom[0].data ** 2 * top[0].diff).sum()
        if propagate_down[0]:
            bottom[0].diff[...] = 2 * self.blobs[0].data[0] * bottom[0].data * top[0].diff


X4 = {"x": ((2, 3, 5, 5), "normal")}
CASES: dict[str, list[LayerCase]] = {
    "AbsVal": [LayerCase('type: "AbsVal" bottom: "x" top: "y"', X4)],
    "Accuracy": [LayerCase('type: "Accuracy" bottom: "x" bottom: "l" top: "a" accuracy_param { top_k: 2 }',
                           {"x": ((6, 5), "normal"), "l": ((6,), "labels 5")})],
    "ArgMax": [LayerCase('type: "ArgMax" bottom: "x" top: "y" argmax_param { axis: 1 }', X4)],
    "BNLL": [LayerCase('type: "BNLL" bottom: "x" top: "y"', X4)],
    "BatchNorm": [LayerCase('type: "BatchNorm" bottom: "x" top: "y"', X4)],
    "BN": [LayerCase('type: "BN" bottom: "x" top: "y" top: "m" top: "v" bn_param { scale_filler { type: '
                     '"gaussian" std: 1 } shift_filler { type: "gaussian" std: 1 } }', X4, label="LEARN"),
           LayerCase('type: "BN" bottom: "x" top: "y" bn_param { bn_mode: INFERENCE scale_filler { type: '
                     '"gaussian" std: 1 } shift_filler { type: "gaussian" std: 1 } }', X4, label="INFERENCE")],
    "BatchReindex": [LayerCase('type: "BatchReindex" bottom: "x" bottom: "i" top: "y"',
                               {"x": ((4, 3, 2), "normal"), "i": ((6,), "indices 4")})],
    "Bias": [LayerCase('type: "Bias" bottom: "x" top: "y" bias_param { filler { type: "gaussian" std: 1 } }', X4)],
    "Clip": [LayerCase('type: "Clip" bottom: "x" top: "y" clip_param { min: -0.5 max: 0.8 }', X4)],
    "Concat": [LayerCase('type: "Concat" bottom: "x" bottom: "z" top: "y"',
                         {"x": ((2, 3, 4, 4), "normal"), "z": ((2, 2, 4, 4), "normal")})],
    "ContrastiveLoss": [LayerCase('type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "s" top: "y" '
                                  'contrastive_loss_param { margin: 2 }',
                                  {"a": ((6, 3, 1, 1), "normal"), "b": ((6, 3, 1, 1), "normal"),
                                   "s": ((6, 1, 1, 1), "labels 2")})],
    "Convolution": [LayerCase(
        'type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 kernel_size: 3 pad: 2 '
        'dilation: 2 stride: 2 group: 2 weight_filler { type: "gaussian" std: 0.3 } '
        'bias_filler { type: "constant" value: 0.2 } }', {"x": ((2, 4, 9, 9), "normal")})],
    "Crop": [LayerCase('type: "Crop" bottom: "x" bottom: "z" top: "y" crop_param { axis: 2 offset: 1 }',
                       {"x": ((2, 3, 8, 8), "normal"), "z": ((2, 3, 5, 5), "normal")})],
    "Deconvolution": [LayerCase(
        'type: "Deconvolution" bottom: "x" top: "y" convolution_param { num_output: 2 kernel_size: 4 stride: 2 '
        'pad: 1 weight_filler { type: "gaussian" std: 0.3 } }', X4)],
    "Data": [LayerCase('type: "Data" top: "data" top: "label" data_param { source: "{lmdb}" backend: LMDB '
                       'batch_size: 2 } transform_param { crop_size: 16 mirror: true scale: 0.0078125 '
                       'mean_value: 104 mean_value: 117 mean_value: 123 }', needs="lmdb")],
    "DenseImageData": [LayerCase('type: "DenseImageData" top: "data" top: "label" dense_image_data_param { '
                                 'source: "{seg_list}" root_folder: "{root}/" batch_size: 2 shuffle: true '
                                 'mirror: true crop_height: 24 crop_width: 28 } transform_param { scale: 0.5 '
                                 'mean_value: 104 mean_value: 117 mean_value: 123 }')],
    "DenseCRF": [LayerCase(
        'type: "DenseCRF" bottom: "x" bottom: "d" bottom: "i" top: "y" dense_crf_param { max_iter: 3 pos_w: 3 '
        'pos_xy_std: 2 bi_w: 5 bi_xy_std: 6 bi_rgb_std: 10 }',
        {"x": ((2, 3, 12, 12), "normal"), "d": ((2, 1, 1, 2), "size 12 10"), "i": ((2, 3, 12, 12), "image")},
        phase=caffe_pb2.TEST)],
    "DenseCRFLoss": [LayerCase(
        'type: "DenseCRFLoss" bottom: "i" bottom: "p" top: "y" loss_weight: 0.001 propagate_down: false '
        'propagate_down: true densecrf_loss_param { bi_xy_std: 5 bi_rgb_std: 10 }',
        {"i": ((2, 3, 12, 12), "image"), "p": ((2, 4, 12, 12), "probabilities")})],
    "GatedCRFLoss": [LayerCase(
        'type: "GatedCRFLoss" bottom: "i" bottom: "p" top: "y" loss_weight: 1 propagate_down: false '
        'propagate_down: true gated_crf_loss_param { kernel { xy_std: 3 rgb_std: 20 } kernel { weight: 0.5 xy_std: 2 '
        'rgb_std: 0 } radius: 3 normalize: true }',
        {"i": ((2, 3, 12, 12), "image"), "p": ((2, 4, 12, 12), "probabilities")})],
    "NormalizedCutLoss": [LayerCase(
        'type: "NormalizedCutLoss" bottom: "i" bottom: "p" top: "y" loss_weight: 1 propagate_down: false '
        'propagate_down: true normalized_cut_loss_param { bi_xy_std: 5 bi_rgb_std: 10 }',
        {"i": ((2, 3, 12, 12), "image"), "p": ((2, 4, 12, 12), "probabilities")})],
    "SizeConstraintLoss": [LayerCase(
        'type: "SizeConstraintLoss" bottom: "i" bottom: "p" bottom: "l" top: "y" loss_weight: 1 '
        'propagate_down: false propagate_down: true propagate_down: false '
        'size_constraint_loss_param { lower: 0.3 upper: 0.6 }',
        {"i": ((2, 3, 12, 12), "image"), "p": ((2, 4, 12, 12), "probabilities"), "l": ((2, 1, 12, 12), "labels 4")})],
    "Dropout": [LayerCase('type: "Dropout" bottom: "x" top: "y" dropout_param { dropout_ratio: 0.5 }',
                          {"x": ((4, 8, 8, 8), "normal")}, expected=dropout_expected)],
    "DummyData": [LayerCase('type: "DummyData" top: "y" dummy_data_param { shape { dim: 2 dim: 3 } '
                            'data_filler { type: "gaussian" std: 1 } }')],
    "ELU": [LayerCase('type: "ELU" bottom: "x" top: "y" elu_param { alpha: 0.5 }', X4)],
    "Eltwise": [LayerCase(f'type: "Eltwise" bottom: "x" bottom: "z" top: "y" eltwise_param {{ {op} }}',
                          {"x": ((2, 3, 4), "normal"), "z": ((2, 3, 4), "normal")}, label=op.split()[1])
                for op in ("operation: SUM coeff: 1 coeff: -2", "operation: PROD", "operation: MAX")],
    "Embed": [LayerCase('type: "Embed" bottom: "l" top: "y" propagate_down: false embed_param { num_output: 4 '
                        'input_dim: 5 weight_filler { type: "gaussian" std: 1 } bias_filler { type: "constant" '
                        'value: 0.5 } }', {"l": ((2, 3), "indices 5")})],
    "EuclideanLoss": [LayerCase('type: "EuclideanLoss" bottom: "x" bottom: "z" top: "y"',
                                {"x": ((4, 3, 2), "normal"), "z": ((4, 3, 2), "normal")})],
    "Exp": [LayerCase('type: "Exp" bottom: "x" top: "y" exp_param { base: 2 scale: 0.5 shift: 0.1 }', X4)],
    "Filter": [LayerCase('type: "Filter" bottom: "x" bottom: "s" top: "y"',
                         {"x": ((6, 3, 2), "normal"), "s": ((6,), "indices 2")})],
    "Flatten": [LayerCase('type: "Flatten" bottom: "x" top: "y"', X4)],
    "HDF5Data": [LayerCase('type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "{hdf5_list}" '
                           'batch_size: 3 shuffle: true }', needs="h5py")],
    "HingeLoss": [LayerCase(f'type: "HingeLoss" bottom: "x" bottom: "l" top: "y" hinge_loss_param {{ norm: {norm} }}',
                            {"x": ((6, 5), "normal"), "l": ((6,), "indices 5")}, label=norm) for norm in ("L1", "L2")],
    "Im2col": [LayerCase('type: "Im2col" bottom: "x" top: "y" convolution_param { kernel_size: 3 pad: 1 stride: 2 '
                         'dilation: 2 }', X4)],
    "ImageData": [LayerCase('type: "ImageData" top: "data" top: "label" image_data_param { source: "{class_list}" '
                            'root_folder: "{root}/" batch_size: 2 shuffle: true } transform_param { crop_size: 16 '
                            'mirror: true mean_value: 104 mean_value: 117 mean_value: 123 }')],
    "ImageSegData": [LayerCase('type: "ImageSegData" top: "data" top: "label" top: "data_dim" image_data_param { '
                               'source: "{seg_list}" root_folder: "{root}/" batch_size: 2 shuffle: true '
                               'label_type: PIXEL } '
                               'transform_param { crop_size: 28 mirror: true mean_value: 104 mean_value: 117 '
                               'mean_value: 123 }')],
    "InfogainLoss": [LayerCase('type: "InfogainLoss" bottom: "x" bottom: "l" bottom: "h" top: "y" loss_param { '
                               'ignore_label: 255 }', {"x": ((2, 4, 5, 5), "normal"), "l": ((2, 1, 5, 5), "labels 4"),
                                                       "h": ((4, 4), "probabilities")})],
    "InnerProduct": [LayerCase('type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 4 '
                               'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" '
                               'value: 0.1 } }', X4)],
    "Input": [LayerCase('type: "Input" top: "fed" input_param { shape { dim: 2 dim: 3 } }',
                        fed={"fed": ((2, 3), "normal")})],
    "Interp": [LayerCase(f'type: "Interp" bottom: "x" top: "y" interp_param {{ {size} }}', X4, label=size)
               for size in ("zoom_factor: 2", "height: 3 width: 4")],
    "LRN": [LayerCase(f'type: "LRN" bottom: "x" top: "y" lrn_param {{ local_size: 3 alpha: 0.5 '
                      f'norm_region: {region} }}', X4, label=region)
            for region in ("ACROSS_CHANNELS", "WITHIN_CHANNEL")],
    "LSTM": [LayerCase('type: "LSTM" bottom: "x" bottom: "c" top: "y" recurrent_param { num_output: 4 '
                       'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 } }',
                       {"x": ((3, 2, 5), "normal"), "c": ((3, 2), "indices 2")}),
             LayerCase('type: "LSTM" bottom: "x" bottom: "c" bottom: "s" bottom: "h" bottom: "m" top: "y" '
                       'top: "hT" top: "mT" recurrent_param { num_output: 4 expose_hidden: true '
                       'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 } }',
                       {"x": ((3, 2, 5), "normal"), "c": ((3, 2), "indices 2"), "s": ((2, 3), "normal"),
                        "h": ((1, 2, 4), "normal"), "m": ((1, 2, 4), "normal")}, label="x_static expose_hidden")],
    "Log": [LayerCase('type: "Log" bottom: "x" top: "y" log_param { base: 2 scale: 2 shift: 0.1 }',
                      {"x": ((2, 3, 5, 5), "probabilities")})],
    "MVN": [LayerCase('type: "MVN" bottom: "x" top: "y"', X4)],
    "MemoryData": [LayerCase('type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 2 '
                             'channels: 3 height: 4 width: 5 }',
                             arrays={"data": ((4, 3, 4, 5), "normal"), "label": ((4,), "indices 3")})],
    "MultinomialLogisticLoss": [LayerCase('type: "MultinomialLogisticLoss" bottom: "p" bottom: "l" top: "y"',
                                          {"p": ((6, 5), "probabilities"), "l": ((6,), "indices 5")})],
    "PReLU": [LayerCase('type: "PReLU" bottom: "x" top: "y" prelu_param { filler { type: "gaussian" std: 0.3 } }',
                        X4)],
    "Parameter": [LayerCase('type: "Parameter" top: "y" parameter_param { shape { dim: 2 dim: 3 } }')],
    "Pooling": [LayerCase(f'type: "Pooling" bottom: "x" top: "y" pooling_param {{ pool: {pool} kernel_size: 3 '
                          'stride: 2 pad: 1 }', X4, label=pool) for pool in ("MAX", "AVE")],
    "Power": [LayerCase('type: "Power" bottom: "x" top: "y" power_param { power: 3 scale: 0.5 shift: 1 }', X4)],
    "Python": [LayerCase(f'type: "Python" bottom: "x" top: "y" python_param {{ module: "{__name__}" '
                         'layer: "ScaledSquare" param_str: "1.5" }', X4)],
    "RNN": [LayerCase('type: "RNN" bottom: "x" bottom: "c" top: "y" recurrent_param { num_output: 4 '
                      'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 } }',
                      {"x": ((3, 2, 5), "normal"), "c": ((3, 2), "indices 2")}),
            LayerCase('type: "RNN" bottom: "x" bottom: "c" bottom: "s" bottom: "h" top: "y" top: "hT" '
                      'recurrent_param { num_output: 4 expose_hidden: true '
                      'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 } }',
                      {"x": ((3, 2, 5), "normal"), "c": ((3, 2), "indices 2"), "s": ((2, 3), "normal"),
                       "h": ((1, 2, 4), "normal")}, label="x_static expose_hidden")],
    "Reduction": [LayerCase('type: "Reduction" bottom: "x" top: "y" reduction_param { operation: SUMSQ axis: 1 '
                            'coeff: 0.5 }', X4)],
    "ReLU": [LayerCase('type: "ReLU" bottom: "x" top: "y" relu_param { negative_slope: 0.1 }', X4)],
    "Reshape": [LayerCase('type: "Reshape" bottom: "x" top: "y" reshape_param { shape { dim: 0 dim: -1 } }', X4)],
    "SPP": [LayerCase(f'type: "SPP" bottom: "x" top: "y" spp_param {{ pyramid_height: 3 pool: {pool} }}',
                      {"x": ((2, 3, 9, 7), "normal")}, label=pool) for pool in ("MAX", "AVE")],
    "Scale": [LayerCase('type: "Scale" bottom: "x" top: "y" scale_param { bias_term: true filler { type: '
                        '"gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } }', X4)],
    "SegAccuracy": [LayerCase('type: "SegAccuracy" bottom: "x" bottom: "l" top: "y" seg_accuracy_param { '
                              'ignore_label: 255 }', {"x": ((2, 4, 5, 5), "normal"), "l": ((2, 1, 5, 5), "labels 4")})],
    "Sigmoid": [LayerCase('type: "Sigmoid" bottom: "x" top: "y"', X4)],
    "SigmoidCrossEntropyLoss": [LayerCase('type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "y"',
                                          {"x": ((4, 3, 2), "normal"), "t": ((4, 3, 2), "probabilities")})],
    "Silence": [LayerCase('type: "Silence" bottom: "x"', X4)],
    "Slice": [LayerCase('type: "Slice" bottom: "x" top: "y" top: "z" slice_param { axis: 1 slice_point: 1 }', X4)],
    "Softmax": [LayerCase('type: "Softmax" bottom: "x" top: "y"', X4)],
    "SoftmaxWithLoss": [LayerCase('type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "y" loss_param { '
                                  'ignore_label: 255 }', {"x": ((2, 4, 5, 5), "normal"),
                                                          "l": ((2, 1, 5, 5), "labels 4")})],
    "Swish": [LayerCase('type: "Swish" bottom: "x" top: "y" swish_param { beta: 1.5 }', X4)],
    "Split": [LayerCase('type: "Split" bottom: "x" top: "y" top: "z"', X4)],
    "TanH": [LayerCase('type: "TanH" bottom: "x" top: "y"', X4)],
    "Threshold": [LayerCase('type: "Threshold" bottom: "x" top: "y" threshold_param { threshold: 0.2 }', X4)],
    "Upsample": [LayerCase('type: "Upsample" bottom: "x" bottom: "m" top: "y" upsample_param { scale: 2 }',
                           {"x": ((2, 3, 2, 2), "normal"), "m": ((2, 3, 2, 2), "indices 16")}, label="scale"),
                 LayerCase('type: "Upsample" bottom: "x" bottom: "m" top: "y" upsample_param { upsample_h: 3 '
                           'upsample_w: 5 }', {"x": ((2, 3, 2, 3), "normal"), "m": ((2, 3, 2, 3), "indices 15")},
                           label="upsample_h upsample_w")],
    "Tile": [LayerCase('type: "Tile" bottom: "x" top: "y" tile_param { axis: 1 tiles: 3 }', X4)],
}


def input_values(kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Values of one kind: normal, image (mean-subtracted pixels), probabilities (softmax over
    axis 1), labels K (integers in [0, K), a tenth 255), indices K (integers in [0, K), for layers that
    refuse any other value), size H W (data_dim rows)."""
    words = kind.split()
    if words[0] == "normal":
        return torch.randn(shape, generator=generator)
    if words[0] == "image":
        return torch.randint(0, 256, shape, generator=generator).float() - 117
    if words[0] == "probabilities":
        return torch.softmax(torch.randn(shape, generator=generator) * 2, dim=1)
    if words[0] == "labels":
        labels = torch.randint(0, int(words[1]), shape, generator=generator).float()
        labels[torch.rand(shape, generator=generator) < 0.1] = 255
        return labels
    if words[0] == "indices":
        return torch.randint(0, int(words[1]), shape, generator=generator).float()
    if words[0] == "size":
        return torch.tensor([float(words[1]), float(words[2])]).expand(shape).clone()
    raise ValueError(f"unknown input kind {kind!r}")


def case_net(case: LayerCase, files: dict[str, str]) -> caffe_pb2.NetParameter:
    lines = ['name: "gpu_check"', "force_backward: true"]
    for name, (shape, _) in case.inputs.items():
        lines += [f'input: "{name}"', "input_shape { " + " ".join(f"dim: {d}" for d in shape) + " }"]
    body = case.layer
    for key, value in files.items():
        body = body.replace("{" + key + "}", value)
    lines.append('layer { name: "under_test" ' + body + " }")
    return text_format.Parse("\n".join(lines), caffe_pb2.NetParameter())


def run_net(param: caffe_pb2.NetParameter, phase: int, inputs: Results, device: torch.device) -> Results:
    """Forward, then backward from seeded random top diffs, on `device`: the tops, the inputs'
    gradients and the parameters' values and gradients after it (moved to the CPU, as float32)."""
    torch.manual_seed(SEED)  # the same fillers, data order and draws on both devices
    net = Net(param, phase, source="gpu_check").to(device)
    net.forward(feeds_for(net, inputs, device))
    results = {f"top {name}": net.blob_data[name] for name in net.outputs}
    diffs = {name: inputs[f"diff {name}"].to(device) for name in net.outputs
             if net.blob_data[name].requires_grad and f"diff {name}" in inputs}
    net.backward_from(diffs)
    for name in net.inputs:
        results[f"grad {name}"] = net.blob_diff(name)
    for index, blob in enumerate(net.parameters()):
        results[f"param {index}"] = blob.detach()
        if blob.grad is not None:
            results[f"param {index} grad"] = blob.grad
    return {key: value.detach().float().cpu() for key, value in results.items()}


def feeds_for(net: Net, inputs: Results, device: torch.device) -> Results:
    """The net's feeds from `inputs`; the "array" ones go to its MemoryData layers instead, as pycaffe's
    set_input_arrays hands them (data float32 N x C x H x W, labels N x 1 x 1 x 1)."""
    if "array data" in inputs:
        data = inputs["array data"].float().numpy()
        labels = inputs["array label"].float().numpy().reshape(-1, 1, 1, 1)
        for layer in net.layers:
            if layer.type_name == "MemoryData":
                layer.reset(data, labels)
    return {name: value.to(device) for name, value in inputs.items() if not name.startswith(("diff ", "array "))}


def case_inputs(case: LayerCase, param: caffe_pb2.NetParameter) -> Results:
    """The inputs, and a seeded diff for every output of the net, shaped as a CPU forward gives it (the
    built shapes would not do: Filter's top holds only the items its selector picks)."""
    generator = torch.Generator().manual_seed(SEED)
    inputs = {name: input_values(kind, shape, generator) for name, (shape, kind) in {**case.inputs, **case.fed}.items()}
    arrays = case.arrays.items()
    inputs.update({f"array {name}": input_values(kind, shape, generator) for name, (shape, kind) in arrays})
    torch.manual_seed(SEED)
    probe = Net(param, case.phase, source="gpu_check")
    probe.forward(feeds_for(probe, inputs, torch.device("cpu")))
    for name in probe.outputs:
        inputs[f"diff {name}"] = torch.randn(probe.blob_data[name].shape, generator=generator)
    return inputs


def compare(reference: Results, actual: Results, tolerance: float) -> tuple[bool, float, str]:
    """(all within tolerance, the largest max abs error, the worst key)."""
    if set(reference) != set(actual):
        return False, math.inf, f"different results: {sorted(set(reference) ^ set(actual))}"
    ok, worst, where = True, 0.0, ""
    for key, expected in reference.items():
        error = float((actual[key] - expected).abs().max()) if expected.numel() else 0.0
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if not math.isfinite(error) or error > tolerance * max(1.0, scale):
            ok = False
        if error > worst or not math.isfinite(error):
            worst, where = error, key
    return ok, worst, where


def verdict(check: str, ok: bool, error: float, where: str) -> Row:
    detail = f"{error:.3g}" + (f" ({where})" if where and not ok else "")
    return Row(check, "ok" if ok else "MISMATCH", detail)


def layer_rows(device: torch.device, files: dict[str, str]) -> list[Row]:
    rows = [Row(f"layer {name}", "missing", "no case in scripts/gpu_check.py") for name in layer_types()
            if name not in CASES]
    for name, cases in CASES.items():
        for case in cases:
            check = f"layer {name}" + (f" ({case.label})" if case.label else "")
            rows.append(guarded(check, lambda c=check, case=case: layer_row(c, case, device, files)))
    return rows


def layer_row(check: str, case: LayerCase, device: torch.device, files: dict[str, str]) -> Row:
    if case.needs and not module_available(case.needs):
        return Row(check, "n/a", f"{case.needs} is not installed")
    param = case_net(case, files)
    inputs = case_inputs(case, param)
    actual = run_net(param, case.phase, inputs, device)
    if case.expected:
        reference = case.expected(actual, inputs)
        actual = {key: actual[key] for key in reference}
    else:
        reference = run_net(param, case.phase, inputs, torch.device("cpu"))
    return verdict(check, *compare(reference, actual, TOLERANCE))


def module_available(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def guarded(check: str, run: Callable[[], Row]) -> Row:
    """A check's row, or an error row saying what went wrong."""
    try:
        return run()
    except Exception as error:  # any failure is a row of the table, not the end of the check
        return Row(check, "error", f"{type(error).__name__}: {str(error)[:300]}")


# ---- data files ---------------------------------------------------------------------------------------

def write_files(folder: Path) -> dict[str, str]:
    """The synthetic scribble dataset (32x32 images), a class list for ImageData and an HDF5 file."""
    from rloss.data.synthetic import write_dataset

    dataset = write_dataset(folder / "data", train=6, val=0, height=32, width=32, num_classes=4)
    class_list = folder / "classes.txt"
    class_list.write_text("".join(f"images/train_{i:04d}.png {i % 3}\n" for i in range(6)))
    files = {"root": str(dataset.root), "seg_list": str(dataset.train_list), "class_list": str(class_list)}
    if module_available("h5py"):
        import h5py

        generator = torch.Generator().manual_seed(SEED)
        with h5py.File(folder / "data.h5", "w") as handle:
            handle["data"] = torch.randn(5, 3, generator=generator).numpy()
            handle["label"] = torch.arange(5).float().numpy()
        (folder / "h5.txt").write_text(f"{folder / 'data.h5'}\n")
        files["hdf5_list"] = str(folder / "h5.txt")
    if module_available("lmdb"):
        files["lmdb"] = write_lmdb(folder / "lmdb")
    return files


def write_lmdb(folder: Path) -> str:
    """An LMDB database of 5 raw 3 x 20 x 20 uint8 datums (labels 0..4) for the Data layer."""
    import lmdb

    generator = torch.Generator().manual_seed(SEED)
    environment = lmdb.open(str(folder), map_size=1 << 24)
    with environment.begin(write=True) as txn:
        for index in range(5):
            pixels = torch.randint(0, 256, (3, 20, 20), generator=generator, dtype=torch.uint8)
            datum = caffe_pb2.Datum(channels=3, height=20, width=20, label=index, data=pixels.numpy().tobytes())
            txn.put(f"{index:08d}".encode(), datum.SerializeToString())
    environment.close()
    return str(folder)


SMALL_NET = """name: "small"
layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
  image_data_param {{ source: "{seg_list}" root_folder: "{root}/" batch_size: 2 shuffle: true label_type: PIXEL }}
  transform_param {{ crop_size: 25 mirror: true mean_value: 104 mean_value: 117 mean_value: 123 }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" std: 0.05 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}
layer {{ name: "score" type: "Convolution" bottom: "pool1" top: "score"
  convolution_param {{ num_output: 4 kernel_size: 1 weight_filler {{ type: "gaussian" std: 0.05 }} }} }}
layer {{ name: "up" type: "Interp" bottom: "score" top: "up" interp_param {{ height: 25 width: 25 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "up" bottom: "label" top: "loss"
  loss_param {{ ignore_label: 255 }} }}
layer {{ name: "prob" type: "Softmax" bottom: "up" top: "prob" }}
layer {{ name: "crf" type: "DenseCRFLoss" bottom: "data" bottom: "prob" top: "crf" loss_weight: 1e-4
  propagate_down: false propagate_down: true densecrf_loss_param {{ bi_xy_std: 10 bi_rgb_std: 15 }} }}
"""


def small_solver(files: dict[str, str], prefix: str, max_iter: int = 5) -> caffe_pb2.SolverParameter:
    param = text_format.Parse(f'base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.0005 '
                              f'max_iter: {max_iter} display: 0 random_seed: {SEED} snapshot_prefix: "{prefix}"',
                              caffe_pb2.SolverParameter())
    param.train_net_param.CopyFrom(text_format.Parse(SMALL_NET.format(**files), caffe_pb2.NetParameter()))
    return param


# ---- the other checks ---------------------------------------------------------------------------------

def solver_row(device: torch.device, files: dict[str, str], folder: Path) -> Row:
    """5 SGD iterations on each device: the weights and momentum history."""
    from rloss.solver import Solver

    states = []
    for where in (torch.device("cpu"), device):
        solver = Solver(small_solver(files, str(folder / "solver")), device=where)
        solver.step(5)
        state = {f"weight {i}": p.tensor.detach().cpu() for i, p in enumerate(solver.net.learnable)}
        state.update({f"history {i}": h.detach().cpu() for i, h in enumerate(solver.history)})
        states.append(state)
    return verdict("solver: 5 SGD iterations", *compare(states[0], states[1], SOLVER_TOLERANCE))


def loss_module_rows(device: torch.device) -> list[Row]:
    """The loss modules (rloss.DenseCRFLoss, NormalizedCutLoss, GatedCRFLoss, SizeConstraintLoss) on device
    tensors against the CPU: loss and gradient."""
    from rloss import DenseCRFLoss, GatedCRFLoss, GatedKernel, NormalizedCutLoss, SizeConstraintLoss

    generator = torch.Generator().manual_seed(SEED)
    images = torch.randint(0, 256, (2, 3, 16, 16), generator=generator).float()
    scores = torch.randn(2, 4, 16, 16, generator=generator)
    rois = (torch.rand(2, 16, 16, generator=generator) > 0.2).float()
    lower, upper = torch.full((2, 4), 0.1), torch.full((2, 4), 0.3)
    modules = {
        "rloss.DenseCRFLoss module": DenseCRFLoss(weight=1e-3, sigma_rgb=15, sigma_xy=10, scale_factor=0.5),
        "rloss.NormalizedCutLoss module": NormalizedCutLoss(weight=1.0, sigma_rgb=15, sigma_xy=10),
        "rloss.GatedCRFLoss module": GatedCRFLoss(1.0, [GatedKernel(1.0, 4.0, 20.0)], radius=3, scale_factor=0.5),
        "rloss.SizeConstraintLoss module": SizeConstraintLoss(1.0, normalize=True),
    }

    def row(name: str, module: torch.nn.Module) -> Row:
        results = []
        for where in (torch.device("cpu"), device):
            logits = scores.to(where).requires_grad_(True)
            probabilities = torch.softmax(logits, dim=1)
            if isinstance(module, SizeConstraintLoss):
                loss = module(probabilities, rois.to(where), lower.to(where), upper.to(where))
            else:
                loss = module(images.to(where), probabilities, rois.to(where))
            loss.sum().backward()
            results.append({"loss": loss.detach().cpu(), "gradient": logits.grad.cpu()})
        return verdict(name, *compare(results[0], results[1], TOLERANCE))

    return [guarded(name, functools.partial(row, name, module)) for name, module in modules.items()]


def precision_rows(device: torch.device, files: dict[str, str]) -> list[Row]:
    """One forward+backward of the small net under each autocast precision against fp32."""
    rows = []
    for precision, tolerance in PRECISION_TOLERANCE.items():
        check = f"autocast step {precision}"
        rows.append(guarded(check, lambda p=precision, t=tolerance, c=check: precision_row(c, p, t, device, files)))
    return rows


def precision_row(check: str, precision: str, tolerance: float, device: torch.device, files: dict[str, str]) -> Row:
    from rloss.wiring import data_layers_to_inputs

    param = data_layers_to_inputs(text_format.Parse(SMALL_NET.format(**files), caffe_pb2.NetParameter()))
    generator = torch.Generator().manual_seed(SEED)
    feeds = {"data": torch.randint(0, 256, (2, 3, 25, 25), generator=generator).float() - 117,
             "label": input_values("labels 4", (2, 1, 25, 25), generator)}
    results = []
    for mode in ("fp32", precision):
        torch.manual_seed(SEED)
        net = Net(param, caffe_pb2.TRAIN, source="gpu_check").to(device)
        try:
            net.precision = mode
            loss = net.forward({name: value.to(device) for name, value in feeds.items()})
        except PrecisionError as error:  # a precision this device cannot run, refused as it should be
            return Row(check, "n/a", str(error)[:200])
        loss.backward()
        grads = {f"param {i} grad": p.grad.float().cpu() for i, p in enumerate(net.parameters()) if p.grad is not None}
        results.append({"loss": loss.detach().float().cpu().reshape(1), **grads})
    return verdict(check, *compare(results[0], results[1], tolerance))


def nccl_row(files: dict[str, str], folder: Path) -> Row:
    """2 ranks through `python -m rloss train --gpu=0,1`: exit 0 and one snapshot."""
    check = NCCL_CHECK
    if torch.cuda.device_count() < 2:
        return Row(check, "n/a", f"{torch.cuda.device_count()} CUDA device(s)")
    prefix = folder / "nccl" / "snap"
    prefix.parent.mkdir(parents=True)
    solver = folder / "nccl" / "solver.prototxt"
    solver.write_text(text_format.MessageToString(small_solver(files, str(prefix), max_iter=2)))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rloss", "train", f"--solver={solver}", "--gpu=0,1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    models = sorted(prefix.parent.glob("*.caffemodel"))
    seconds = f"{time.perf_counter() - start:.1f} s"
    if done.returncode != 0 or len(models) != 1:
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        return Row(check, "MISMATCH", f"exit {done.returncode}, {len(models)} snapshots, {seconds}: {tail[0][:200]}")
    return Row(check, "ok", f"{models[0].name}, {seconds}")


def largefov_rows(device: torch.device, batch: int, crop: int, iterations: int) -> list[Row]:
    rows = []
    for precision in ("fp32", "bf16"):
        check = f"LargeFOV fwd+bwd {precision} (batch {batch}, crop {crop})"
        rows.append(guarded(check, lambda p=precision, c=check: largefov_row(c, p, device, batch, crop, iterations)))
    return rows


def largefov_row(check: str, precision: str, device: torch.device, batch: int, crop: int, iterations: int) -> Row:
    """Median seconds per forward+backward of DeepLab-LargeFOV's train net fed synthetic images."""
    from rloss.memory import synthetic_feeds
    from rloss.models import deeplab_largefov
    from rloss.wiring import data_layers_to_inputs

    values = {"EXP": "check", "DATA_ROOT": "/unused/", "TRAIN_SET": "train", "NET_ID": "largefov"}
    param = deeplab_largefov("train", num_labels=21, crop_size=crop, batch_size=batch).net_parameter(
        values, phase=caffe_pb2.TRAIN)
    net = Net(data_layers_to_inputs(param), caffe_pb2.TRAIN, source="DeepLab-LargeFOV").to(device)
    net.precision = precision
    feeds = {name: value.to(device) for name, value in synthetic_feeds(net).items()}
    times = []
    for _ in range(iterations + 1):  # the first is a warm-up
        net.zero_grad(set_to_none=True)
        synchronize(device)
        start = time.perf_counter()
        net.forward(feeds).backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Row(check, f"{statistics.median(times[1:]):.3f} s/it", f"median of {iterations}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the table ----------------------------------------------------------------------------------------

def all_rows(device: torch.device, args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="rloss_gpu_check_") as name:
        folder = Path(name)
        files = write_files(folder)
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        rows = layer_rows(device, files)
        rows.append(guarded("solver: 5 SGD iterations", lambda: solver_row(device, files, folder)))
        rows += loss_module_rows(device)
        rows += precision_rows(device, files)
        rows.append(guarded(NCCL_CHECK, lambda: nccl_row(files, folder)) if device.type == "cuda"
                    else Row(NCCL_CHECK, "n/a", "not on the CPU"))
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32  # timings: torch's defaults
        rows += largefov_rows(device, args.batch, args.crop, args.iterations)
    return rows


def print_table(rows: list[Row], device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"rloss GPU check on {device} ({name}), torch {torch.__version__}, against the CPU")
    print(f"{'check':48} {'result':14} max abs error / time")
    for row in rows:
        print(f"{row.check:48} {row.result:14} {row.detail}")
    failed = [row for row in rows if row.result in FAILED]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed or do not apply" +
          (f"; FAILED: {', '.join(row.check for row in failed)}" if failed else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=20, help="LargeFOV timing batch (default 20, the file's)")
    parser.add_argument("--crop", type=int, default=321, help="LargeFOV timing crop (default 321)")
    parser.add_argument("--iterations", type=int, default=5, help="timed LargeFOV iterations (default 5)")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("rloss GPU check: no CUDA device is available (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); nothing to check")
        return 0
    rows = all_rows(device, args)
    print_table(rows, device)
    return 1 if any(row.result in FAILED for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
