"""pycaffe's caffe.io in rloss.caffe.io: the Transformer against numpy formulas of pycaffe's order of
operations, image loading and resizing against values derived by hand, oversample's crop positions,
and the blob/datum conversions (with Caffe's legacy 4-D blob fields)."""

from __future__ import annotations

import io as bytes_io

import numpy as np
import pytest
from PIL import Image

from rloss import caffe
from rloss.errors import DataError, NetError, ProtoError
from rloss.proto import caffe_pb2

RNG = np.random.default_rng(7)
INPUT_SHAPE = (1, 3, 4, 5)


def configured_transformer(mean=None) -> caffe.io.Transformer:
    transformer = caffe.io.Transformer({"data": INPUT_SHAPE})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_channel_swap("data", (2, 1, 0))
    transformer.set_raw_scale("data", 255.0)
    transformer.set_mean("data", np.array([104.0, 117.0, 123.0]) if mean is None else mean)
    transformer.set_input_scale("data", 0.5)
    return transformer


# ---- Transformer -----------------------------------------------------------------------------------

def test_preprocess_applies_pycaffe_steps_in_order():
    image = RNG.uniform(0, 1, (4, 5, 3)).astype(np.float32)
    expected = (image.transpose(2, 0, 1)[::-1] * 255.0 - np.array([104.0, 117.0, 123.0])[:, None, None]) * 0.5
    result = configured_transformer().preprocess("data", image)
    assert result.dtype == np.float32 and result.shape == (3, 4, 5)
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-4)


def test_preprocess_leaves_the_callers_array_alone():
    image = RNG.uniform(0, 1, (4, 5, 3)).astype(np.float32)
    kept = image.copy()
    configured_transformer().preprocess("data", image)
    np.testing.assert_array_equal(image, kept)


def test_preprocess_resizes_to_the_input_size_first():
    transformer = caffe.io.Transformer({"data": INPUT_SHAPE})
    transformer.set_transpose("data", (2, 0, 1))
    constant = np.full((8, 10, 3), 0.25, dtype=np.float32)
    result = transformer.preprocess("data", constant)
    assert result.shape == (3, 4, 5)
    np.testing.assert_array_equal(result, 0.25)


def test_deprocess_inverts_preprocess():
    image = RNG.uniform(0, 1, (4, 5, 3)).astype(np.float32)
    transformer = configured_transformer()
    blob = transformer.preprocess("data", image)
    np.testing.assert_allclose(transformer.deprocess("data", blob), image, atol=1e-5)
    np.testing.assert_allclose(transformer.deprocess("data", blob[np.newaxis]), image, atol=1e-5)  # a batch of one


def test_deprocess_of_a_grey_input_keeps_its_channel():
    transformer = caffe.io.Transformer({"data": (1, 1, 3, 4)})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_raw_scale("data", 255.0)
    image = RNG.uniform(0, 1, (3, 4, 1)).astype(np.float32)
    blob = transformer.preprocess("data", image)
    np.testing.assert_allclose(blob, image.transpose(2, 0, 1) * 255.0, rtol=1e-6)
    np.testing.assert_allclose(transformer.deprocess("data", blob[np.newaxis]), image, atol=1e-6)


def test_mean_image_is_subtracted_elementwise():
    mean = RNG.uniform(50, 150, (3, 4, 5))
    image = RNG.uniform(0, 1, (4, 5, 3)).astype(np.float32)
    expected = (image.transpose(2, 0, 1)[::-1] * 255.0 - mean) * 0.5
    np.testing.assert_allclose(configured_transformer(mean).preprocess("data", image), expected, rtol=1e-5, atol=1e-4)


def test_two_dimensional_mean_applies_to_every_channel():
    mean = RNG.uniform(50, 150, (4, 5))
    image = RNG.uniform(0, 1, (4, 5, 3)).astype(np.float32)
    expected = (image.transpose(2, 0, 1)[::-1] * 255.0 - mean[None]) * 0.5
    np.testing.assert_allclose(configured_transformer(mean).preprocess("data", image), expected, rtol=1e-5, atol=1e-4)


