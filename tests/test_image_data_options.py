"""ImageData, option by option, against BVLC Caffe master's ImageDataLayer and DataTransformer rules,
each checked on tiny images against a numpy/PIL reference written here: list lines split at the last
space, rand_skip, shuffle, new_height/new_width (OpenCV INTER_LINEAR), is_color, root_folder,
batch_size, scale, mean_value, mean_file, mirror, crop_size, and the fields Caffe ignores."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from PIL import Image

from rloss.errors import DataError, LayerError
from rloss.layers import layer_class
from rloss.proto import caffe_pb2


# ---- helpers --------------------------------------------------------------------------------------
def make_layer(source: Path, root: str = "", *, batch: int = 1, data: str = "", transform: str = "",
               phase=caffe_pb2.TEST, tops=("data", "label")):
    tops_text = " ".join(f'top: "{t}"' for t in tops)
    text = (f'name: "data" type: "ImageData" {tops_text} '
            f'image_data_param {{ source: "{source}" root_folder: "{root}" batch_size: {batch} {data} }} '
            f"transform_param {{ {transform} }}")
    return layer_class("ImageData")(text_format.Parse(text, caffe_pb2.LayerParameter()), [], phase)


def run(layer, batches: int = 1) -> list[list[np.ndarray]]:
    try:
        return [[top.numpy() for top in layer()] for _ in range(batches)]
    finally:
        layer.close()


def random_rgb(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray) -> np.ndarray:
    Image.fromarray(array).save(path)
    return array


def as_blob(bgr: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (C, H, W) float32, the layer's per-sample layout."""
    return bgr.astype(np.float32).transpose(2, 0, 1)


def numbered_images(tmp_path: Path, count: int, size=(4, 5)) -> Path:
    """`count` constant images whose blue value is 10 * index, listed with class = index."""
    for i in range(count):
        rgb = np.zeros(size + (3,), dtype=np.uint8)
        rgb[..., 2] = 10 * i
        save(tmp_path / f"im{i}.png", rgb)
    source = tmp_path / "list.txt"
    source.write_text("".join(f"{tmp_path}/im{i}.png {i}\n" for i in range(count)))
    return source


def sample_ids(batches: list[list[np.ndarray]]) -> list[int]:
    """The list index of every sample, from its blue value, checked against its label."""
    ids = [int(round(v / 10)) for data, _ in batches for v in data[:, 0, 0, 0]]
    assert ids == [int(v) for _, label in batches for v in label]
    return ids


