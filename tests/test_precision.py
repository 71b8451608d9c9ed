"""Mixed precision: the precision names and what each device can run, autocast around a Net (float32
layers, float32 outputs and loss, float32 master weights and snapshots), the DenseCRF loss under
autocast, fp16 loss scaling, and the --precision flag."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from PIL import Image

from rloss import DenseCRFLoss, caffe, precision
from rloss.cli.main import main
from rloss.errors import PrecisionError
from rloss.io import read_net_param
from rloss.net import Net
from rloss.precision import LossScaler, autocast, check_precision
from rloss.proto import caffe_pb2
from rloss.proto.blob import blob_to_array
from tests.shared_data import REPO
from tests.test_infer import infer, scores_of, setup  # noqa: F401 (setup: test_infer's fixture)

CPU = torch.device("cpu")

SMALL_NET = """name: "small"
input: "data" input_shape { dim: 2 dim: 3 dim: 12 dim: 12 }
input: "label" input_shape { dim: 2 dim: 1 dim: 12 dim: 12 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "score" type: "Convolution" bottom: "pool1" top: "score"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "SegAccuracy" bottom: "score" bottom: "label" top: "accuracy" }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
layer { name: "crf" type: "DenseCRFLoss" bottom: "data" bottom: "prob" top: "crf" loss_weight: 0.001
  densecrf_loss_param { bi_xy_std: 5 bi_rgb_std: 0.5 } }