def test_mean_image_of_another_size_is_resized():
    mean = np.stack([np.full((8, 10), value) for value in (10.0, 20.0, 30.0)])
    transformer = configured_transformer(mean)
    assert transformer.mean["data"].shape == (3, 4, 5)
    np.testing.assert_allclose(transformer.mean["data"], mean[:, :4, :5])  # constant channels stay constant


@pytest.mark.parametrize("mean", [np.zeros(4), np.zeros((2, 4, 5)), np.zeros((1, 3, 4, 5))])
def test_set_mean_rejects_shapes_that_fit_no_input(mean):
    with pytest.raises(NetError, match="set_mean"):
        caffe.io.Transformer({"data": INPUT_SHAPE}).set_mean("data", mean)


def test_transpose_and_channel_swap_lengths_are_checked():
    transformer = caffe.io.Transformer({"data": INPUT_SHAPE})
    with pytest.raises(NetError, match="3 axes"):
        transformer.set_transpose("data", (1, 0))
    with pytest.raises(NetError, match="3 entries"):
        transformer.set_channel_swap("data", (1, 0))


def test_unknown_input_is_named():
    with pytest.raises(NetError, match="'label' is not one of the net inputs"):
        caffe.io.Transformer({"data": INPUT_SHAPE}).set_raw_scale("label", 255)


# ---- load_image ------------------------------------------------------------------------------------

def test_load_colour_png(tmp_path):
    pixels = RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "c.png")
    image = caffe.io.load_image(str(tmp_path / "c.png"))
    assert image.dtype == np.float32 and image.shape == (5, 6, 3)
    np.testing.assert_allclose(image, pixels / 255.0, rtol=1e-6)
    grey = caffe.io.load_image(str(tmp_path / "c.png"), color=False)
    expected = pixels @ np.array([0.2125, 0.7154, 0.0721]) / 255.0  # skimage's rgb2gray weights
    assert grey.shape == (5, 6, 1)
    np.testing.assert_allclose(grey[:, :, 0], expected, rtol=1e-6)


def test_load_grey_png(tmp_path):
    pixels = RNG.integers(0, 256, (5, 6), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "g.png")
    colour = caffe.io.load_image(str(tmp_path / "g.png"))
    assert colour.shape == (5, 6, 3)
    for channel in range(3):
        np.testing.assert_allclose(colour[:, :, channel], pixels / 255.0, rtol=1e-6)
    grey = caffe.io.load_image(str(tmp_path / "g.png"), color=False)
    assert grey.shape == (5, 6, 1)
    np.testing.assert_allclose(grey[:, :, 0], pixels / 255.0, rtol=1e-6)


def test_load_sixteen_bit_png_scales_by_its_depth(tmp_path):
    pixels = RNG.integers(0, 65536, (4, 3), dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "g16.png")
    np.testing.assert_allclose(caffe.io.load_image(str(tmp_path / "g16.png"), color=False)[:, :, 0],
                               pixels / 65535.0, rtol=1e-6)


def test_load_rgba_png_drops_alpha(tmp_path):
    pixels = RNG.integers(0, 256, (4, 3, 4), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(caffe.io.load_image(str(tmp_path / "a.png")), pixels[:, :, :3] / 255.0, rtol=1e-6)


def test_load_jpeg(tmp_path):
    rows, cols = np.mgrid[0:16, 0:20]
    pixels = np.stack([rows * 12, cols * 10, np.full_like(rows, 128)], axis=2).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "c.jpg", quality=95)
    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "g.jpg", quality=95)
    colour = caffe.io.load_image(str(tmp_path / "c.jpg"))
    assert colour.shape == (16, 20, 3) and colour.dtype == np.float32
    np.testing.assert_allclose(colour, pixels / 255.0, atol=0.06)  # lossy, but a smooth image stays close
    assert caffe.io.load_image(str(tmp_path / "g.jpg")).shape == (16, 20, 3)
    assert caffe.io.load_image(str(tmp_path / "g.jpg"), color=False).shape == (16, 20, 1)


