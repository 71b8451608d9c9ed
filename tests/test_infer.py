"""`python -m rloss infer` on a small synthetic dataset with a per-pixel colour classifier (a 1x1
convolution fitted by least squares), so that a whole image's reference scores are one einsum: the
written files (VOC-palette PNGs at the input's size, overlays with their legend, MatWrite .mat
features), small images upsampled or not, images larger than the crop, a net file and weights alone,
DenseCRF post-processing against brute-force mean field, and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from rloss import caffe
from rloss.cli.main import main
from rloss.data.synthetic import make_sample, write_dataset
from rloss.overlay import MARGIN, ROW, SWATCH
from tests.test_densecrf_inference import PARAMS, brute_force, gaussian_matrix

MEAN_BGR = np.array([104.008, 116.669, 122.675])
CROP = 33
SIZE = 29
CLASS_NAMES = ["background", "disc_1", "square_2"]
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


def bgr_of(rgb: np.ndarray) -> np.ndarray:
    """The data blob of RGB pixels: (3, H, W) mean-subtracted BGR, float32."""
    return (rgb[:, :, ::-1].astype(np.float64) - MEAN_BGR).transpose(2, 0, 1).astype(np.float32)


def bgr_data(path: Path) -> np.ndarray:
    return bgr_of(np.asarray(Image.open(path).convert("RGB")))


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
    sizes = root / "sizes"
    sizes.mkdir()
    rng = np.random.default_rng(7)
    for height, width in ((40, 40), (300, 500)):
        Image.fromarray(make_sample(rng, height, width, 3)[0]).save(sizes / f"photo_{width}x{height}.png")
    yield root, weights, bias
    mp.undo()


def infer(root: Path, out: str, *extra: str, model: str = "test.prototxt") -> int:
    return main(["infer", f"--model={root / model}", f"--weights={root / 'colour.caffemodel'}",
                 f"--output_dir={root / out}", *extra])


def per_pixel(weights: np.ndarray, bias: np.ndarray, data: np.ndarray) -> np.ndarray:
    """The colour classifier's scores (3, H, W) of a data blob (3, H, W)."""
    return np.einsum("ck,khw->chw", weights[:, :, 0, 0], data) + bias[:, None, None]


def scores_of(mat: Path) -> np.ndarray:
    """A MatWrite file back to the blob (N, C, H, W): data(w, h, c, n) = blob[n, c, h, w]."""
    contents = loadmat(str(mat))
    assert contents["data"].dtype == np.float32
    return contents["data"].transpose(3, 2, 1, 0)


def labels_at(root: Path, out: str, name: str) -> np.ndarray:
    png = Image.open(root / out / f"{name}.png")
    assert png.mode == "P"
    return np.asarray(png)


def test_pngs_overlays_and_mat_features(setup, capsys) -> None:
    root, weights, bias = setup
    assert infer(root, "plain", f"--images={root / 'val_images'}", f"--mat_write={root / 'plain_mat'}",
                 "--no_upsample") == 0
    err = capsys.readouterr().err
    assert "Wrote 3 segmentations" in err and re.search(r"3/3 images, \S+ s each, about 0s left", err)
    for k in range(3):
        name = f"val_{k:04d}"
        data = bgr_data(root / "val_images" / f"{name}.png")
        scores = scores_of(root / "plain_mat" / f"{name}_blob_0.mat")
        expected = per_pixel(weights, bias, data)
        assert scores.shape == (1, 3, SIZE, SIZE)  # the whole image, its padding cut away
        np.testing.assert_allclose(scores[0], expected, rtol=1e-4, atol=1e-4)
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
        assert np.abs(written[:SIZE, :SIZE] - blend).max() <= 1


