"""`python -m rloss infer` on a small synthetic dataset with a per-pixel colour classifier (a 1x1
convolution fitted by least squares): the written files (VOC-palette PNGs, overlays, MatWrite .mat
features) against numpy recomputations, DenseCRF post-processing against brute-force mean field,
and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from rloss import caffe
from rloss.cli.main import main
from rloss.data.synthetic import write_dataset
from tests.test_densecrf_inference import PARAMS, brute_force, gaussian_matrix

MEAN_BGR = np.array([104.008, 116.669, 122.675])
CROP = 33
SIZE = 29
# Colours of the VOC palette (PASCAL devkit's labelcolormap) for classes 0..3 and 255.
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 255: (224, 224, 192)}

NET = """name: "colour"
layer { name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim" include { phase: TEST }
  image_data_param { root_folder: "${DATA_ROOT}" source: "${DATA_ROOT}list/val.txt" label_type: PIXEL batch_size: 1 }
  transform_param { mean_value: 104.008 mean_value: 116.669 mean_value: 122.675 crop_size: CROP } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "accuracy" type: "SegAccuracy" bottom: "score" bottom: "label" top: "accuracy"
  seg_accuracy_param { ignore_label: 255 reset: false } }
layer { name: "silence" type: "Silence" bottom: "data_dim" }
#layer {
#  name: "crf" type: "DenseCRF" bottom: "score" bottom: "data_dim" bottom: "data" top: "crf_inf"
#  dense_crf_param { PARAMS }
#}
""".replace("CROP", str(CROP)).replace("PARAMS", PARAMS)


def bgr_data(path: Path) -> np.ndarray:
    """The data blob's content inside the image: (3, H, W) mean-subtracted BGR, float32."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return (rgb[:, :, ::-1] - MEAN_BGR).transpose(2, 0, 1).astype(np.float32)


