"""`python -m rloss test` on a synthetic dataset whose images (45x38) are larger than the net's crop
(33): iterations from the list, whole-image scoring against a per-pixel reference computed here,
the centre crop of `--center_crop`, class names; and rloss.whole_image's tiles against convolutions
computed here on the padded image."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rloss.cli import evaluate
from rloss.cli.main import main
from rloss.data.synthetic import write_dataset
from rloss.net import Net
from rloss.proto import caffe_pb2
from rloss.proto.text import parse_net
from rloss.whole_image import TILE_OVERLAP, WholeImageNet, fed_test_param, image_reader_param, tile_spans
from tests.test_infer import bgr_data, fit_colour_classifier

HEIGHT, WIDTH, CROP, VAL = 45, 38, 33, 5
CLASS_NAMES = ["background", "disc_1", "square_2"]

NET = """name: "colour"
layer { name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim" include { phase: TEST }
  image_data_param { root_folder: "${DATA_ROOT}" source: "${DATA_ROOT}list/val.txt" label_type: PIXEL
                     batch_size: ${BATCH} }
  transform_param { mean_value: 104.008 mean_value: 116.669 mean_value: 122.675 crop_size: ${CROP} } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "accuracy" type: "SegAccuracy" bottom: "score" bottom: "label" top: "accuracy"
  seg_accuracy_param { ignore_label: 255 reset: false } }
layer { name: "silence" type: "Silence" bottom: "data_dim" }
"""


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The dataset, the net file, weights of a fitted per-pixel colour classifier, (weight, bias)."""
    root = tmp_path_factory.mktemp("evaluate")
    write_dataset(root / "data", train=6, val=VAL, height=HEIGHT, width=WIDTH, num_classes=3, seed=3)
    (root / "test.prototxt").write_text(NET)
    weight, bias = fit_colour_classifier(root / "data", [f"train_{i:04d}" for i in range(6)])
    net = Net.from_prototxt(root / "test.prototxt", caffe_pb2.TEST,
                            values={"DATA_ROOT": f"{root / 'data'}/", "BATCH": "1", "CROP": str(CROP)})
    with torch.no_grad():
        net.params["score"][0].copy_(torch.from_numpy(weight))
        net.params["score"][1].copy_(torch.from_numpy(bias))
    net.save(root / "colour.caffemodel")
    return root, weight, bias


def run_test(root: Path, *extra: str, batch: int = 1, crop: int = CROP, out: str = "") -> int:
    metrics = root / f"metrics{out}.json"
    metrics.unlink(missing_ok=True)
    args = ["test", f"--model={root / 'test.prototxt'}", f"--weights={root / 'colour.caffemodel'}",
            "--set", f"DATA_ROOT={root / 'data'}/", "--set", f"BATCH={batch}", "--set", f"CROP={crop}",
            f"--metrics_json={metrics}", *extra]
    if out:
        args.append(f"--output_dir={root / out}")
    return main(args)


def metrics_of(root: Path, out: str = "") -> dict:
    return json.loads((root / f"metrics{out}.json").read_text())


def reference(root: Path, weight: np.ndarray, bias: np.ndarray, window: tuple[slice, slice]) -> tuple[dict, list]:
    """Per-pixel scores computed here over `window` of every val image: their predictions, and the
    confusion matrix's mean IoU and pixel accuracy against the ground truth."""
    matrix = np.zeros((3, 3), dtype=np.int64)
    predictions = []
    for k in range(VAL):
        name = f"val_{k:04d}"
        data = bgr_data(root / "data" / "images" / f"{name}.png")[:, window[0], window[1]]
        prediction = (np.einsum("ck,khw->chw", weight[:, :, 0, 0], data) + bias[:, None, None]).argmax(axis=0)
        truth = np.asarray(Image.open(root / "data" / "SegmentationClass" / f"{name}.png"))[window]
        np.add.at(matrix, (truth.ravel(), prediction.ravel()), 1)
        predictions.append(prediction)
    hits = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - hits
    iou = hits[union > 0] / union[union > 0]
    metrics = {"mean_iou": iou.mean(), "pixel_accuracy": hits.sum() / matrix.sum(), "pixels": int(matrix.sum())}
    return metrics, predictions


