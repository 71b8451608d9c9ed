"""SegNet's fork: BN, Upsample and DenseImageData (rloss.layers.segnet), SoftmaxWithLoss's class
weighting and Dropout's sample_weights_test, against numpy written here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rloss.errors import DataError, LayerError
from rloss.proto import caffe_pb2
from tests.helpers import layer_from_text, relative_error

TEST = caffe_pb2.TEST
FILLERS = 'scale_filler { type: "gaussian" std: 1 } shift_filler { type: "gaussian" std: 1 }'


def bn(mode: str, tops: int = 1, shape=(3, 4, 5, 6)):
    top_text = " ".join(f'top: "t{i}"' for i in range(tops))
    return layer_from_text(f'name: "bn" type: "BN" bottom: "x" {top_text} bn_param {{ bn_mode: {mode} {FILLERS} }}',
                           [shape])


# ---- BN -----------------------------------------------------------------------------------------
def test_bn_learn_normalizes_by_the_batch_and_gives_its_mean_and_variance():
    torch.manual_seed(0)
    layer = bn("LEARN", tops=3)
    assert [tuple(b.shape) for b in layer.blobs] == [(1, 4, 1, 1), (1, 4, 1, 1)]
    x = torch.randn(3, 4, 5, 6) * 3 + 1
    y, mean, var = layer(x)
    xs = x.double().numpy()
    m = xs.mean(axis=(0, 2, 3), keepdims=True)
    v = (xs ** 2).mean(axis=(0, 2, 3), keepdims=True) - m ** 2
    scale, shift = (b.detach().double().numpy() for b in layer.blobs)
    assert relative_error(y, (xs - m) / np.sqrt(v + 1e-9) * scale + shift) < 1e-5
    assert relative_error(mean, m) < 1e-5 and relative_error(var, v) < 1e-5
    assert layer.top_shapes == [(3, 4, 5, 6), (1, 4, 1, 1), (1, 4, 1, 1)]


def test_bn_inference_applies_the_folded_scale_and_shift_only():
    torch.manual_seed(1)
    layer = bn("INFERENCE")
    x = torch.randn(2, 4, 5, 6)
    scale, shift = (b.detach().double().numpy() for b in layer.blobs)
    assert relative_error(layer(x)[0], x.double().numpy() * scale + shift) < 1e-6


@pytest.mark.parametrize("mode", ["LEARN", "INFERENCE"])
def test_bn_gradients_match_finite_differences_and_numpy(mode):
    torch.manual_seed(2)
    layer = bn(mode, shape=(2, 3, 3, 4)).double()
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,))
    dy = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    layer(x)[0].backward(dy)
    xs, g = x.detach().numpy(), dy.numpy()
    if mode == "LEARN":
        m = xs.mean(axis=(0, 2, 3), keepdims=True)
        xs = (xs - m) / np.sqrt(((xs - m) ** 2).mean(axis=(0, 2, 3), keepdims=True) + 1e-9)
    scale, shift = layer.blobs
    assert relative_error(scale.grad, (xs * g).sum(axis=(0, 2, 3), keepdims=True)) < 1e-8
    assert relative_error(shift.grad, g.sum(axis=(0, 2, 3), keepdims=True)) < 1e-12


def test_bn_errors():
    with pytest.raises(LayerError, match="INFERENCE has one top"):
        bn("INFERENCE", tops=2)
    with pytest.raises(LayerError, match="4 axes"):
        bn("LEARN", shape=(3, 4, 5))


# ---- Upsample -----------------------------------------------------------------------------------
def upsample(param: str, shape):
    return layer_from_text(f'name: "up" type: "Upsample" bottom: "x" bottom: "m" top: "y" upsample_param {{ {param} }}',
                           [shape, shape])


def unpool_reference(x: np.ndarray, mask: np.ndarray, height: int, width: int) -> np.ndarray:
    n, c = x.shape[:2]
    out = np.zeros((n, c, height * width))
    for i in range(n):
        for j in range(c):
            for value, index in zip(x[i, j].ravel(), mask[i, j].ravel().astype(int)):
                out[i, j, index] = value  # in order: a repeated index keeps the last value
    return out.reshape(n, c, height, width)


@pytest.mark.parametrize(("param", "shape", "out"), [
    ("scale: 2", (2, 3, 2, 3), (4, 6)),
    ("scale: 2 pad_out_h: true", (1, 2, 3, 2), (5, 4)),
    ("scale_h: 3 scale_w: 2", (1, 2, 2, 2), (6, 4)),
    ("upsample_h: 5 upsample_w: 7", (2, 2, 3, 4), (5, 7)),
])
def test_upsample_places_values_at_their_mask_index_and_gathers_the_gradient(param, shape, out):
    rng = np.random.default_rng(0)
    layer = upsample(param, shape)
    assert layer.top_shapes == [(*shape[:2], *out)]
    x = torch.randn(shape, requires_grad=True)
    mask = torch.from_numpy(rng.integers(0, out[0] * out[1], shape).astype(np.float32))  # repeats included
    y = layer(x, mask)[0]
    assert relative_error(y, unpool_reference(x.detach().numpy(), mask.numpy(), *out)) == 0
    dy = torch.randn(y.shape)
    y.backward(dy)
    flat = dy.reshape(*shape[:2], -1).numpy()
    index = mask.reshape(*shape[:2], -1).numpy().astype(int)
    expected = np.take_along_axis(flat, index, axis=2).reshape(shape)  # every input, overwritten ones too
    assert relative_error(x.grad, expected) == 0


def test_upsample_undoes_max_pooling_with_its_mask():
    pool = layer_from_text('name: "p" type: "Pooling" bottom: "x" top: "p" top: "m" pooling_param { pool: MAX '
                           'kernel_size: 2 stride: 2 }', [(1, 2, 5, 4)])
    x = torch.randn(1, 2, 5, 4)
    pooled, mask = pool(x)
    y = upsample("scale: 2 pad_out_h: true", tuple(pooled.shape))(pooled, mask)[0]
    kept = y != 0
    assert torch.equal(y[kept], x[kept]) and int(kept.sum()) == pooled.numel()


@pytest.mark.parametrize(("param", "message"), [
    ("scale: 1", "scale must be > 1"),
    ("scale: 3 pad_out_w: true", "pad_out_w needs a scale of 2"),
    ("scale: 2 scale_h: 2 scale_w: 2", "not with scale"),
    ("upsample_h: 1 upsample_w: 4", "upsample_h must be > 1"),
])
def test_upsample_parameter_errors(param, message):
    with pytest.raises(LayerError, match=message):
        upsample(param, (1, 1, 2, 2))


def test_upsample_refuses_a_mask_index_outside_the_output_and_unlike_bottoms():
    layer = upsample("scale: 2", (1, 1, 2, 2))
    with pytest.raises(LayerError, match="mask index 16 is outside the 4 x 4"):
        layer(torch.ones(1, 1, 2, 2), torch.tensor([[[[0.0, 1.0], [2.0, 16.0]]]]))
    with pytest.raises(LayerError, match="same shape"):
        layer_from_text('name: "up" type: "Upsample" bottom: "x" bottom: "m" top: "y"', [(1, 1, 2, 2), (1, 1, 2, 3)])


# ---- DenseImageData -----------------------------------------------------------------------------
def write_samples(folder: Path, count: int = 2, size=(6, 8)) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(3)
    images, labels, lines = [], [], []
    for k in range(count):
        rgb = rng.integers(0, 256, (*size, 3)).astype(np.uint8)
        label = rng.integers(0, 12, size).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"i{k}.png")
        Image.fromarray(label).save(folder / f"l{k}.png")
        images.append(rgb[:, :, ::-1].astype(np.float64))  # BGR, as Caffe reads it
        labels.append(label.astype(np.float64))
        lines.append(f"i{k}.png l{k}.png")
    source = folder / "list.txt"
    source.write_text("\n".join(lines) + "\n")
    return source, images, labels


def dense(folder: Path, source: Path, extra: str = "", transform: str = "", phase: int = caffe_pb2.TRAIN):
    text = (f'name: "d" type: "DenseImageData" top: "data" top: "label" dense_image_data_param {{ '
            f'source: "{source}" root_folder: "{folder}/" batch_size: 2 {extra} }} transform_param {{ {transform} }}')
    return layer_from_text(text, [], phase)


def test_dense_image_data_gives_normalized_images_and_raw_labels(tmp_path: Path):
    source, images, labels = write_samples(tmp_path)
    layer = dense(tmp_path, source, transform="scale: 0.5 mean_value: 10 mean_value: 20 mean_value: 30")
    try:
        assert layer.top_shapes == [(2, 3, 6, 8), (2, 1, 6, 8)]
        data, label = layer()
    finally:
        layer.close()
    mean = np.array([10.0, 20.0, 30.0])
    for k in range(2):
        assert relative_error(data[k], ((images[k] - mean) * 0.5).transpose(2, 0, 1)) < 1e-6
        assert relative_error(label[k, 0], labels[k]) == 0


def test_dense_image_data_crops_and_mirrors_image_and_label_together_in_any_phase(tmp_path: Path):
    source, images, labels = write_samples(tmp_path)
    torch.manual_seed(0)
    layer = dense(tmp_path, source, "crop_height: 4 crop_width: 5 mirror: true", phase=TEST)
    seen = set()
    try:
        assert layer.top_shapes == [(2, 3, 4, 5), (2, 1, 4, 5)]
        for _ in range(6):
            data, label = (top.numpy() for top in layer())
            for k in range(2):
                windows = [(r, c, flip) for r in range(3) for c in range(4) for flip in (False, True)
                           if np.array_equal(_window(labels[k], r, c, flip), label[k, 0])
                           and np.array_equal(_window(images[k], r, c, flip).transpose(2, 0, 1), data[k])]
                assert windows, "the crop of the data and the label must be one window of both"
                seen.update(windows)
    finally:
        layer.close()
    assert len(seen) > 3  # the window is drawn at random in the TEST phase too, and flipped


def _window(array: np.ndarray, row: int, column: int, flip: bool) -> np.ndarray:
    array = array[:, ::-1] if flip else array
    return array[row:row + 4, column:column + 5]


@pytest.mark.parametrize(("extra", "transform", "message"), [
    ("", "crop_size: 4", "refused by SegNet's fork"),
    ("", "mirror: true", "refused by SegNet's fork"),
    ("crop_height: 4", "", "both crop_height and crop_width"),
    ("new_height: 4", "", "both new_height and new_width"),
])
def test_dense_image_data_parameter_errors(tmp_path: Path, extra, transform, message):
    source, _, _ = write_samples(tmp_path)
    with pytest.raises(LayerError, match=message):
        dense(tmp_path, source, extra, transform)


def test_dense_image_data_refuses_an_image_smaller_than_the_crop(tmp_path: Path):
    source, _, _ = write_samples(tmp_path)
    layer = dense(tmp_path, source, "crop_height: 7 crop_width: 5")
    try:
        with pytest.raises(DataError, match="smaller than the crop 7x5"):
            layer()
    finally:
        layer.close()


# ---- SoftmaxWithLoss class weighting ------------------------------------------------------------
WEIGHTS = [0.5, 2.0, 1.5]


def weighted_loss(extra: str = "", weights=WEIGHTS, flag: str = "true"):
    values = " ".join(f"class_weighting: {w}" for w in weights)
    return layer_from_text(f'name: "l" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" loss_param {{ '
                           f'weight_by_label_freqs: {flag} ignore_label: 255 {values} {extra} }}',
                           [(2, 3, 4, 5), (2, 1, 4, 5)])


def labels_with_ignored(seed: int = 4) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (2, 1, 4, 5)).astype(np.float64)
    labels[0, 0, 0] = 255
    return torch.from_numpy(labels)


@pytest.mark.parametrize(("extra", "divisor"), [("", "count"), ("normalize: false", "batch")])
def test_weighted_softmax_loss_weighs_each_location_by_its_class(extra, divisor):
    scores = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    labels = labels_with_ignored()
    loss = weighted_loss(extra).double()(scores, labels)[0]
    s = scores.numpy()
    log_p = s - s.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    n, _, h, w = np.nonzero(labels.numpy() != 255)
    picked = log_p[n, labels.numpy()[n, 0, h, w].astype(int), h, w]
    weights = np.array(WEIGHTS)[labels.numpy()[n, 0, h, w].astype(int)]
    expected = -(weights * picked).sum() / (len(n) if divisor == "count" else 2)
    assert float(loss) == pytest.approx(expected, rel=1e-10)


def test_weighted_softmax_loss_gradient_and_the_flag():
    labels = labels_with_ignored(5)
    layer = weighted_loss().double()
    scores = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: layer(s, labels)[0], (scores,))
    plain = layer_from_text('name: "l" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" loss_param { '
                            'ignore_label: 255 }', [(2, 3, 4, 5), (2, 1, 4, 5)]).double()
    unflagged = weighted_loss(flag="false").double()  # class_weighting is read only with the flag
    values = [float(loss(scores.detach(), labels)[0]) for loss in (unflagged, plain, layer)]
    assert values[0] == values[1] != values[2]


def test_weighted_softmax_loss_needs_one_weight_per_class():
    with pytest.raises(LayerError, match="2 values for 3 classes"):
        weighted_loss(weights=[1.0, 2.0])


# ---- Dropout sample_weights_test ----------------------------------------------------------------
@pytest.mark.parametrize("sample", [False, True])
def test_dropout_drops_in_the_test_phase_only_with_sample_weights_test(sample):
    layer = layer_from_text(f'name: "d" type: "Dropout" bottom: "x" top: "y" dropout_param {{ dropout_ratio: 0.25 '
                            f'sample_weights_test: {str(sample).lower()} }}', [(64, 64)], TEST)
    x = torch.rand(64, 64) + 1
    y = layer(x)[0]
    if not sample:
        assert torch.equal(y, x)
        return
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.75) < 0.05
    assert torch.allclose(y[kept], x[kept] / 0.75) and math.isclose(layer.scale, 1 / 0.75, rel_tol=1e-6)
