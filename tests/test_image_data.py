"""ImageSegData / ImageData: transforms checked pixel by pixel on real MSRC-21 images, resizing against
an independent implementation of OpenCV's rules, sample order, prefetching and errors."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from rloss.data import prefetch
from rloss.data.listfile import SampleOrder
from rloss.data.prefetch import Prefetcher
from rloss.data.resize import resize_linear, resize_nearest
from rloss.data.transform import scaled_size
from rloss.errors import DataError, LayerError
from rloss.layers import layer_class
from rloss.proto import caffe_pb2
from rloss.wiring import data_layers_to_inputs
from tests.shared_data import shared_path

MEAN = (104.008, 116.669, 122.675)
MSRC_IMAGES = ("10_10_s", "10_12_s", "10_15_s")  # 320 wide, 213 high


# ---- helpers --------------------------------------------------------------------------------------
def make_layer(source: Path, root: str, *, phase=caffe_pb2.TEST, batch: int = 1, crop: int | None = None,
               mirror: bool = False, shuffle: bool = False, scale_factors=(), label_type: str = "PIXEL",
               layer_type: str = "ImageSegData", tops=("data", "label", "data_dim"), data_extra: str = "",
               transform_extra: str = "", mean=MEAN):
    transform = " ".join(f"mean_value: {m}" for m in mean)
    transform += f" mirror: {str(mirror).lower()}"
    transform += "".join(f" scale_factors: {s}" for s in scale_factors)
    if crop:
        transform += f" crop_size: {crop}"
    transform += f" {transform_extra}"
    tops_text = " ".join(f'top: "{t}"' for t in tops)
    label_text = f"label_type: {label_type}" if layer_type == "ImageSegData" else ""
    text = (f'name: "data" type: "{layer_type}" {tops_text} '
            f'image_data_param {{ source: "{source}" root_folder: "{root}" batch_size: {batch} '
            f'shuffle: {str(shuffle).lower()} {label_text} {data_extra} }} '
            f"transform_param {{ {transform} }}")
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class(layer_type)(param, [], phase)


def run(layer, batches: int = 1) -> list[list[np.ndarray]]:
    try:
        return [[top.numpy() for top in layer()] for _ in range(batches)]
    finally:
        layer.close()


def msrc_list(tmp_path: Path, ids=MSRC_IMAGES, labels: str = "SegmentationClass") -> tuple[Path, str]:
    root = shared_path("data", "msrc21")
    source = tmp_path / "list.txt"
    source.write_text("".join(f"JPEGImages/{i}.jpg {labels}/{i}.png\n" for i in ids))
    return source, str(root) + "/"


def reference(image_id: str, labels: str = "SegmentationClass") -> tuple[np.ndarray, np.ndarray]:
    """(BGR - mean) as float32 (3, H, W) and the label indices (H, W), straight from the files."""
    root = shared_path("data", "msrc21")
    bgr = np.asarray(Image.open(root / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))[:, :, ::-1]
    data = (bgr.astype(np.float64) - np.float32(MEAN).astype(np.float64)).astype(np.float32)
    label = np.asarray(Image.open(root / labels / f"{image_id}.png")).astype(np.float32)
    return data.transpose(2, 0, 1), label


def locate(full: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
    """Every (row, column) at which `crop` (C, h, w) is exactly a window of `full` (C, H, W)."""
    height, width = crop.shape[1:]
    windows = sliding_window_view(full[0], (height, width))
    first_rows = np.all(windows[:, :, 0, :] == crop[0, 0], axis=-1)
    return [(int(r), int(c)) for r, c in np.argwhere(first_rows)
            if np.array_equal(full[:, r:r + height, c:c + width], crop)]


def write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def coded_dataset(tmp_path: Path, count: int, size=(6, 7)) -> tuple[Path, str]:
    """`count` tiny constant images whose blue value is 10 * index and whose label is the index."""
    for i in range(count):
        rgb = np.zeros(size + (3,), dtype=np.uint8)
        rgb[..., 2] = 10 * i
        write_png(tmp_path / f"im{i}.png", rgb)
        write_png(tmp_path / f"lab{i}.png", np.full(size, i, dtype=np.uint8))
    source = tmp_path / "coded.txt"
    source.write_text("".join(f"im{i}.png lab{i}.png\n" for i in range(count)))
    return source, str(tmp_path) + "/"


def sample_ids(batch: list[np.ndarray]) -> list[int]:
    return [int(round(v)) for v in batch[1][:, 0, 0, 0]]


# ---- OpenCV's resize rules, written independently from the library (per pixel, plain Python) -----
def _opencv_linear_coefficients(src: int, dst: int, clamp_taps: bool) -> list[tuple[int, int, int, int]]:
    scale = 1.0 / (dst / src)
    out = []
    for d in range(dst):
        f = np.float32((d + 0.5) * scale - 0.5)
        s = math.floor(f)
        frac = np.float32(f - np.float32(s))
        if clamp_taps and s < 0:
            s, frac = 0, np.float32(0)
        if clamp_taps and s >= src - 1:
            s, frac = src - 1, np.float32(0)
        w0 = int(np.rint(np.float32(np.float32(1) - frac) * np.float32(2048)))
        w1 = int(np.rint(frac * np.float32(2048)))
        out.append((min(max(s, 0), src - 1), min(max(s + 1, 0), src - 1), w0, w1))
    return out


def opencv_linear_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
    src = image.astype(np.int64)
    columns = _opencv_linear_coefficients(image.shape[1], width, clamp_taps=True)
    rows = _opencv_linear_coefficients(image.shape[0], height, clamp_taps=False)
    out = np.zeros((height, width) + image.shape[2:], dtype=np.uint8)
    for y, (r0, r1, b0, b1) in enumerate(rows):
        for x, (c0, c1, a0, a1) in enumerate(columns):
            h0 = src[r0, c0] * a0 + src[r0, c1] * a1
            h1 = src[r1, c0] * a0 + src[r1, c1] * a1
            value = (((h0 >> 4) * b0) >> 16) + (((h1 >> 4) * b1) >> 16)
            out[y, x] = np.clip((value + 2) >> 2, 0, 255)
    return out


def opencv_nearest_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
    fy, fx = 1.0 / (height / image.shape[0]), 1.0 / (width / image.shape[1])
    out = np.zeros((height, width) + image.shape[2:], dtype=image.dtype)
    for y in range(height):
        for x in range(width):
            out[y, x] = image[min(math.floor(y * fy), image.shape[0] - 1), min(math.floor(x * fx), image.shape[1] - 1)]
    return out


# ---- resize --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,size", [((7, 9, 3), (13, 5)), ((20, 15, 3), (10, 7)), ((5, 6), (10, 12)),
                                        ((11, 4, 3), (3, 17)), ((1, 8, 3), (4, 16)), ((9, 9), (9, 4))])
def test_linear_resize_follows_opencv_rules(shape, size):
    image = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    assert np.array_equal(resize_linear(image, *size), opencv_linear_reference(image, *size))


def test_linear_resize_of_constant_image_is_constant_and_exact_half_is_an_average():
    assert np.all(resize_linear(np.full((10, 14, 3), 77, np.uint8), 23, 9) == 77)
    image = np.random.default_rng(0).integers(0, 256, size=(8, 12), dtype=np.uint8).astype(np.int64)
    blocks = image.reshape(4, 2, 6, 2).sum(axis=(1, 3))
    assert np.array_equal(resize_linear(image.astype(np.uint8), 4, 6), (blocks + 2) >> 2)


@pytest.mark.parametrize("shape,size", [((7, 9), (13, 5)), ((213, 320), (159, 240)), ((10, 3), (4, 7))])
def test_nearest_resize_follows_opencv_rule(shape, size):
    image = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    assert np.array_equal(resize_nearest(image, *size), opencv_nearest_reference(image, *size))


def test_scaled_sizes_truncate_a_float32_product():
    assert scaled_size(213, 320, 0.75) == (159, 240)
    assert scaled_size(213, 320, 1.5) == (319, 480)
    # float32(10) * float32(0.7) rounds to 7.0 in float32 (Caffe's arithmetic); in double it is 6.99...
    assert scaled_size(10, 10, 0.7) == (7, 7)


# ---- transforms on real images ---------------------------------------------------------------------
def test_small_images_are_padded_bottom_right_with_zero_data_and_ignore_label(tmp_path):
    source, root = msrc_list(tmp_path)
    data, label, data_dim = run(make_layer(source, root, batch=3, crop=321))[0]
    assert data.shape == (3, 3, 321, 321) and label.shape == (3, 1, 321, 321) and data_dim.shape == (3, 1, 1, 2)
    for n, image_id in enumerate(MSRC_IMAGES):
        ref_data, ref_label = reference(image_id)
        height, width = ref_label.shape
        assert np.array_equal(data[n, :, :height, :width], ref_data)
        assert np.array_equal(label[n, 0, :height, :width], ref_label)
        assert np.all(data[n, :, height:] == 0) and np.all(data[n, :, :, width:] == 0)
        assert np.all(label[n, 0, height:] == 255) and np.all(label[n, 0, :, width:] == 255)
        assert data_dim[n].ravel().tolist() == [height, width]


def test_train_crops_are_source_windows_at_random_offsets_in_range(tmp_path):
    torch.manual_seed(0)
    source, root = msrc_list(tmp_path)
    batches = run(make_layer(source, root, phase=caffe_pb2.TRAIN, batch=3, crop=150), batches=4)
    offsets = {image_id: set() for image_id in MSRC_IMAGES}
    for data, label, data_dim in batches:
        assert np.all(data_dim.reshape(-1, 2) == 150)
        for n, image_id in enumerate(MSRC_IMAGES):
            ref_data, ref_label = reference(image_id)
            found = locate(ref_data, data[n])
            assert found, f"crop {n} is not a window of {image_id}"
            row, column = found[0]
            assert 0 <= row <= ref_label.shape[0] - 150 and 0 <= column <= ref_label.shape[1] - 150
            assert np.array_equal(label[n, 0], ref_label[row:row + 150, column:column + 150])
            offsets[image_id].add((row, column))
    assert all(len(seen) > 1 for seen in offsets.values()), offsets


def test_test_phase_takes_the_integer_centre_crop(tmp_path):
    source, root = msrc_list(tmp_path, ids=MSRC_IMAGES[:1])
    data, label, data_dim = run(make_layer(source, root, crop=101), batches=2)[1]
    ref_data, ref_label = reference(MSRC_IMAGES[0])
    row, column = (213 - 101) // 2, (320 - 101) // 2
    assert np.array_equal(data[0], ref_data[:, row:row + 101, column:column + 101])
    assert np.array_equal(label[0, 0], ref_label[row:row + 101, column:column + 101])
    assert data_dim.ravel().tolist() == [101, 101]


def test_mirror_flips_data_and_label_together(tmp_path):
    torch.manual_seed(3)
    source, root = msrc_list(tmp_path, ids=MSRC_IMAGES[1:2])
    ref_data, ref_label = reference(MSRC_IMAGES[1])
    plain_data = np.zeros((3, 321, 321), np.float32)
    plain_data[:, :213, :320] = ref_data
    plain_label = np.full((321, 321), 255, np.float32)
    plain_label[:213, :320] = ref_label
    flips = []
    for data, label, data_dim in run(make_layer(source, root, crop=321, mirror=True), batches=12):
        flipped = np.array_equal(data[0], plain_data[:, :, ::-1])
        assert flipped or np.array_equal(data[0], plain_data)
        assert np.array_equal(label[0, 0], plain_label[:, ::-1] if flipped else plain_label)
        assert data_dim.ravel().tolist() == [213, 320]
        flips.append(flipped)
    assert any(flips) and not all(flips)


def test_scale_factor_resizes_image_bilinear_and_label_nearest(tmp_path):
    source, root = msrc_list(tmp_path, ids=MSRC_IMAGES[:1], labels="scribbles")
    data, label, data_dim = run(make_layer(source, root, crop=400, scale_factors=[0.75]))[0]
    image = np.asarray(Image.open(Path(root) / "JPEGImages" / f"{MSRC_IMAGES[0]}.jpg").convert("RGB"))[:, :, ::-1]
    raw_label = np.asarray(Image.open(Path(root) / "scribbles" / f"{MSRC_IMAGES[0]}.png"))
    height, width = 159, 240  # (int)(213 * 0.75), (int)(320 * 0.75)
    scaled = opencv_linear_reference(np.ascontiguousarray(image), height, width)
    expected = (scaled.astype(np.float64) - np.float32(MEAN).astype(np.float64)).astype(np.float32)
    assert np.array_equal(data[0, :, :height, :width], expected.transpose(2, 0, 1))
    assert np.all(data[0, :, height:] == 0) and np.all(data[0, :, :, width:] == 0)
    assert np.array_equal(label[0, 0, :height, :width], opencv_nearest_reference(raw_label, height, width))
    assert np.all(label[0, 0, height:] == 255)
    assert data_dim.ravel().tolist() == [213, 320]  # the size before scaling


def test_scale_up_then_centre_crop(tmp_path):
    source, root = msrc_list(tmp_path, ids=MSRC_IMAGES[:1])
    data, label, data_dim = run(make_layer(source, root, crop=321, scale_factors=[1.5]))[0]
    image = np.asarray(Image.open(Path(root) / "JPEGImages" / f"{MSRC_IMAGES[0]}.jpg").convert("RGB"))[:, :, ::-1]
    scaled = resize_linear(np.ascontiguousarray(image), 319, 480)
    expected = (scaled.astype(np.float64) - np.float32(MEAN).astype(np.float64)).astype(np.float32)
    column = (480 - 321) // 2  # rows: 319 padded to 321, offset 0
    assert np.array_equal(data[0, :, :319], expected[:, column:column + 321].transpose(2, 0, 1))
    assert np.all(data[0, :, 319:] == 0) and np.all(label[0, 0, 319:] == 255)
    assert data_dim.ravel().tolist() == [213, 320]


def test_scale_factors_are_picked_at_random(tmp_path):
    torch.manual_seed(1)
    source, root = msrc_list(tmp_path, ids=MSRC_IMAGES[:1])
    extents = set()
    for data, _, _ in run(make_layer(source, root, crop=500, scale_factors=[0.5, 1.5]), batches=10):
        valid = np.any(data[0] != 0, axis=0)  # mean-subtracted pixels are never exactly 0
        extents.add((int(valid.any(axis=1).sum()), int(valid.any(axis=0).sum())))
    assert extents == {(106, 160), (319, 480)}


# ---- order, batching, determinism ------------------------------------------------------------------
def test_unshuffled_order_wraps_and_batches_straddle_the_end(tmp_path):
    source, root = coded_dataset(tmp_path, 5)
    batches = run(make_layer(source, root, batch=3), batches=4)
    assert [sample_ids(b) for b in batches] == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]
    data = batches[0][0]
    assert np.allclose(data[:, 2, 0, 0] + np.float32(MEAN[2]), [0, 0, 0])
    assert np.allclose(data[:, 0, 0, 0] + np.float32(MEAN[0]), [0, 10, 20])


def test_shuffle_reshuffles_at_every_wrap(tmp_path):
    torch.manual_seed(7)
    source, root = coded_dataset(tmp_path, 5)
    samples = [i for b in run(make_layer(source, root, batch=3, shuffle=True), batches=10) for i in sample_ids(b)]
    epochs = [samples[i:i + 5] for i in range(0, 30, 5)]
    assert all(sorted(epoch) == [0, 1, 2, 3, 4] for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1


def test_sample_order_is_a_function_of_torch_seed_not_of_timing(tmp_path, monkeypatch):
    source, root = msrc_list(tmp_path)

    def outputs(seed: int, workers: int):
        monkeypatch.setattr(prefetch, "default_workers", lambda: workers)
        torch.manual_seed(seed)
        layer = make_layer(source, root, phase=caffe_pb2.TRAIN, batch=2, crop=120, mirror=True, shuffle=True,
                           scale_factors=[0.5, 0.75, 1.0])
        return run(layer, batches=4)

    first, again, other = outputs(11, 1), outputs(11, 3), outputs(12, 2)
    assert all(np.array_equal(a, b) for x, y in zip(first, again) for a, b in zip(x, y))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(first, other))


def test_rand_skip_starts_inside_the_list(tmp_path):
    source, root = coded_dataset(tmp_path, 4)
    starts = set()
    for seed in range(8):
        torch.manual_seed(seed)
        starts.add(sample_ids(run(make_layer(source, root, data_extra="rand_skip: 4"))[0])[0])
    assert starts <= {0, 1, 2, 3} and len(starts) > 1


def test_sample_order_cursor():
    order = SampleOrder(4, shuffle=False, rng=np.random.default_rng(0), skip=3)
    assert order.take(6) == [3, 0, 1, 2, 3, 0] and order.epoch == 2


# ---- tops, label types, sizes ------------------------------------------------------------------------
def test_two_named_tops_still_give_three(tmp_path):
    source, root = coded_dataset(tmp_path, 2)
    layer = make_layer(source, root, batch=2, crop=9, tops=("data", "label"))
    assert layer.num_tops == 3 and layer.top_shapes == [(2, 3, 9, 9), (2, 1, 9, 9), (2, 1, 1, 2)]
    tops = run(layer)[0]
    assert [t.shape for t in tops] == [(2, 3, 9, 9), (2, 1, 9, 9), (2, 1, 1, 2)]
    assert tops[2].reshape(2, 2).tolist() == [[6, 7], [6, 7]]


def test_label_types_image_and_none(tmp_path):
    source, root = coded_dataset(tmp_path, 1)
    source.write_text("im0.png 7\n")
    label = run(make_layer(source, root, crop=8, label_type="IMAGE"))[0][1][0, 0]
    assert np.all(label[:6, :7] == 7) and np.all(label[6:] == 255) and np.all(label[:, 7:] == 255)
    source.write_text("im0.png\n")
    label = run(make_layer(source, root, label_type="NONE", data_extra="ignore_label: 250"))[0][1]
    assert label.shape == (1, 1, 6, 7) and np.all(label == 250)


def test_rectangular_crop(tmp_path):
    source, root = coded_dataset(tmp_path, 1)
    data, label, data_dim = run(make_layer(source, root, transform_extra="crop_height: 4 crop_width: 9"))[0]
    assert data.shape == (1, 3, 4, 9) and data_dim.ravel().tolist() == [4, 7]
    assert np.all(label[0, 0, :, 7:] == 255) and np.all(label[0, 0, :, :7] == 0)
    with pytest.raises(LayerError, match="not both"):
        make_layer(source, root, crop=5, transform_extra="crop_height: 4 crop_width: 9")
    with pytest.raises(LayerError, match="both crop_height and crop_width"):
        make_layer(source, root, transform_extra="crop_height: 4")


def test_without_crop_the_tops_have_the_image_size(tmp_path):
    source, root = coded_dataset(tmp_path, 2, size=(5, 8))
    layer = make_layer(source, root, batch=2)
    assert layer.top_shapes[0] == (2, 3, 5, 8)
    data, label, data_dim = run(layer)[0]
    assert data.shape == (2, 3, 5, 8) and data_dim.reshape(2, 2).tolist() == [[5, 8], [5, 8]]


def test_without_crop_images_of_a_batch_must_match(tmp_path):
    source, root = coded_dataset(tmp_path, 2, size=(5, 8))
    write_png(tmp_path / "im1.png", np.zeros((6, 8, 3), np.uint8))
    write_png(tmp_path / "lab1.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(DataError, match="line 2 of the list .*same size"):
        run(make_layer(source, root, batch=2))


def test_new_height_width_resize_at_read_time(tmp_path):
    rng = np.random.default_rng(4)
    write_png(tmp_path / "a.png", rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    write_png(tmp_path / "a_label.png", rng.integers(0, 21, (9, 11), dtype=np.uint8))
    source = tmp_path / "list.txt"
    source.write_text("a.png a_label.png\n")
    data, label, data_dim = run(make_layer(source, str(tmp_path) + "/", mean=(0, 0, 0),
                                           data_extra="new_height: 13 new_width: 6"))[0]
    rgb = np.asarray(Image.open(tmp_path / "a.png"))
    assert np.array_equal(data[0].transpose(1, 2, 0), opencv_linear_reference(rgb[:, :, ::-1].copy(), 13, 6))
    raw = np.asarray(Image.open(tmp_path / "a_label.png"))
    assert np.array_equal(label[0, 0], opencv_nearest_reference(raw, 13, 6))
    assert data_dim.ravel().tolist() == [13, 6]


# ---- errors --------------------------------------------------------------------------------------------
def test_missing_image_names_file_and_list_line(tmp_path):
    source, root = coded_dataset(tmp_path, 2)
    source.write_text("im0.png lab0.png\nnope.png lab1.png\n")
    layer = make_layer(source, root)
    try:
        layer()
        with pytest.raises(DataError, match=r"line 2 of the list .*nope\.png.* does not exist"):
            layer()
    finally:
        layer.close()


def test_image_and_label_of_different_sizes(tmp_path):
    source, root = coded_dataset(tmp_path, 1)
    write_png(tmp_path / "lab0.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(DataError, match=r"line 1 .*im0\.png' is 6x7 but the label .*lab0\.png' is 6x8"):
        run(make_layer(source, root))


def test_colour_label_image_is_refused(tmp_path):
    source, root = coded_dataset(tmp_path, 1)
    write_png(tmp_path / "lab0.png", np.zeros((6, 7, 3), np.uint8))
    with pytest.raises(DataError, match=r"lab0\.png' is a RGB colour image"):
        run(make_layer(source, root))


def test_unreadable_image(tmp_path):
    source, root = coded_dataset(tmp_path, 1)
    (tmp_path / "im0.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"line 1 .*cannot read the image .*im0\.png"):
        run(make_layer(source, root))


@pytest.mark.parametrize("text,message", [
    ("", "is empty"),
    ("im0.png lab0.png\n\nim0.png lab0.png\n", "line 2 .* empty"),
    ("im0.png\n", "line 1 .* no label token"),
])
def test_bad_list_files(tmp_path, text, message):
    source, root = coded_dataset(tmp_path, 1)
    source.write_text(text)
    with pytest.raises(DataError, match=message):
        make_layer(source, root)


def test_missing_list_file(tmp_path):
    with pytest.raises(DataError, match="cannot read the list file"):
        make_layer(tmp_path / "absent.txt", "")


def test_bad_parameters(tmp_path):
    source, root = coded_dataset(tmp_path, 1)
    with pytest.raises(LayerError, match="mean_value once or 3 times"):
        make_layer(source, root, mean=(1, 2))
    with pytest.raises(LayerError, match="new_height and new_width"):
        make_layer(source, root, data_extra="new_height: 5")
    with pytest.raises(LayerError, match="scale_factors must be positive"):
        make_layer(source, root, scale_factors=[0])
    with pytest.raises(LayerError, match="ignore_label must be in 0..255"):
        make_layer(source, root, data_extra="ignore_label: 300")
    source.write_text("im0.png x\n")
    with pytest.raises(DataError, match="integer label"):
        make_layer(source, root, label_type="IMAGE")


# ---- ImageData -------------------------------------------------------------------------------------------
def test_image_data_gives_images_and_classes(tmp_path):
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        write_png(tmp_path / f"{name}.png", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    source = tmp_path / "list.txt"
    source.write_text("a.png 3\nb.png 17\n")
    root = str(tmp_path) + "/"
    data, label = run(make_layer(source, root, batch=2, layer_type="ImageData", tops=("data", "label")))[0]
    assert label.tolist() == [3, 17] and data.shape == (2, 3, 10, 12)
    rgb = np.asarray(Image.open(tmp_path / "b.png"))
    expected = (rgb[:, :, ::-1].astype(np.float32) - np.float32(MEAN)).transpose(2, 0, 1)
    assert np.array_equal(data[1], expected)
    grey, _ = run(make_layer(source, root, batch=2, layer_type="ImageData", tops=("data", "label"),
                             mean=(0,), crop=8, data_extra="is_color: false"))[0]
    assert grey.shape == (2, 1, 8, 8)
    red, green, blue = (rgb[..., i].astype(np.int64) for i in range(3))
    luma = (9797 * red + 19234 * green + 3737 * blue) >> 15  # libpng's fixed-point 0.299 / 0.587 / rest
    assert np.array_equal(grey[1, 0], luma[1:9, 2:10].astype(np.float32))  # TEST: centre crop


@pytest.mark.parametrize("layer_type, tops, data_extra, mean", [
    ("ImageSegData", ("data", "label", "data_dim"), "", MEAN),
    ("ImageData", ("data", "label"), "", MEAN),
    ("ImageData", ("data", "label"), "is_color: false", (0,)),
])
def test_fed_inputs_take_the_layers_own_top_shapes(tmp_path, layer_type, tops, data_extra, mean):
    """data_layers_to_inputs declares, for each data layer it replaces, the shapes the layer gives."""
    for name in ("a", "b"):
        write_png(tmp_path / f"{name}.png", np.zeros((10, 12, 3), np.uint8))
        write_png(tmp_path / f"{name}_label.png", np.zeros((10, 12), np.uint8))
    source = tmp_path / "list.txt"
    source.write_text("".join(f"{n}.png {n}_label.png\n" if layer_type == "ImageSegData" else f"{n}.png 1\n"
                              for n in ("a", "b")))
    layer = make_layer(source, str(tmp_path) + "/", batch=2, crop=8, layer_type=layer_type, tops=tops,
                       data_extra=data_extra, mean=mean)
    layer.close()
    net = caffe_pb2.NetParameter()
    net.layer.add().CopyFrom(layer.param)
    fed = data_layers_to_inputs(net)
    assert list(fed.input) == list(tops) and not len(fed.layer)
    assert [tuple(shape.dim) for shape in fed.input_shape] == layer.top_shapes


def test_image_data_refuses_images_smaller_than_the_crop(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((10, 12, 3), np.uint8))
    source = tmp_path / "list.txt"
    source.write_text("a.png 1\n")
    with pytest.raises(DataError, match=r"a\.png.*smaller than the crop 11x11"):
        run(make_layer(source, str(tmp_path) + "/", crop=11, layer_type="ImageData", tops=("data", "label")))


# ---- prefetching ------------------------------------------------------------------------------------------
def test_prefetcher_keeps_plan_order_whatever_the_timing():
    rng = np.random.default_rng(0)
    planned = iter(range(1000))

    def slow_identity(item: int) -> int:
        time.sleep(float(rng.uniform(0, 0.004)))
        return item

    loader = Prefetcher(lambda: [next(planned) for _ in range(3)], slow_identity, depth=4, workers=3)
    try:
        assert [loader.next() for _ in range(6)] == [[3 * k, 3 * k + 1, 3 * k + 2] for k in range(6)]
    finally:
        loader.close()


def test_prefetcher_counts_waiting_and_reports_worker_errors():
    calls = iter(range(1000))

    def load(item: int) -> int:
        time.sleep(0.02)
        if item == 1:
            raise DataError("bad sample 1")
        return item

    loader = Prefetcher(lambda: [next(calls)], load, depth=2, workers=1)
    try:
        assert loader.next() == [0]
        assert loader.waited_seconds > 0.005
        with pytest.raises(DataError, match="bad sample 1"):
            loader.next()
        assert loader.next() == [2]
    finally:
        loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        loader.next()


def test_layer_close_stops_its_worker_threads(tmp_path):
    source, root = coded_dataset(tmp_path, 2)
    layer = make_layer(source, root)
    name = f"rloss-data-{layer.name}"
    layer()
    assert layer.data_wait_seconds >= 0
    layer.close()
    deadline = time.time() + 5
    while any(t.name.startswith(name) and t.is_alive() for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.name.startswith(name) and t.is_alive() for t in threading.enumerate())