def bilinear_half_pixel(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Textbook float bilinear with half-pixel centres, source positions clamped into the image
    (what OpenCV's INTER_LINEAR computes before its 11-bit fixed-point rounding)."""

    def taps(src: int, dst: int):
        position = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        first = np.floor(position).astype(int)
        return first, np.minimum(first + 1, src - 1), position - first

    top, bottom, dy = taps(image.shape[0], height)
    left, right, dx = taps(image.shape[1], width)
    pixels = image.astype(np.float64).reshape(image.shape[0], image.shape[1], -1)
    rows = pixels[top] * (1 - dy)[:, None, None] + pixels[bottom] * dy[:, None, None]
    out = rows[:, left] * (1 - dx)[None, :, None] + rows[:, right] * dx[None, :, None]
    return out.reshape((height, width) + image.shape[2:])


def write_mean_file(path: Path, mean_chw: np.ndarray) -> None:
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend((1,) + mean_chw.shape)
    blob.data.extend(mean_chw.ravel().tolist())
    path.write_bytes(blob.SerializeToString())


# ---- the list file --------------------------------------------------------------------------------
def test_a_line_splits_at_its_last_space_so_paths_may_hold_spaces(tmp_path):
    first = save(tmp_path / "my photo 1.png", random_rgb(1, 4, 5))
    second = save(tmp_path / "b.png", random_rgb(2, 4, 5))
    source = tmp_path / "list.txt"
    source.write_bytes(b"my photo 1.png 4\r\nb.png -3\n")  # CRLF: Caffe's atoi stops at the '\r'
    data, label = run(make_layer(source, str(tmp_path) + "/", batch=2))[0]
    assert label.tolist() == [4, -3] and label.dtype == np.float32 and label.shape == (2,)
    assert np.array_equal(data[0], as_blob(first[:, :, ::-1]))
    assert np.array_equal(data[1], as_blob(second[:, :, ::-1]))


def test_labels_are_int32_stored_as_float32(tmp_path):
    save(tmp_path / "a.png", random_rgb(1, 2, 2))
    source = tmp_path / "list.txt"
    source.write_text("a.png 16777217\na.png +2147483647\n")
    _, label = run(make_layer(source, str(tmp_path) + "/", batch=2))[0]
    assert label.tolist() == [np.float32(16777217), np.float32(2147483647)]  # int -> float rounding


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("a.png 1\n\na.png 2\n", "line 2 .* is empty"),
    ("a.png\n", "line 1 .* not 'path label'"),
    ("a.png\t1\n", "tabs do not separate"),
    (" 1\n", "not 'path label'"),
    ("a.png 1.5\n", "line 1 .* integer class .* got '1.5'"),
    ("a.png 1_0\n", "integer class"),
    ("a.png 1 \n", "integer class .* got ''"),
    ("a.png 2147483648\n", r"integer class \(int32\)"),
])
def test_bad_list_lines_are_refused_naming_the_line(tmp_path, text, message):
    save(tmp_path / "a.png", random_rgb(1, 2, 2))
    source = tmp_path / "list.txt"
    source.write_text(text)
    with pytest.raises(DataError, match=message):
        make_layer(source, str(tmp_path) + "/")


def test_missing_list_file(tmp_path):
    with pytest.raises(DataError, match="cannot read the list file"):
        make_layer(tmp_path / "absent.txt")


def test_root_folder_is_prepended_without_a_separator(tmp_path):
    image = save(tmp_path / "set_a.png", random_rgb(3, 3, 4))
    source = tmp_path / "list.txt"
    source.write_text("a.png 0\n")
    data, _ = run(make_layer(source, str(tmp_path / "set_")))[0]
    assert np.array_equal(data[0], as_blob(image[:, :, ::-1]))


# ---- order: shuffle and rand_skip --------------------------------------------------------------------
def test_without_shuffle_the_list_order_wraps_and_batches_straddle_the_end(tmp_path):
    source = numbered_images(tmp_path, 3)
    assert sample_ids(run(make_layer(source, batch=2), batches=3)) == [0, 1, 2, 0, 1, 2]