def test_unreadable_image_is_a_data_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        caffe.io.load_image(str(tmp_path / "bad.png"))
    with pytest.raises(DataError, match="missing.png"):
        caffe.io.load_image(str(tmp_path / "missing.png"))


# ---- resize_image ----------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3, 4])
def test_resize_shapes(channels):
    image = RNG.uniform(0, 1, (5, 7, channels))
    resized = caffe.io.resize_image(image, (9, 4))
    assert resized.shape == (9, 4, channels) and resized.dtype == np.float32


def test_resize_three_channels_on_the_pixel_area_grid_with_zero_border():
    # output x samples input x' = (x + 0.5) * in / out - 0.5; beyond the border the [0, 1]-scaled
    # image is 0, i.e. the image's minimum (skimage's mode='constant')
    row = np.array([2.0, 6.0])
    image = np.repeat(row[None, :, None], 3, axis=2)
    resized = caffe.io.resize_image(image, (1, 4))
    # x' = -0.25, 0.25, 0.75, 1.25: scaled values 0.75*0, 0.25, 0.75, 0.75*1 (+0.25 of the border 0)
    expected = 2.0 + 4.0 * np.array([0.0, 0.25, 0.75, 0.75])
    for channel in range(3):
        np.testing.assert_allclose(resized[0, :, channel], expected, rtol=1e-6)


def test_resize_down_averages_pairs():
    image = np.array([1.0, 3.0, 5.0, 9.0])[None, :, None]
    np.testing.assert_allclose(caffe.io.resize_image(image, (1, 2))[0, :, 0], [2.0, 7.0], rtol=1e-6)


def test_resize_other_channel_counts_align_corners():
    image = np.stack([np.array([[0.0, 4.0]]) + k for k in range(4)], axis=2)  # 1 x 2 x 4
    resized = caffe.io.resize_image(image, (1, 3))
    for k in range(4):
        np.testing.assert_allclose(resized[0, :, k], np.array([0.0, 2.0, 4.0]) + k, atol=1e-6)


def test_resize_constant_image_is_filled():
    resized = caffe.io.resize_image(np.full((3, 3, 3), 7.5), (5, 2))
    assert resized.shape == (5, 2, 3) and resized.dtype == np.float32
    np.testing.assert_array_equal(resized, 7.5)


def test_resize_rejects_a_two_dimensional_array():
    with pytest.raises(DataError, match="H x W x K"):
        caffe.io.resize_image(np.zeros((4, 4)), (2, 2))


# ---- oversample ------------------------------------------------------------------------------------

def positional_image(height: int, width: int, offset: float = 0.0) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([100.0 * rows + cols + offset, -(100.0 * rows + cols) - offset], axis=2)


def test_oversample_takes_corners_centre_and_mirrors():
    images = [positional_image(6, 8), positional_image(6, 8, offset=0.5)]
    crops = caffe.io.oversample(images, (3, 4))
    assert crops.shape == (20, 3, 4, 2) and crops.dtype == np.float32
    corners = [(0, 0), (0, 4), (3, 0), (3, 4), (1, 2)]  # centre: ((6 - 3) // 2, (8 - 4) // 2)
    for n, image in enumerate(images):
        for i, (top, left) in enumerate(corners):
            window = image[top:top + 3, left:left + 4]
            np.testing.assert_array_equal(crops[10 * n + i], window)
            np.testing.assert_array_equal(crops[10 * n + 5 + i], window[:, ::-1])


def test_oversample_centre_of_odd_sizes_rounds_down():
    crops = caffe.io.oversample([positional_image(7, 7)], (4, 4))
    assert crops[4, 0, 0, 0] == 101.0  # pycaffe: int(3.5 - 2) = 1 on both axes


def test_oversample_errors():
    with pytest.raises(DataError, match="does not fit"):
        caffe.io.oversample([positional_image(3, 3)], (4, 2))
    with pytest.raises(DataError, match="one shape"):
        caffe.io.oversample([positional_image(6, 8), positional_image(6, 7)], (3, 3))