"""


def small_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(text_format.Parse(SMALL_NET, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, source="small.prototxt")


def feeds(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"data": torch.randn(2, 3, 12, 12, generator=generator),
            "label": torch.randint(0, 4, (2, 1, 12, 12), generator=generator).float()}


def forward_backward(net: Net) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    loss = net.forward(feeds())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.learnable_tensors()]


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


# ---- names and devices ----------------------------------------------------------------------------

def test_unknown_precision_names_the_known_ones() -> None:
    with pytest.raises(PrecisionError, match=r"unknown precision 'fp64' \(known: fp32, bf16, fp16\)"):
        check_precision("fp64", CPU)
    with pytest.raises(PrecisionError):
        small_net().precision = "half"


def cpu_fp16_problem() -> str:
    """Why this torch cannot run fp16 autocast on the CPU ('' when it can: torch >= 2.2 or so)."""
    return precision._autocast_probe(CPU, torch.float16)


needs_cpu_fp16 = pytest.mark.skipif(bool(cpu_fp16_problem()), reason="this torch's CPU autocast has no float16")


def test_fp16_on_a_cpu_without_it_is_refused_with_the_reason() -> None:
    if not cpu_fp16_problem():
        pytest.skip("this torch's CPU autocast has float16")
    with pytest.raises(PrecisionError, match=r"--precision=fp16 on cpu: "):
        check_precision("fp16", CPU)


@needs_cpu_fp16
def test_cpu_runs_fp32_and_bf16_and_fp16_with_a_warning(caplog) -> None:
    assert check_precision("fp32", CPU) == "fp32" and check_precision("bf16", CPU) == "bf16"
    precision._warn_cpu_fp16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="rloss"):
        assert check_precision("fp16", CPU) == "fp16"
    assert any("fp16 on the CPU is for checks only" in r.getMessage() for r in caplog.records)


def test_an_autocast_without_the_type_is_refused() -> None:
    # torch's CPU autocast has no float64 mode: it warns and stays in float32, which the probe notices
    # (torch before 2.2 raises instead, which the probe reports as well)
    problem = precision._autocast_probe(CPU, torch.float64)
    assert "does not support torch.float64" in problem or "torch.autocast cannot run there" in problem


@pytest.mark.parametrize("capability, name, message", [
    ((5, 0), "fp16", r"compute capability 5\.0\) has no native torch\.float16 arithmetic \(needs 5\.3"),
    ((7, 0), "bf16", r"compute capability 7\.0\) has no native torch\.bfloat16 .*needs 8\.0.*use fp32 or fp16"),
])
def test_old_gpus_are_refused(monkeypatch, capability, name, message) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    precision._device_problem.cache_clear()
    try:
        with pytest.raises(PrecisionError, match=rf"--precision={name} on cuda:0: .*{message}"):
            check_precision(name, torch.device("cuda", 0))
    finally:
        precision._device_problem.cache_clear()


def test_fp32_leaves_autocast_alone_and_bf16_enters_it() -> None:
    ones = torch.ones(2, 2)
    with autocast("fp32", CPU):
        assert (ones @ ones).dtype == torch.float32
    with autocast("bf16", CPU):
        assert (ones @ ones).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast("fp32", CPU):
        assert (ones @ ones).dtype == torch.bfloat16  # a caller's own autocast stays in force


# ---- a net under autocast -------------------------------------------------------------------------

def test_bf16_forward_and_backward_are_close_to_fp32() -> None:
    """bf16 keeps 8 significant bits: convolution inputs, weights and back-propagated gradients are
    rounded by up to 2^-9 (0.2 %) relative, products accumulate in float32. The loss, a mean over all
    pixels, stays within 1 % (measured 0.1 %). A weight gradient is a sum over every position of terms
    that largely cancel, while their rounding errors do not, so relative to its largest entry it moves
    more: 6 % (measured 2-4 % for conv1, whose gradient went through every bf16 backward; under 1.5 %
    for the others)."""
    net = small_net()
    loss32, grads32 = forward_backward(net)
    net.precision = "bf16"
    loss16, grads16 = forward_backward(net)
    assert net.blob_data["pool1"].dtype == torch.bfloat16  # autocast did run the convolutions in bf16
    assert abs(float(loss16) - float(loss32)) <= 1e-2 * abs(float(loss32))
    for grad16, grad32 in zip(grads16, grads32):
        assert grad16.dtype == torch.float32 and relative(grad16, grad32) < 6e-2


def test_loss_layers_run_in_float32_and_give_float32_tops() -> None:
    net = small_net()
    net.precision = "bf16"
    seen: dict[str, tuple] = {}

    def record(layer, bottoms):
        ones = torch.ones(2, 2)
        seen[layer.name] = (tuple(b.dtype for b in bottoms), (ones @ ones).dtype)

    for layer in net.layers:
        layer.register_forward_pre_hook(record)
    loss = net.forward(feeds())
    float32 = torch.float32
    assert seen["crf"] == ((float32, float32), float32)  # float32 bottoms, autocast off inside
    assert seen["loss"][0][0] == float32 and seen["prob"][0] == (float32,)
    assert seen["score"][1] == torch.bfloat16  # the convolutions themselves run under autocast
    for name in ("loss", "accuracy", "prob", "crf"):
        assert net.blob_data[name].dtype == float32, name
    assert loss.dtype == float32 and set(net.outputs) == {"loss", "accuracy", "crf"}


def test_the_densecrf_module_under_autocast_gives_a_float32_loss_and_a_gradient() -> None:
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(1, 3, 10, 10, generator=generator) * 255
    logits = torch.randn(1, 3, 10, 10, generator=generator).bfloat16().requires_grad_(True)
    crf = DenseCRFLoss(weight=1e-3, sigma_rgb=15, sigma_xy=5, scale_factor=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probabilities = torch.softmax(logits, dim=1)
        loss = crf(images, probabilities, torch.ones(1, 10, 10))
    reference = crf(images, probabilities.detach().float(), torch.ones(1, 10, 10))  # the same, without autocast
    assert probabilities.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert float(loss.detach()) == float(reference)
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and bool(torch.isfinite(logits.grad.float()).all())


def test_weights_and_snapshots_stay_float32_after_a_bf16_step(tmp_path) -> None:
    net = small_net()
    net.precision = "bf16"
    forward_backward(net)
    with torch.no_grad():
        for param in net.learnable_tensors():
            param -= 0.1 * param.grad
    net.save(tmp_path / "step.caffemodel")
    saved = {layer.name: layer for layer in read_net_param(str(tmp_path / "step.caffemodel")).layer}
    for name, params in net.params.items():
        for param, blob in zip(params, saved[name].blobs):
            assert param.dtype == torch.float32 and len(blob.data) == param.numel() and not blob.double_data
            np.testing.assert_array_equal(blob_to_array(blob, name).reshape(param.shape), param.detach().numpy())


def test_pycaffe_shows_bf16_blobs_as_float32(tmp_path) -> None:
    net = caffe.Net(tiny_model(tmp_path), caffe.TRAIN, precision="bf16")
    assert net._net.precision == "bf16"
    outputs = net.forward(**{name: value.numpy() for name, value in feeds().items()})
    assert net._net.blob_data["score"].dtype == torch.bfloat16
    assert net.blobs["score"].data.dtype == np.float32 and outputs["loss"].dtype == np.float32
    net.backward()
    assert net.blobs["pool1"].diff.dtype == np.float32 and np.abs(net.blobs["pool1"].diff).max() > 0
    assert net.params["conv1"][0].diff.dtype == np.float32


# ---- fp16 loss scaling ----------------------------------------------------------------------------

def test_a_disabled_scaler_is_the_identity() -> None:
    scaler = LossScaler.for_precision("bf16")
    loss, grad = torch.tensor(2.5), torch.tensor([1.0, math.inf])
    assert scaler.scale(loss) is loss and scaler.unscale([grad]) and scaler.value == 1.0
    scaler.update(False)
    assert scaler.value == 1.0 and grad[1] == math.inf


def test_scaling_then_unscaling_gives_the_gradients_back_exactly() -> None:
    scaler = LossScaler.for_precision("fp16")
    assert scaler.value == 2.0 ** 16
    assert float(scaler.scale(torch.tensor(0.75))) == 0.75 * 2 ** 16
    grads = [torch.tensor([3.0, -1.5]) * 2 ** 16, torch.tensor([[0.1]]) * 2 ** 16]
    assert scaler.unscale(grads)
    assert grads[0].tolist() == [3.0, -1.5] and grads[1].item() == pytest.approx(0.1, rel=1e-7)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_overflow_is_reported_and_backs_off(bad) -> None:
    scaler = LossScaler.for_precision("fp16")
    assert not scaler.unscale([torch.ones(3), torch.tensor([1.0, bad])])
    scaler.update(False)
    assert scaler.value == 2.0 ** 15
    scaler.update(False)
    assert scaler.value == 2.0 ** 14


def test_growth_after_2000_finite_steps_in_a_row() -> None:
    scaler = LossScaler.for_precision("fp16")
    for _ in range(1999):
        scaler.update(True)
    scaler.update(False)  # an overflow restarts the count
    for _ in range(1999):
        scaler.update(True)
    assert scaler.value == 2.0 ** 15
    scaler.update(True)
    assert scaler.value == 2.0 ** 16
    resumed = LossScaler.for_precision("fp16")
    resumed.load_state_dict(scaler.state_dict())
    assert resumed.value == scaler.value and resumed.state_dict() == {"scale": 2.0 ** 16, "finite_steps": 0}


@needs_cpu_fp16
def test_an_fp16_step_that_overflows_is_caught() -> None:
    """The solver's sequence on a net in fp16: an absurd scale overflows float16 activations' gradients
    (largest 65504) into inf, unscale says so, and the scale backs off; a normal scale gives finite
    gradients equal to the unscaled ones."""
    net = small_net()
    net.precision = "fp16"
    huge = LossScaler(enabled=True, initial=2.0 ** 60)
    net.zero_grad(set_to_none=True)
    huge.scale(net.forward(feeds())).backward()
    assert not huge.unscale([p.grad for p in net.learnable_tensors()])
    huge.update(False)
    assert huge.value == 2.0 ** 59
    _, plain = forward_backward(net)
    scaler = LossScaler.for_precision("fp16")
    net.zero_grad(set_to_none=True)
    scaler.scale(net.forward(feeds())).backward()
    grads = [p.grad for p in net.learnable_tensors()]
    assert scaler.unscale(grads)
    for grad, reference in zip(grads, plain):
        assert relative(grad, reference) < 1e-2


# ---- the command line -----------------------------------------------------------------------------

def tiny_model(folder) -> str:
    path = folder / "small.prototxt"
    path.write_text(SMALL_NET.replace('name: "small"', 'name: "small" force_backward: true'))
    return str(path)


def test_unknown_precision_on_the_command_line_is_one_line_and_exit_1(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "rloss", "time", f"--model={tiny_model(tmp_path)}",
                             "--precision=fp64"], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert lines == ["rloss: error: --precision: unknown precision 'fp64' (known: fp32, bf16, fp16)"]


def test_time_runs_in_bf16_with_checkpointing(tmp_path, capsys) -> None:
    code = main(["time", f"--model={tiny_model(tmp_path)}", "--iterations=1", "--precision=bf16",
                 "--checkpoint-activations"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Average Forward-Backward:" in err


def test_infer_in_bf16_gives_float32_scores_close_to_fp32(setup, capsys) -> None:  # noqa: F811
    """The scores (a 1x1 convolution of mean-subtracted pixels) in bf16 are within 2 % of their range
    (inputs and weights rounded to 8 significant bits); the arg-max labels barely move."""
    root, _, _ = setup
    images = f"--images={root / 'val_images'}"
    assert infer(root, "fp32", images, f"--mat_write={root / 'fp32_mat'}") == 0
    assert infer(root, "bf16", images, f"--mat_write={root / 'bf16_mat'}", "--precision=bf16") == 0
    capsys.readouterr()
    for k in range(3):
        name = f"val_{k:04d}"
        plain, low = (scores_of(root / kind / f"{name}_blob_0.mat") for kind in ("fp32_mat", "bf16_mat"))
        assert np.abs(low - plain).max() <= 2e-2 * np.abs(plain).max()
        labels = [np.asarray(Image.open(root / kind / f"{name}.png")) for kind in ("fp32", "bf16")]
        assert (labels[0] == labels[1]).mean() > 0.95