def test_shuffle_deals_a_new_permutation_every_pass(tmp_path):
    source = numbered_images(tmp_path, 4)
    torch.manual_seed(0)
    ids = sample_ids(run(make_layer(source, batch=3, data="shuffle: true"), batches=4))
    passes = [ids[i:i + 4] for i in range(0, 12, 4)]
    assert all(sorted(p) == [0, 1, 2, 3] for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_rand_skip_starts_at_a_draw_below_it(tmp_path):
    source = numbered_images(tmp_path, 5)
    starts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        ids = sample_ids(run(make_layer(source, batch=5, data="rand_skip: 3")))
        assert ids == [(ids[0] + i) % 5 for i in range(5)]  # the list order, from the skip on
        starts.add(ids[0])
    assert starts == {0, 1, 2}
    assert sample_ids(run(make_layer(source, batch=2, data="rand_skip: 0"))) == [0, 1]
    run(make_layer(source, data="rand_skip: 5"))  # every draw (0..4) is inside the list
    with pytest.raises(LayerError, match="rand_skip 6 is larger than the list"):
        make_layer(source, data="rand_skip: 6")


# ---- read-time options: new_height/new_width, is_color ------------------------------------------------
@pytest.mark.parametrize("height, width", [(5, 4), (3, 30), (16, 11)])
def test_new_size_is_bilinear_with_half_pixel_centres(tmp_path, height, width):
    rgb = save(tmp_path / "a.png", random_rgb(4, 9, 11))
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/a.png 0\n")
    data, _ = run(make_layer(source, data=f"new_height: {height} new_width: {width}"))[0]
    expected = bilinear_half_pixel(rgb[:, :, ::-1], height, width).transpose(2, 0, 1)
    assert data.shape == (1, 3, height, width)
    assert np.abs(data[0] - expected).max() <= 1  # OpenCV rounds through 11-bit fixed point


def test_new_size_resizes_before_the_crop(tmp_path):
    rgb = save(tmp_path / "a.png", random_rgb(5, 7, 9))
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/a.png 0\n")
    data, _ = run(make_layer(source, data="new_height: 10 new_width: 12", transform="crop_size: 4"))[0]
    resized = bilinear_half_pixel(rgb[:, :, ::-1], 10, 12).transpose(2, 0, 1)
    assert np.abs(data[0] - resized[:, 3:7, 4:8]).max() <= 1  # TEST: the centre crop of the resized image


@pytest.mark.parametrize("data", ["new_height: 5", "new_width: 5"])
def test_new_height_and_width_go_together(tmp_path, data):
    source = numbered_images(tmp_path, 1)
    with pytest.raises(LayerError, match="both new_height and new_width"):
        make_layer(source, data=data)


def test_is_color_false_reads_one_grey_channel(tmp_path):
    grey = save(tmp_path / "grey.png", random_rgb(6, 5, 6)[..., 0])
    rgb = save(tmp_path / "rgb.png", random_rgb(7, 5, 6))
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/grey.png 0\n{tmp_path}/rgb.png 1\n")
    data, _ = run(make_layer(source, batch=2, data="is_color: false", transform="mean_value: 10"))[0]
    assert data.shape == (2, 1, 5, 6)
    assert np.array_equal(data[0, 0], grey.astype(np.float32) - 10)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(data[1, 0] + 10 - luma).max() <= 1
    colour, _ = run(make_layer(source, batch=2))[0]
    assert np.array_equal(colour[0], as_blob(np.repeat(grey[:, :, None], 3, axis=2)))


def test_is_color_false_takes_one_mean_value(tmp_path):
    source = numbered_images(tmp_path, 1)
    with pytest.raises(LayerError, match="mean_value once or 1 times"):
        make_layer(source, data="is_color: false", transform="mean_value: 1 mean_value: 2 mean_value: 3")


def test_jpeg_images_are_decoded_as_bgr(tmp_path):
    Image.fromarray(random_rgb(8, 8, 8)).save(tmp_path / "a.jpg", quality=90)
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/a.jpg 0\n")
    data, _ = run(make_layer(source))[0]
    decoded = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))
    assert np.array_equal(data[0], as_blob(decoded[:, :, ::-1]))


