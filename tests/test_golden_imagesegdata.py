"""ImageSegData against the tops real Caffe produced (golden 03_imagesegdata), bit for bit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from rloss.data import imageio
from rloss.layers import layer_class
from rloss.proto import caffe_pb2
from tests.shared_data import golden, shared_path


def _run_case(case: str, monkeypatch) -> tuple[caffe_pb2.LayerParameter, dict[str, np.ndarray]]:
    """Build the case's layer as Caffe did (paths relative to the golden folder) and run one batch."""
    monkeypatch.chdir(shared_path("golden"))
    param = golden("03_imagesegdata", case).net_param().layer[0]
    layer = layer_class(param.type)(param, [], param.include[0].phase)
    try:
        tops = layer()
    finally:
        layer.close()
    return param, {name: top.numpy() for name, top in zip(param.top, tops)}


@pytest.mark.parametrize("case", ["train_3imgs", "test_wide_centercrop"])
def test_tops_are_bit_exact(case, monkeypatch):
    param, ours = _run_case(case, monkeypatch)
    assert list(ours) == ["data", "label", "data_dim"]
    for top, value in ours.items():
        expected = golden("03_imagesegdata", case).array(f"out_{top}")
        assert value.dtype == np.float32
        assert value.shape == expected.shape, top
        assert np.array_equal(value, expected), f"{case} top {top}: max diff {np.abs(value - expected).max()}"


def test_train_3imgs_padding_is_mean_and_ignore(monkeypatch):
    """What the golden shows, restated: image at the top-left, zeros / 255 below and to the right."""
    _, ours = _run_case("train_3imgs", monkeypatch)
    for n, (height, width) in enumerate([(200, 250), (281, 300), (300, 320)]):
        assert np.all(ours["data"][n, :, height:, :] == 0) and np.all(ours["data"][n, :, :, width:] == 0)
        assert np.all(ours["label"][n, 0, height:, :] == 255) and np.all(ours["label"][n, 0, :, width:] == 255)
        assert ours["data_dim"][n].ravel().tolist() == [height, width]


def _libpng_luma(rgb: np.ndarray) -> np.ndarray:
    """libpng's rgb_to_gray as OpenCV's grayscale PNG decode uses it: coefficients 0.299 / 0.587 /
    rest in 15-bit fixed point, truncated; grey colours unchanged (written here from libpng's rule)."""
    rgb = rgb.astype(np.int64)
    red, green = 29900 * 32768 // 100000, 58700 * 32768 // 100000
    blue = 32768 - red - green
    luma = (red * rgb[..., 0] + green * rgb[..., 1] + blue * rgb[..., 2]) // 32768
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    return np.where(grey, rgb[..., 0], luma)


def test_palette_labels_are_read_as_indices_where_caffe_read_luma(monkeypatch, caplog):
    """Our deliberate difference: palette PNG labels give their indices. Caffe (OpenCV grayscale
    decode) gave the luma of each index's palette colour; we reproduce those values from the indices
    to show that this is the only difference."""
    monkeypatch.setattr(imageio, "_warned_palette", False)
    logger = logging.getLogger("rloss")  # may not propagate to the root logger (glog-style set-up)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="rloss"):
            _, ours = _run_case("train_palette_label", monkeypatch)
    finally:
        logger.removeHandler(caplog.handler)
    assert any("img1_label_palette.png" in record.getMessage() for record in caplog.records)
    png = Image.open(shared_path("golden", "03_imagesegdata", "data", "img1_label_palette.png"))
    assert png.mode == "P"
    indices = np.array(png)
    height, width = indices.shape
    caffe_label = golden("03_imagesegdata", "train_palette_label").array("out_label")[0, 0]
    our_label = ours["label"][0, 0]
    assert np.array_equal(our_label[:height, :width], indices.astype(np.float32))
    assert np.array_equal(indices, golden("03_imagesegdata", "data").array("img1_label"))
    palette = np.array(png.getpalette()).reshape(-1, 3)
    assert np.array_equal(caffe_label[:height, :width], _libpng_luma(palette[indices]).astype(np.float32))
    assert not np.array_equal(caffe_label[:height, :width], our_label[:height, :width])
    # Padding, data and data_dim agree with Caffe.
    assert np.all(our_label[height:] == 255) and np.all(caffe_label[height:] == 255)
    for top in ("data", "data_dim"):
        assert np.array_equal(ours[top], golden("03_imagesegdata", "train_palette_label").array(f"out_{top}"))


def test_library_luma_matches_caffe_palette_values(monkeypatch):
    """`imageio.libpng_gray` (used for ImageData's grey reading of colour PNGs) gives Caffe's values."""
    png = Image.open(shared_path("golden", "03_imagesegdata", "data", "img1_label_palette.png"))
    indices = np.array(png)
    palette = np.array(png.getpalette(), dtype=np.uint8).reshape(-1, 3)
    caffe_label = golden("03_imagesegdata", "train_palette_label").array("out_label")
    caffe_label = caffe_label[0, 0, :indices.shape[0], :indices.shape[1]]
    assert np.array_equal(imageio.libpng_gray(palette[indices]).astype(np.float32), caffe_label)