def test_overlays_have_a_legend_of_the_classes_shown(setup, capsys, monkeypatch, tmp_path) -> None:
    root, _, _ = setup
    image = root / "val_images" / "val_0000.png"
    assert infer(root, "legend", f"--image={image}", "--no_upsample") == 0
    assert f"Class names from {root / 'data'}/classes.txt" in capsys.readouterr().err
    labels = labels_at(root, "legend", "val_0000")
    shown = sorted(np.unique(labels).tolist())
    assert len(shown) >= 2
    drawn = np.asarray(Image.open(root / "legend" / "val_0000_overlay.png"))
    assert drawn.shape[1] > SIZE + SWATCH and drawn.shape[0] >= MARGIN + ROW * len(shown)
    panel = drawn[:, SIZE:]
    for row, index in enumerate(shown):  # each swatch holds its class's colour, in index order
        top = MARGIN + row * ROW
        swatch = panel[top + 2:top + SWATCH - 2, MARGIN + 2:MARGIN + SWATCH - 2]
        assert (swatch == VOC_COLOURS[index]).all()
    assert (panel > 200).all(axis=2).sum() > 20  # the names, in white

    names = tmp_path / "names.txt"
    names.write_text("0 a rather long name for the background\n1 red\n2 green\n")
    assert infer(root, "named", f"--image={image}", "--no_upsample", f"--classes={names}") == 0
    assert np.asarray(Image.open(root / "named" / "val_0000_overlay.png")).shape[1] > drawn.shape[1]

    monkeypatch.delenv("DATA_ROOT")  # the dataset, and its classes.txt, are unknown: no legend
    assert infer(root, "unnamed", f"--image={image}", "--no_upsample") == 0
    assert np.asarray(Image.open(root / "unnamed" / "val_0000_overlay.png")).shape == (SIZE, SIZE, 3)


def centre_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.floor((np.arange(height) + 0.5) * labels.shape[0] / height).astype(int)
    columns = np.floor((np.arange(width) + 0.5) * labels.shape[1] / width).astype(int)
    return labels[rows[:, None], columns[None, :]]


def test_small_images_are_upsampled_bicubically_unless_asked_not_to(setup, capsys) -> None:
    root, weights, bias = setup
    image = root / "sizes" / "photo_40x40.png"
    rgb = Image.open(image).convert("RGB")
    direct = per_pixel(weights, bias, bgr_of(np.asarray(rgb))).argmax(axis=0)
    upsampled = per_pixel(weights, bias, bgr_of(np.asarray(rgb.resize((128, 128), Image.BICUBIC)))).argmax(axis=0)
    through_128 = centre_nearest(upsampled, 40, 40)
    assert (through_128 != direct).any()  # the two ways can be told apart on this image

    assert infer(root, "up", f"--image={image}") == 0
    assert "(40x40, segmented at 128x128, 36 forward passes)" in capsys.readouterr().err
    assert (labels_at(root, "up", "photo_40x40") == through_128).mean() > 0.999

    assert infer(root, "not_up", f"--image={image}", "--no_upsample") == 0
    assert "(40x40, 4 forward passes)" in capsys.readouterr().err  # 2 x 2 tiles of 33
    np.testing.assert_array_equal(labels_at(root, "not_up", "photo_40x40"), direct)

    assert infer(root, "up_64", f"--image={image}", "--min_size=64") == 0
    assert "segmented at 64x64" in capsys.readouterr().err
    assert labels_at(root, "up_64", "photo_40x40").shape == (40, 40)


def test_label_maps_have_the_size_of_each_input(setup, capsys) -> None:
    root, weights, bias = setup
    assert infer(root, "sizes", f"--images={root / 'sizes'}") == 0
    err = capsys.readouterr().err
    assert "photo_500x300.png (300x500, 322 forward passes)" in err  # 14 x 23 tiles of 33
    for width, height in ((40, 40), (500, 300)):
        name = f"photo_{width}x{height}"
        labels = labels_at(root, "sizes", name)
        assert labels.shape == (height, width)
        overlay = np.asarray(Image.open(root / "sizes" / f"{name}_overlay.png"))
        assert overlay.shape[0] >= height and overlay.shape[1] > width
    expected = per_pixel(weights, bias, bgr_data(root / "sizes" / "photo_500x300.png")).argmax(axis=0)
    assert (labels_at(root, "sizes", "photo_500x300") == expected).mean() > 0.999


DEPLOY_NET = """name: "colour"
layer { name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim" include { phase: TEST }
  image_data_param { root_folder: "${DATA_ROOT}" source: "${LIST_DIR}/${TEST_SET}.txt" batch_size: 1 }
  transform_param { mean_value: 104.008 mean_value: 116.669 mean_value: 122.675 crop_size: ${TEST_CROP_SIZE} } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: ${NUM_LABELS} kernel_size: KERNEL } }
EXTRA
layer { name: "accuracy" type: "SegAccuracy" bottom: "score" bottom: "label" top: "accuracy"
  seg_accuracy_param { ignore_label: 255 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  loss_param { ignore_label: 255 } }
layer { name: "silence" type: "Silence" bottom: "data_dim" }
"""