def fit_colour_classifier(root: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares one-hot regression from mean-subtracted BGR, scaled to confident scores."""
    features, targets = [], []
    for name in names:
        features.append(bgr_data(root / "images" / f"{name}.png").reshape(3, -1).T)
        truth = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png")).reshape(-1)
        targets.append(np.eye(3)[truth])
    x = np.concatenate(features).astype(np.float64)
    x = np.hstack([x, np.ones((len(x), 1))])
    solution = np.linalg.lstsq(x, np.concatenate(targets), rcond=None)[0] * 6.0
    return solution[:3].T.reshape(3, 3, 1, 1).astype(np.float32), solution[3].astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    write_dataset(root / "data", train=6, val=3, height=SIZE, width=SIZE, num_classes=3, seed=4)
    (root / "test.prototxt").write_text(NET)
    weights, bias = fit_colour_classifier(root / "data", [f"train_{i:04d}" for i in range(6)])
    mp = pytest.MonkeyPatch()
    mp.setenv("DATA_ROOT", f"{root / 'data'}/")
    net = caffe.Net(str(root / "test.prototxt"), caffe.TEST)
    net.params["score"][0].data[...] = weights
    net.params["score"][1].data[...] = bias
    net.save(str(root / "colour.caffemodel"))
    images = root / "val_images"
    images.mkdir()
    for k in range(3):
        (images / f"val_{k:04d}.png").write_bytes((root / "data" / "images" / f"val_{k:04d}.png").read_bytes())
    yield root, weights, bias
    mp.undo()


def infer(root: Path, out: str, *extra: str) -> int:
    return main(["infer", f"--model={root / 'test.prototxt'}", f"--weights={root / 'colour.caffemodel'}",
                 f"--output_dir={root / out}", *extra])


def scores_of(mat: Path) -> np.ndarray:
    """A MatWrite file back to the blob (N, C, H, W): data(w, h, c, n) = blob[n, c, h, w]."""
    contents = loadmat(str(mat))
    assert contents["data"].dtype == np.float32
    return contents["data"].transpose(3, 2, 1, 0)


def test_pngs_overlays_and_mat_features(setup, capsys) -> None:
    root, weights, bias = setup
    assert infer(root, "plain", f"--images={root / 'val_images'}", f"--mat_write={root / 'plain_mat'}") == 0
    assert "Wrote 3 segmentations" in capsys.readouterr().err
    for k in range(3):
        name = f"val_{k:04d}"
        data = bgr_data(root / "val_images" / f"{name}.png")
        scores = scores_of(root / "plain_mat" / f"{name}_blob_0.mat")
        assert scores.shape == (1, 3, CROP, CROP)
        expected = np.einsum("ck,khw->chw", weights[:, :, 0, 0], data) + bias[:, None, None]
        np.testing.assert_allclose(scores[0, :, :SIZE, :SIZE], expected, rtol=1e-4, atol=1e-4)
        # the padding holds the mean, i.e. zeros after subtraction: only the bias remains
        np.testing.assert_allclose(scores[0, :, SIZE:, :], np.broadcast_to(bias[:, None, None], (3, CROP - SIZE, CROP)),
                                   atol=1e-5)
        png = Image.open(root / "plain" / f"{name}.png")
        assert png.mode == "P" and png.size == (SIZE, SIZE)
        palette = np.asarray(png.getpalette()).reshape(-1, 3)
        for index, colour in VOC_COLOURS.items():
            assert tuple(palette[index]) == colour
        labels = np.asarray(png)
        np.testing.assert_array_equal(labels, expected.argmax(axis=0))
        truth = np.asarray(Image.open(root / "data" / "SegmentationClass" / f"{name}.png"))
        assert (labels == truth).mean() > 0.6  # the fitted colour classifier mostly works
        rgb = np.asarray(Image.open(root / "val_images" / f"{name}.png").convert("RGB"), dtype=np.float64)
        blend = 0.5 * rgb + 0.5 * np.array([VOC_COLOURS[int(v)] for v in labels.ravel()]).reshape(rgb.shape)
        written = np.asarray(Image.open(root / "plain" / f"{name}_overlay.png"), dtype=np.float64)
        assert written.shape == (SIZE, SIZE, 3) and np.abs(written - blend).max() <= 1


def test_crf_from_the_commented_block_matches_brute_force_mean_field(setup, capsys) -> None:
    root, _, _ = setup
    image = root / "val_images" / "val_0001.png"
    assert infer(root, "crf", f"--image={image}", "--crf", f"--mat_write={root / 'crf_mat'}") == 0
    assert "DenseCRF parameters from the model's commented-out DenseCRF layer" in capsys.readouterr().err
    scores = scores_of(root / "crf_mat" / "val_0001_blob_0.mat")[0, :, :SIZE, :SIZE]
    crf = scores_of(root / "crf_mat" / "crf" / "val_0001_blob_0.mat")[0]
    expected = brute_force(scores, bgr_data(image), 5)  # dense lattice matrices, 5 iterations of PARAMS
    assert np.abs(crf[:, :SIZE, :SIZE] - expected).max() <= 1e-4
    assert not crf[:, SIZE:, :].any() and not crf[:, :, SIZE:].any()  # outside data_dim: 0
    labels = np.asarray(Image.open(root / "crf" / "val_0001.png"))
    np.testing.assert_array_equal(labels, crf[:, :SIZE, :SIZE].argmax(axis=0))
    exact = brute_force(scores, bgr_data(image), 5, matrix=gaussian_matrix)  # exact Gaussian kernels
    assert (labels == exact.argmax(axis=0)).mean() >= 0.95


def neighbour_changes(labels: np.ndarray) -> int:
    return int((labels[1:] != labels[:-1]).sum() + (labels[:, 1:] != labels[:, :-1]).sum())


def test_crf_keeps_labels_without_iterations_and_smooths_noisy_ones(setup) -> None:
    root, _, _ = setup
    images = f"--images={root / 'val_images'}"
    assert infer(root, "plain2", images) == 0
    assert infer(root, "crf0", images, "--crf", "--crf_params=max_iter: 0") == 0
    largefov = "max_iter: 10 pos_w: 3 pos_xy_std: 3 bi_w: 5 bi_xy_std: 50 bi_rgb_std: 10"
    assert infer(root, "crf10", images, "--crf", f"--crf_params={largefov}") == 0
    hits = {"plain2": 0, "crf10": 0}
    changes = dict(hits)
    for k in range(3):
        name = f"val_{k:04d}.png"
        plain = np.asarray(Image.open(root / "plain2" / name))
        np.testing.assert_array_equal(np.asarray(Image.open(root / "crf0" / name)), plain)
        truth = np.asarray(Image.open(root / "data" / "SegmentationClass" / name))
        for run in hits:
            labels = np.asarray(Image.open(root / run / name))
            hits[run] += int((labels == truth).sum())
            changes[run] += neighbour_changes(labels)
    assert changes["crf10"] < changes["plain2"]
    assert hits["crf10"] >= hits["plain2"]


def test_an_image_larger_than_the_crop_is_segmented_in_its_centre_window(setup, capsys) -> None:
    root, weights, bias = setup
    big = root / "big.png"
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 37, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(big)
    assert infer(root, "big", f"--image={big}") == 0
    assert "only the centre 33x33 window is segmented" in capsys.readouterr().err
    labels = np.asarray(Image.open(root / "big" / "big.png"))
    window = pixels[3:36, 2:35]  # rows (40 - 33) // 2 = 3, columns (37 - 33) // 2 = 2
    data = (window[:, :, ::-1].astype(np.float64) - MEAN_BGR).transpose(2, 0, 1).astype(np.float32)
    expected = np.einsum("ck,khw->chw", weights[:, :, 0, 0], data) + bias[:, None, None]
    assert labels.shape == (CROP, CROP)
    assert (labels == expected.argmax(axis=0)).mean() > 0.999  # ties aside
    overlay = np.asarray(Image.open(root / "big" / "big_overlay.png"), dtype=np.float64)
    assert overlay.shape == (CROP, CROP, 3)
    colours = np.array([VOC_COLOURS[int(v)] for v in labels.ravel()]).reshape(overlay.shape)
    assert np.abs(overlay - (0.5 * window + 0.5 * colours)).max() <= 1


@pytest.mark.parametrize("args,message", [
    (["--image=/nonexistent/picture.jpg"], "--image: '/nonexistent/picture.jpg' does not exist"),
    (["--images=/nonexistent"], "--images: '/nonexistent' is not a folder"),
    (["--image={root}/test.prototxt"], "cannot read the image"),
    (["--image={root}/val_images/val_0000.png", "--score_blob=nothere"], "no blob 'nothere'"),
    (["--image={root}/val_images/val_0000.png", "--crf", "--crf_params=max_iter: x"], "--crf_params: cannot read"),
])
def test_errors_are_one_line(setup, capsys, args, message) -> None:
    root, _, _ = setup
    assert infer(root, "errors", *[a.format(root=root) for a in args]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith("rloss: error: ") and message in lines[-1]


def test_usage_errors_exit_2(setup, capsys) -> None:
    root, _, _ = setup
    for argv in (["infer", "--model=m", "--weights=w", "--image=i"],
                 ["infer", "--model=m", "--weights=w", "--output_dir=o"],
                 ["infer", "--model=m", "--weights=w", "--image=i", "--images=d", "--output_dir=o"],
                 ["infer", "--model=m", "--weights=w", "--image=i", "--output_dir=o", "--crf_params=max_iter: 1"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
    assert re.search(r"error: .*(--output_dir|--image|not allowed|--crf)", capsys.readouterr().err)