# ---- blobs -----------------------------------------------------------------------------------------

def test_blobproto_round_trip_with_diff():
    data, diff = RNG.normal(size=(2, 3, 4)).astype(np.float32), RNG.normal(size=(2, 3, 4)).astype(np.float32)
    blob = caffe_pb2.BlobProto.FromString(caffe.io.array_to_blobproto(data, diff).SerializeToString())
    assert list(blob.shape.dim) == [2, 3, 4]
    assert caffe.io.blobproto_to_array(blob).dtype == np.float64
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), data)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob, return_diff=True), diff)


def test_blobproto_with_legacy_fields():
    blob = caffe_pb2.BlobProto(num=2, channels=3, height=1, width=2)
    blob.data.extend(range(12))
    blob.diff.extend(range(12, 24))
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), np.arange(12.0).reshape(2, 3, 1, 2))
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob, return_diff=True),
                                  np.arange(12.0, 24.0).reshape(2, 3, 1, 2))


def test_blobproto_double_data_and_count_check():
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([3])
    blob.double_data.extend([0.1, 0.2, 0.3])
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), [0.1, 0.2, 0.3])
    with pytest.raises(ProtoError, match="needs 3 diff values but holds 0"):
        caffe.io.blobproto_to_array(blob, return_diff=True)


def test_blobprotovector_round_trip():
    arrays = [RNG.normal(size=(2, 3)).astype(np.float32), RNG.normal(size=(1, 3, 2, 2)).astype(np.float32)]
    serialized = caffe.io.arraylist_to_blobprotovector_str(arrays)
    assert isinstance(serialized, bytes)
    back = caffe.io.blobprotovector_str_to_arraylist(serialized)
    assert [a.shape for a in back] == [(2, 3), (1, 3, 2, 2)]
    for original, restored in zip(arrays, back):
        np.testing.assert_array_equal(original, restored)
    with pytest.raises(ProtoError):
        caffe.io.blobprotovector_str_to_arraylist(b"\x0a\xff\xff")


def test_array_to_blobproto_checks_the_diff_shape():
    with pytest.raises(DataError, match="diff"):
        caffe.io.array_to_blobproto(np.zeros((2, 3)), np.zeros((3, 2)))


# ---- datums ----------------------------------------------------------------------------------------

def test_uint8_datum_round_trip():
    pixels = RNG.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    datum = caffe.io.array_to_datum(pixels, label=7)
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 4, 5, 7)
    assert datum.data == pixels.tobytes() and len(datum.float_data) == 0
    restored = caffe.io.datum_to_array(caffe_pb2.Datum.FromString(datum.SerializeToString()))
    assert restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, pixels)


def test_float_datum_round_trip():
    values = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    datum = caffe.io.array_to_datum(values)
    assert len(datum.data) == 0 and len(datum.float_data) == 24 and not datum.HasField("label")
    restored = caffe.io.datum_to_array(datum)
    assert restored.dtype == np.float64
    np.testing.assert_array_equal(restored, values)


def test_encoded_datum_is_decoded_as_caffe_does():
    pixels = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    png = bytes_io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    datum = caffe_pb2.Datum(data=png.getvalue(), encoded=True, label=2)
    np.testing.assert_array_equal(caffe.io.datum_to_array(datum), pixels[:, :, ::-1].transpose(2, 0, 1))  # BGR
    grey = bytes_io.BytesIO()
    Image.fromarray(pixels[:, :, 0]).save(grey, format="PNG")
    np.testing.assert_array_equal(caffe.io.datum_to_array(caffe_pb2.Datum(data=grey.getvalue(), encoded=True)),
                                  pixels[None, :, :, 0])


def test_datum_errors():
    with pytest.raises(DataError, match="C x H x W"):
        caffe.io.array_to_datum(np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(DataError, match="needs 24 values but holds 3"):
        caffe.io.datum_to_array(caffe_pb2.Datum(channels=2, height=3, width=4, data=b"abc"))