def deploy_net(root: Path, name: str, kernel: str = "1", extra: str = "") -> str:
    (root / name).write_text(DEPLOY_NET.replace("KERNEL", kernel).replace("EXTRA", extra))
    return name


def test_the_net_and_its_weights_are_all_that_is_needed(setup, capsys, monkeypatch) -> None:
    root, weights, bias = setup
    for name in ("DATA_ROOT", "LIST_DIR", "TEST_CROP_SIZE", "NUM_LABELS"):
        monkeypatch.delenv(name, raising=False)
    image = root / "sizes" / "photo_40x40.png"
    assert infer(root, "deploy", f"--image={image}", "--no_upsample", model=deploy_net(root, "deploy.prototxt")) == 0
    err = capsys.readouterr().err
    assert "left unset: ${DATA_ROOT}, ${LIST_DIR}, ${TEST_CROP_SIZE}" in err
    assert "layer 'score' has 3 outputs in the weights (21 in the net file): using 3" in err
    expected = per_pixel(weights, bias, bgr_data(image)).argmax(axis=0)
    np.testing.assert_array_equal(labels_at(root, "deploy", "photo_40x40"), expected)

    assert infer(root, "needed", f"--image={image}", model=deploy_net(root, "kernel.prototxt", "${KERNEL}")) == 1
    assert "${KERNEL} has no value" in capsys.readouterr().err.strip().splitlines()[-1]

    extra = ('layer { name: "extra" type: "Convolution" bottom: "score" top: "score" '
             'convolution_param { num_output: 3 kernel_size: 1 } }')
    assert infer(root, "uncovered", f"--image={image}", model=deploy_net(root, "extra.prototxt", extra=extra)) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds no weights for the layer(s) extra" in line and "(its layers with weights: score)" in line


def test_crf_from_the_commented_block_matches_brute_force_mean_field(setup, capsys) -> None:
    root, _, _ = setup
    image = root / "val_images" / "val_0001.png"
    assert infer(root, "crf", f"--image={image}", "--crf", f"--mat_write={root / 'crf_mat'}", "--no_upsample") == 0
    assert "DenseCRF parameters from the model's commented-out DenseCRF layer" in capsys.readouterr().err
    scores = scores_of(root / "crf_mat" / "val_0001_blob_0.mat")[0]
    crf = scores_of(root / "crf_mat" / "crf" / "val_0001_blob_0.mat")[0]
    assert scores.shape == crf.shape == (3, SIZE, SIZE)
    expected = brute_force(scores, bgr_data(image), 5)  # dense lattice matrices, 5 iterations of PARAMS
    assert np.abs(crf - expected).max() <= 1e-4
    labels = labels_at(root, "crf", "val_0001")
    np.testing.assert_array_equal(labels, crf.argmax(axis=0))
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
        name = f"val_{k:04d}"
        plain = labels_at(root, "plain2", name)
        np.testing.assert_array_equal(labels_at(root, "crf0", name), plain)
        truth = np.asarray(Image.open(root / "data" / "SegmentationClass" / f"{name}.png"))
        for run in hits:
            labels = labels_at(root, run, name)
            hits[run] += int((labels == truth).sum())
            changes[run] += neighbour_changes(labels)
    assert changes["crf10"] < changes["plain2"]
    assert hits["crf10"] >= hits["plain2"]


@pytest.mark.parametrize("args,message", [
    (["--image=/nonexistent/picture.jpg"], "--image: '/nonexistent/picture.jpg' does not exist"),
    (["--images=/nonexistent"], "--images: '/nonexistent' is not a folder"),
    (["--image={root}/test.prototxt"], "cannot read the image"),
    (["--image={root}/val_images/val_0000.png", "--score_blob=nothere"], "no blob 'nothere'"),
    (["--image={root}/val_images/val_0000.png", "--crf", "--crf_params=max_iter: x"], "--crf_params: cannot read"),
    (["--image={root}/val_images/val_0000.png", "--classes=/nonexistent/names.txt"],
     "classes file '/nonexistent/names.txt' does not exist"),
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
                 ["infer", "--model=m", "--weights=w", "--image=i", "--output_dir=o", "--crf_params=max_iter: 1"],
                 ["infer", "--model=m", "--weights=w", "--image=i", "--output_dir=o", "--min_size=0"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
    assert re.search(r"error: .*(--output_dir|--image|not allowed|--crf|--min_size)", capsys.readouterr().err)
