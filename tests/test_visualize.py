"""exper/visualize_densecrf_gradient.py in its any-image mode, on the original's training image with a
synthetic scribble and the small demo net: the figures exist at matplotlib's 640x480, and the drawn
gradient equals the DenseCRF-loss rule -2 w/N A(S m) m pulled back through the softmax
(dx = y (dy - sum(dy y))), recomputed here from the lattice filter and the blobs of the step."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from PIL import Image

from rloss.lattice import bilateral_filter
from tests.shared_data import REPO, shared_path

pytest.importorskip("matplotlib")
CROP, CLASSES = 41, 3


def load_script():
    spec = importlib.util.spec_from_file_location("visualize_densecrf_gradient",
                                                  REPO / "exper" / "visualize_densecrf_gradient.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    image = shared_path("reference", "rloss-exper", "exper", "visualization", "trainimage1.png")
    folder = tmp_path_factory.mktemp("visualize")
    scribble = np.full((321, 321), 255, dtype=np.uint8)
    scribble[:, 5:8] = 0  # background strokes on the left and right
    scribble[:, 310:313] = 0
    scribble[60:260, 180:183] = 2  # and one through the dog
    Image.fromarray(scribble).save(folder / "scribble.png")
    figures = load_script().main(["--image", str(image), "--scribble", str(folder / "scribble.png"), "--net",
                                  "small_fcn", "--num_labels", str(CLASSES), "--crop", str(CROP),
                                  "--out_dir", str(folder / "out")])
    return figures, folder / "out", image


def test_figures_are_written_at_640x480(run) -> None:
    figures, out, _ = run
    for i in range(CLASSES):
        for kind in ("prob", "scorediff"):
            with Image.open(out / f"{i}{kind}.png") as figure:
                assert figure.size == (640, 480)
    with Image.open(out / "image.png") as image:
        assert image.size == (CROP, CROP) and image.mode == "RGB"
    assert figures.prob.shape == figures.score_diff.shape == (CLASSES, CROP, CROP)
    assert figures.blob_names == {"image": "data_data_0_split_1", "prob": "fc_interp_softmax", "loss": "densecrf_loss",
                                  "scores": "fc_interp"}


def test_gradient_is_the_densecrf_rule_through_the_softmax(run) -> None:
    figures, _, _ = run
    assert figures.loss_weight == pytest.approx(2e-6) and figures.batch_size == 1
    data, prob = figures.data.astype(np.float32), figures.prob.astype(np.float32)
    mask = (np.trunc(data) != 0).any(axis=0).astype(np.float32)
    filtered = bilateral_filter(data[None], (prob * mask)[None], figures.sigma_rgb, figures.sigma_xy)[0]
    filtered = filtered.astype(np.float64)
    grad_prob = -2.0 * figures.loss_weight / figures.batch_size * filtered * mask
    grad_scores = prob * (grad_prob - (grad_prob * prob).sum(axis=0, keepdims=True))
    scale = np.abs(grad_scores).max()
    assert scale > 0
    assert np.abs(figures.score_diff - grad_scores).max() <= 1e-4 * scale
    loss = -(prob * mask * filtered).sum() / figures.batch_size
    assert figures.loss == pytest.approx(loss, rel=1e-4)


def test_image_is_the_crop_the_net_saw(run) -> None:
    figures, _, source = run
    rgb = np.asarray(Image.open(source).convert("RGB"), dtype=np.int16)
    seen = figures.image.astype(np.int16)
    rows, columns = np.nonzero((np.abs(rgb[:-CROP + 1, :-CROP + 1] - seen[0, 0]) <= 1).all(axis=-1))
    matches = [(r, c) for r, c in zip(rows, columns)
               if (np.abs(rgb[r:r + CROP, c:c + CROP] - seen) <= 1).all()]
    assert matches, "the reconstructed image is not a window of the input"