def test_whole_images_are_scored_against_a_reference_and_differ_from_the_centre_crop(case, capsys):
    root, weight, bias = case
    assert run_test(root, out="whole") == 0
    err = capsys.readouterr().err
    assert "Running for 5 iterations (whole images)" in err
    assert "Scored 5 whole images in 20 forward passes" in err  # 2x2 tiles of 33 over 45x38
    whole = metrics_of(root, "whole")
    expected, predictions = reference(root, weight, bias, (slice(None), slice(None)))
    assert whole["scoring"] == "whole_images" and whole["samples"] == VAL
    assert whole["labelled_pixels"] == expected["pixels"] == VAL * HEIGHT * WIDTH
    assert whole["mean_iou"] == pytest.approx(expected["mean_iou"], abs=1e-4)
    assert whole["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-4)
    for k, prediction in enumerate(predictions):
        written = np.asarray(Image.open(root / "whole" / f"val_{k:04d}.png"))
        assert written.shape == (HEIGHT, WIDTH)
        assert (written == prediction).mean() > 0.999  # float rounding of near-ties aside

    assert run_test(root, "--center_crop", out="centre") == 0
    assert "classes; center crop):" in capsys.readouterr().err
    centre = metrics_of(root, "centre")
    rows, columns = (HEIGHT - CROP) // 2, (WIDTH - CROP) // 2
    expected_centre, _ = reference(root, weight, bias, (slice(rows, rows + CROP), slice(columns, columns + CROP)))
    assert centre["scoring"] == "center_crop" and centre["labelled_pixels"] == VAL * CROP * CROP
    assert centre["mean_iou"] == pytest.approx(expected_centre["mean_iou"], abs=1e-4)
    assert abs(centre["mean_iou"] - whole["mean_iou"]) > 1e-3


def test_images_no_larger_than_the_crop_score_as_caffe_does(case):
    root, _, _ = case
    assert run_test(root, crop=49, out="big_crop") == 0
    assert run_test(root, "--center_crop", crop=49, out="big_crop_centre") == 0
    whole, centre = metrics_of(root, "big_crop"), metrics_of(root, "big_crop_centre")
    assert whole.pop("scoring") == "whole_images" and centre.pop("scoring") == "center_crop"
    assert whole == centre


def test_iterations_default_to_the_list_and_count_each_image_once(case, capsys, monkeypatch):
    root, _, _ = case
    monkeypatch.setattr(evaluate, "PROGRESS_SECONDS", 0.0)
    for extra in ([], ["--center_crop"]):
        assert run_test(root, *extra, batch=2) == 0
        err = capsys.readouterr().err
        assert "Running for 3 iterations" in err  # ceil(5 / 2)
        assert metrics_of(root)["samples"] == VAL and metrics_of(root)["iterations"] == 3
        assert re.search(r"Progress: 1/3 iterations, \S+ s each, about \S+ left", err)
        assert "Progress: 3/3 iterations" in err


def test_fewer_iterations_score_a_prefix(case, capsys):
    root, _, _ = case
    assert run_test(root, "--iterations=1", batch=2) == 0
    assert f"Scoring the first 2 of the 5 images of the list '{root / 'data'}/list/val.txt'" in capsys.readouterr().err
    assert metrics_of(root)["samples"] == 2


def test_more_iterations_than_the_list_are_an_error_unless_wrapping_is_asked(case, capsys):
    root, _, _ = case
    assert run_test(root, "--iterations=4", batch=2) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("rloss: error: --iterations=4:")
    assert f"the list '{root / 'data'}/list/val.txt' has 5" in line and "at most 3 iterations" in line
    assert not (root / "metrics.json").exists()
    assert run_test(root, "--iterations=4", "--allow_wrap", "--center_crop", batch=2) == 0
    assert "some are scored more than once" in capsys.readouterr().err
    assert metrics_of(root)["samples"] == 8


def test_class_iou_is_named_from_the_datasets_classes_file_or_the_given_one(case, capsys, tmp_path):
    root, _, _ = case
    assert run_test(root) == 0
    err = capsys.readouterr().err
    assert f"Class names from {root / 'data'}/classes.txt" in err
    metrics = metrics_of(root)
    assert metrics["class_names"] == CLASS_NAMES
    for index, name in enumerate(CLASS_NAMES):
        value = metrics["class_iou"][index]
        assert metrics["class_iou_by_name"][name] == value
        assert re.search(rf"IoU of class {index} \({name}\) = {value:.3}", err)
    names = tmp_path / "names.txt"
    names.write_text("ground\nred thing\ngreen thing\n")
    assert run_test(root, f"--classes={names}") == 0
    assert "IoU of class 1 (red thing) = " in capsys.readouterr().err
    assert metrics_of(root)["class_names"] == ["ground", "red thing", "green thing"]


def test_class_names_fall_back_to_indices():
    assert evaluate.labels_of({0: "sky"}, 3) == ["sky", "1", "2"]


def test_a_net_without_a_list_keeps_caffes_default():
    assert evaluate.plan_iterations(None, None, False) == evaluate.Plan(50, None)
    listed = evaluate.TestList("list.txt", 7, 3)
    assert evaluate.plan_iterations(None, listed, False) == evaluate.Plan(3, 7)
    assert evaluate.plan_iterations(2, listed, False) == evaluate.Plan(2, 6)
    assert evaluate.plan_iterations(3, listed, False) == evaluate.Plan(3, 7)


# ---- rloss.whole_image ------------------------------------------------------------------------------

@pytest.mark.parametrize("size,crop", [(10, 33), (33, 33), (34, 33), (45, 33), (100, 33), (500, 97), (7, 3)])
def test_tiles_cover_the_image_overlap_and_own_each_pixel_once(size, crop):
    spans = tile_spans(size, crop)
    assert spans[0].start == 0 and spans[-1].start == max(0, size - crop)
    assert spans[0].own_start == 0 and spans[-1].own_end == size
    for before, after in zip(spans, spans[1:]):
        assert before.own_end == after.own_start  # a partition
        assert before.start + crop - after.start >= math.ceil(crop * TILE_OVERLAP) - 1
    for span in spans:
        assert span.start <= span.own_start < span.own_end <= span.start + crop


CONV_NET = """name: "context"
layer { name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim" include { phase: TEST }
  image_data_param { source: "unused.txt" batch_size: 1 } transform_param { CROP } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "accuracy" type: "SegAccuracy" bottom: "score" bottom: "label" top: "accuracy"
  seg_accuracy_param { ignore_label: 255 } }
layer { name: "silence" type: "Silence" bottom: "data_dim" }
"""


def whole_image_net(crop: str) -> WholeImageNet:
    param = parse_net(CONV_NET.replace("CROP", crop), "context.prototxt")
    net = Net(fed_test_param(param, "context.prototxt"), caffe_pb2.TEST, source="context.prototxt")
    return WholeImageNet(net, image_reader_param(param, "context.prototxt"), "score")


def conv(whole: WholeImageNet, data: torch.Tensor) -> torch.Tensor:
    weight, bias = whole.net.params["score"]
    return F.conv2d(data[None], weight.detach(), bias.detach(), padding=1)[0]


def padded(data: torch.Tensor, height: int, width: int) -> torch.Tensor:
    out = torch.zeros((data.shape[0], height, width))
    out[:, :data.shape[1], :data.shape[2]] = data
    return out


def test_a_small_image_is_padded_to_the_crop_and_its_scores_cut_back():
    whole = whole_image_net("crop_size: 17")
    data = torch.randn(3, 12, 15)
    result = whole.run(data, torch.zeros(12, 15), outputs=True)
    assert result.tiles == 1 and result.scores.shape == (2, 12, 15)
    torch.testing.assert_close(result.scores, conv(whole, padded(data, 17, 17))[:, :12, :15])
    assert [name for name, _ in result.outputs] == ["accuracy"] * 3


def test_a_large_image_averages_the_scores_of_overlapping_padded_tiles():
    whole = whole_image_net("crop_height: 17 crop_width: 13")
    data = torch.randn(3, 40, 11)
    total, count = torch.zeros(2, 40, 11), torch.zeros(40, 11)
    rows = tile_spans(40, 17)
    for span in rows:
        tile = padded(data[:, span.start:span.start + 17], 17, 13)
        total[:, span.start:span.start + 17] += conv(whole, tile)[:, :, :11]
        count[span.start:span.start + 17] += 1
    result = whole.run(data)
    assert result.tiles == len(rows) >= 3 and count.min() >= 1
    torch.testing.assert_close(result.scores, total / count)
    assert not torch.allclose(result.scores, conv(whole, data))  # tile borders see the padding


def test_a_net_without_a_crop_runs_once_on_the_image_padded_to_8k_plus_1():
    whole = whole_image_net("mirror: false")
    data = torch.randn(3, 40, 30)
    result = whole.run(data)
    assert result.tiles == 1
    torch.testing.assert_close(result.scores, conv(whole, padded(data, 41, 33))[:, :40, :30])