# ---- images that cannot be used --------------------------------------------------------------------
def test_an_unreadable_first_image_fails_at_set_up_even_with_a_crop(tmp_path):
    source = tmp_path / "list.txt"
    source.write_text("nope.png 0\n")
    with pytest.raises(DataError, match=r"line 1 of the list .*nope\.png' does not exist"):
        make_layer(source, str(tmp_path) + "/", transform="crop_size: 2")
    (tmp_path / "nope.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"line 1 of the list .*cannot read the image .*nope\.png"):
        make_layer(source, str(tmp_path) + "/", transform="crop_size: 2")


def test_an_unreadable_later_image_fails_when_reached_naming_file_and_line(tmp_path):
    source = numbered_images(tmp_path, 1)
    source.write_text(source.read_text() + f"{tmp_path}/gone.png 1\n")
    layer = make_layer(source)
    try:
        layer()
        with pytest.raises(DataError, match=r"line 2 of the list .*gone\.png' does not exist"):
            layer()
    finally:
        layer.close()


def test_a_first_image_smaller_than_the_crop_fails_at_set_up(tmp_path):
    source = numbered_images(tmp_path, 1, size=(4, 5))
    with pytest.raises(DataError, match=r"im0\.png.* 4x5 image is smaller than the crop 5x5"):
        make_layer(source, transform="crop_size: 5")


# ---- batches ---------------------------------------------------------------------------------------
def test_batch_size_must_be_positive_and_there_are_two_tops(tmp_path):
    source = numbered_images(tmp_path, 1)
    with pytest.raises(LayerError, match="batch_size must be positive"):
        make_layer(source, batch=0)
    with pytest.raises(LayerError):
        make_layer(source, tops=("data",))


def test_each_batch_takes_the_shape_of_its_images_without_a_crop(tmp_path):
    save(tmp_path / "a.png", random_rgb(1, 3, 4))
    save(tmp_path / "b.png", random_rgb(2, 5, 2))
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/a.png 0\n{tmp_path}/b.png 1\n")
    shapes = [data.shape for data, _ in run(make_layer(source), batches=2)]
    assert shapes == [(1, 3, 3, 4), (1, 3, 5, 2)]
    with pytest.raises(DataError, match="line 2 .*same size"):
        run(make_layer(source, batch=2))


# ---- transform_param: scale, mean_value, mirror, crop_size -------------------------------------------
@pytest.mark.parametrize("means", [(), (100.5,), (104.008, 116.669, 122.675)])
def test_scale_and_mean_value_in_float32(tmp_path, means):
    rgb = save(tmp_path / "a.png", random_rgb(9, 4, 6))
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/a.png 0\n")
    transform = "scale: 0.017 " + " ".join(f"mean_value: {m}" for m in means)
    data, _ = run(make_layer(source, transform=transform))[0]
    mean = np.broadcast_to(np.float32(means or (0,)), (3,))
    expected = (rgb[:, :, ::-1].astype(np.float32) - mean) * np.float32(0.017)
    assert np.array_equal(data[0], expected.transpose(2, 0, 1))


def position_image(height: int, width: int) -> np.ndarray:
    """Every pixel codes its position: red = 16 * row + column (blue channel after BGR)."""
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[..., 0] = 16 * np.arange(height)[:, None] + np.arange(width)[None, :]
    rgb[..., 1] = 7
    return rgb


def test_train_crops_at_random_offsets_and_test_at_the_integer_centre(tmp_path):
    save(tmp_path / "a.png", position_image(7, 9))
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/a.png 0\n")
    torch.manual_seed(1)
    train, _ = run(make_layer(source, batch=40, transform="crop_size: 4", phase=caffe_pb2.TRAIN))[0]
    expected_window = 16 * np.arange(4)[:, None] + np.arange(4)[None, :]
    offsets = set()
    for crop in train:
        code = int(crop[2, 0, 0])
        assert np.array_equal(crop[2], expected_window + code) and np.all(crop[1] == 7)
        offsets.add(divmod(code, 16))
    assert offsets <= {(r, c) for r in range(4) for c in range(6)} and len(offsets) > 10
    test, _ = run(make_layer(source, transform="crop_size: 4"))[0]
    assert test[0, 2, 0, 0] == 16 * 1 + 2  # ((7 - 4) // 2, (9 - 4) // 2)


def test_mirror_flips_at_random_in_both_phases(tmp_path):
    rgb = save(tmp_path / "a.png", random_rgb(10, 3, 5))
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/a.png 0\n")
    plain = as_blob(rgb[:, :, ::-1])
    for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        torch.manual_seed(2)
        data, _ = run(make_layer(source, batch=16, transform="mirror: true", phase=phase))[0]
        flipped = [np.array_equal(d, plain[:, :, ::-1]) for d in data]
        assert all(f or np.array_equal(d, plain) for f, d in zip(flipped, data))
        assert 0 < sum(flipped) < 16


# ---- transform_param.mean_file ---------------------------------------------------------------------
def test_mean_file_is_subtracted_at_each_pixels_source_position(tmp_path):
    rgb = save(tmp_path / "a.png", random_rgb(11, 6, 7))
    mean = np.random.default_rng(12).uniform(0, 255, (3, 6, 7)).astype(np.float32)
    write_mean_file(tmp_path / "mean.binaryproto", mean)
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/a.png 0\n")
    torch.manual_seed(3)
    transform = f'mean_file: "{tmp_path}/mean.binaryproto" scale: 0.5 crop_size: 4 mirror: true'
    data, _ = run(make_layer(source, batch=12, transform=transform))[0]
    full = (as_blob(rgb[:, :, ::-1]) - mean) * np.float32(0.5)
    window = full[:, 1:5, 1:5]  # TEST: centre crop
    flipped = [np.array_equal(d, window[:, :, ::-1]) for d in data]
    assert all(f or np.array_equal(d, window) for f, d in zip(flipped, data))
    assert 0 < sum(flipped) < 12


def test_mean_file_matches_the_resized_image(tmp_path):
    rgb = save(tmp_path / "a.png", random_rgb(13, 6, 7))
    mean = np.full((3, 4, 5), 50.0, dtype=np.float32)
    write_mean_file(tmp_path / "mean.binaryproto", mean)
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/a.png 0\n")
    transform = f'mean_file: "{tmp_path}/mean.binaryproto"'
    data, _ = run(make_layer(source, data="new_height: 4 new_width: 5", transform=transform))[0]
    expected = bilinear_half_pixel(rgb[:, :, ::-1], 4, 5).transpose(2, 0, 1) - 50
    assert np.abs(data[0] - expected).max() <= 1
    with pytest.raises(DataError, match=r"line 1 .*a\.png.*3 x 6 x 7 differ from the mean file's 3 x 4 x 5"):
        make_layer(source, transform=transform)


def test_mean_file_errors(tmp_path):
    source = numbered_images(tmp_path, 1)
    write_mean_file(tmp_path / "mean.binaryproto", np.zeros((3, 4, 5), np.float32))
    mean_file = f'mean_file: "{tmp_path}/mean.binaryproto"'
    with pytest.raises(LayerError, match="mean_file or mean_value, not both"):
        make_layer(source, transform=f"{mean_file} mean_value: 1")
    with pytest.raises(LayerError, match="transform_param.mean_file: .*absent"):
        make_layer(source, transform=f'mean_file: "{tmp_path}/absent.binaryproto"')
    with pytest.raises(DataError, match="1 x 4 x 5 differ from the mean file's 3 x 4 x 5"):
        make_layer(source, data="is_color: false", transform=mean_file)


# ---- fields Caffe does not read -----------------------------------------------------------------------
def test_deprecated_image_data_param_transform_fields_are_ignored_with_a_warning(tmp_path, caplog):
    rgb = save(tmp_path / "a.png", random_rgb(14, 5, 6))
    source = tmp_path / "list.txt"
    source.write_text(f"{tmp_path}/a.png 0\n")
    with caplog.at_level(logging.WARNING, logger="rloss"):
        data, _ = run(make_layer(source, data='scale: 0.5 crop_size: 2 mirror: true mean_file: "x"'))[0]
    assert np.array_equal(data[0], as_blob(rgb[:, :, ::-1]))
    for field in ("scale", "crop_size", "mirror", "mean_file"):
        assert f"image_data_param.{field} is ignored" in caplog.text


def test_force_color_and_force_gray_are_ignored_with_a_warning(tmp_path, caplog):
    source = numbered_images(tmp_path, 1)
    with caplog.at_level(logging.WARNING, logger="rloss"):
        grey, _ = run(make_layer(source, data="is_color: false", transform="force_color: true"))[0]
        colour, _ = run(make_layer(source, transform="force_gray: true"))[0]
    assert grey.shape == (1, 1, 4, 5) and colour.shape == (1, 3, 4, 5)
    assert caplog.text.count("force_color/force_gray are ignored") == 2
