"""`python -m rloss data prepare` and `data check`: pairing by stem, every problem of a folder in one
run with nothing written, the tree ImageSegData trains on (lists, classes.txt, report.txt), the
seeded split, atomic writing; and prepare on the MSRC-21 photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from rloss.cli.main import main
from rloss.datasets import labels as dataset_labels
from rloss.datasets.check_tree import check_tree
from rloss.datasets.classes import parse_classes
from rloss.datasets.prepare import PrepareOptions, prepare
from rloss.datasets.problems import DatasetProblems, Problems
from rloss.layers import layer_class
from rloss.palette import write_label_png
from rloss.proto import caffe_pb2
from tests.shared_data import shared_path

CLASSES = "0 background\n1 cat\n2 dog\n"
SUFFIXES = (".png", ".jpg", ".bmp", ".png", ".jpeg", ".png")


def _image(path: Path, height: int, width: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _truth(height: int, width: int, seed: int) -> np.ndarray:
    truth = np.zeros((height, width), dtype=np.uint8)
    truth[height // 4:height // 2, width // 4:width // 2] = 1 + seed % 2
    truth[-3:, -3:] = 255
    return truth


def _scribbles_of(truth: np.ndarray) -> np.ndarray:
    scribbles = np.full(truth.shape, 255, dtype=np.uint8)
    scribbles[2, :] = truth[2, :]
    rows, cols = np.nonzero((truth == 1) | (truth == 2))
    scribbles[rows[:3], cols[:3]] = truth[rows[:3], cols[:3]]
    return scribbles


def _grey(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array, mode="L").save(path)


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """Six images (png, jpg, bmp, jpeg) with scribbles (grey and palette PNGs) and ground truth."""
    root = tmp_path / "raw"
    for folder in ("images", "scribbles", "truth"):
        (root / folder).mkdir(parents=True)
    for index, suffix in enumerate(SUFFIXES):
        stem, height, width = f"photo{index}", 24 + 2 * index, 32
        _image(root / "images" / f"{stem}{suffix}", height, width, index)
        truth = _truth(height, width, index)
        if index % 2:
            write_label_png(_scribbles_of(truth), root / "scribbles" / f"{stem}.png")  # VOC palette
        else:
            _grey(_scribbles_of(truth), root / "scribbles" / f"{stem}.png")
        _grey(truth, root / "truth" / f"{stem}.png")
    (root / "classes.txt").write_text(CLASSES)
    (root / "images" / "notes.txt").write_text("not an image: skipped")
    return root


def _prepare_args(raw: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "prepare", "--images", str(raw / "images"), "--scribbles", str(raw / "scribbles"),
            "--out", str(out), *extra]


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def test_prepare_writes_a_tree_with_lists_classes_and_report(sources, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(_prepare_args(sources, out, "--ground-truth", str(sources / "truth"),
                              "--classes", str(sources / "classes.txt"), "--val", "0.34")) == 0
    printed = capsys.readouterr().out
    train, val, full = (_lines(out / "list" / f"{name}.txt") for name in ("train", "val", "train_full"))
    assert len(train) == 4 and len(val) == 2  # round(0.34 * 6)
    assert [image for image, _ in full] == [image for image, _ in train]
    stems = sorted(Path(image).stem for image, _ in train + val)
    assert stems == [f"photo{i}" for i in range(6)]
    assert all(label == f"scribbles/{Path(image).stem}.png" for image, label in train)
    assert all(label == f"SegmentationClass/{Path(image).stem}.png" for image, label in val + full)
    assert (out / "list" / "train_id.txt").read_text().split() == [Path(image).stem for image, _ in train]
    for image, label in train + val + full:
        assert not image.startswith("/") and (out / image).is_file() and (out / label).is_file()
    for index, suffix in enumerate(SUFFIXES):
        stem = f"photo{index}"
        name = f"{stem}{suffix}"
        assert (out / "images" / name).read_bytes() == (sources / "images" / name).read_bytes()
        written = Image.open(out / "scribbles" / f"{stem}.png")
        assert written.mode == "L"  # palette sources become grey index PNGs, read alike by Caffe
        assert np.array_equal(np.asarray(written), np.asarray(Image.open(sources / "scribbles" / f"{stem}.png")))
    assert (out / "classes.txt").read_text() == CLASSES
    report = (out / "report.txt").read_text()
    assert report in printed
    assert "images        6 (train 4, val 2; val drawn with seed 0, fraction 0.34)" in report
    assert "classes       3 (from " in report and "scribbles " in report and "ground truth " in report
    assert "% of the pixels labelled" in report and all(name in report for name in ("background", "cat", "dog"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_without_ground_truth_val_uses_scribbles_and_classes_come_from_the_values(sources, tmp_path):
    out = tmp_path / "data"
    assert main(_prepare_args(sources, out)) == 0
    assert not (out / "list" / "train_full.txt").exists() and not (out / "SegmentationClass").exists()
    assert all(label.startswith("scribbles/") for _, label in _lines(out / "list" / "val.txt"))
    assert (out / "classes.txt").read_text() == "0 class_0\n1 class_1\n2 class_2\n"
    assert "(from the label values found)" in (out / "report.txt").read_text()


def _val_stems(out: Path) -> list[str]:
    return (out / "list" / "val_id.txt").read_text().split()


def test_the_split_is_seeded_and_a_val_list_is_followed(sources, tmp_path):
    draws = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4"), ("d", "5")):
        assert main(_prepare_args(sources, tmp_path / name, "--seed", seed, "--val", "0.5")) == 0
        draws[name] = _val_stems(tmp_path / name)
    assert draws["a"] == draws["b"] and len(draws["a"]) == 3
    assert len({tuple(v) for v in draws.values()}) > 1
    (tmp_path / "val.txt").write_text("photo4\nimages/photo1.jpg\n\n")
    assert main(_prepare_args(sources, tmp_path / "listed", "--val-list", str(tmp_path / "val.txt"))) == 0
    assert _val_stems(tmp_path / "listed") == ["photo1", "photo4"]


def _error(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_every_problem_is_reported_in_one_run_and_nothing_is_written(sources, tmp_path, capsys):
    images, scribbles = sources / "images", sources / "scribbles"
    _image(images / "photo0.png", 30, 40, 9)  # its labels are 24x32
    _grey(np.full((26, 32), 7, dtype=np.uint8), scribbles / "photo1.png")  # 7 is not a class
    (images / "photo2.bmp").write_bytes(b"BM not really a bitmap")
    (scribbles / "photo3.png").unlink()
    out = tmp_path / "nested" / "data"
    assert main(_prepare_args(sources, out, "--classes", str(sources / "classes.txt"))) == 1
    error = _error(capsys)
    assert error.startswith(f"rloss: error: data prepare: nothing written to '{out}': 4 problems:")
    lines = error.splitlines()[1:]
    assert len(lines) == 4, error
    assert any("photo0.png" in line and "is 32x24 but its image" in line and "is 40x30" in line for line in lines)
    assert any("photo1.png" in line and "7 (832 pixels)" in line and "classes 0..2" in line for line in lines)
    assert any("photo2.bmp" in line and "cannot read the image" in line for line in lines)
    assert any("photo3.png" in line and "has no scribbles" in line for line in lines)
    assert not (tmp_path / "nested").exists()


def test_duplicate_stems_names_with_spaces_an_existing_output_and_a_bad_classes_file(sources, tmp_path, capsys):
    _image(sources / "images" / "photo0.jpg", 24, 32, 0)
    _grey(np.zeros((4, 4), dtype=np.uint8), sources / "scribbles" / "my photo.png")
    (sources / "bad_classes.txt").write_text("0 background\n2 dog\n2 cat\n")
    out = tmp_path / "exists"
    out.mkdir()
    assert main(_prepare_args(sources, out, "--classes", str(sources / "bad_classes.txt"))) == 1
    error = _error(capsys)
    for expected in ("photo0.jpg' have the same stem 'photo0'", "my photo.png': its name has whitespace",
                     f"output '{out}' already exists", "line 3: index 2 is given twice",
                     "indices 1 are missing"):
        assert expected in error
    assert list(out.iterdir()) == []


def test_classes_files_with_names_alone_or_the_unlabelled_value(tmp_path):
    problems = Problems()
    (tmp_path / "names.txt").write_text("background\n# a comment\n\npotted plant\n")
    (tmp_path / "void.txt").write_text("1 sky\n0 ground\n255 void\n")
    (tmp_path / "mixed.txt").write_text("0 a\nb\n")
    assert parse_classes(tmp_path / "names.txt", problems).names == ("background", "potted plant")
    assert parse_classes(tmp_path / "void.txt", problems).names == ("ground", "sky")
    assert not problems.lines
    assert parse_classes(tmp_path / "mixed.txt", problems) is None
    assert "line 2: 'b' has no index" in problems.lines[0]


def test_an_interrupted_write_leaves_nothing(sources, tmp_path, monkeypatch):
    written = []

    def fail_on_the_third(labels, path):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        Image.fromarray(labels).save(path)

    monkeypatch.setattr("rloss.datasets.prepare.write_label", fail_on_the_third)
    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareOptions(sources / "images", sources / "scribbles", out))
    assert len(written) == 2 and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_check_passes_on_a_prepared_tree_and_reports_every_damage(sources, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(_prepare_args(sources, out, "--ground-truth", str(sources / "truth"))) == 0
    capsys.readouterr()
    assert main(["data", "check", str(out)]) == 0
    assert "no problems" in capsys.readouterr().out
    train = _lines(out / "list" / "train.txt")
    (out / train[0][0]).unlink()
    _grey(np.zeros((5, 5), dtype=np.uint8), out / train[1][1])
    _grey(np.full((24 + 2 * int(Path(train[2][0]).stem[-1]), 32), 9, dtype=np.uint8), out / train[2][1])
    val_lines = len(_lines(out / "list" / "val.txt"))
    with open(out / "list" / "val.txt", "a") as handle:
        handle.write("\nimages/lonely.png\n")
    assert main(["data", "check", str(out)]) == 1
    error = _error(capsys)
    assert f"rloss: error: data check: '{out}': " in error
    assert "train.txt line 1 (image): file" in error and "does not exist" in error
    assert "train.txt line 2 (label)" in error and "is 5x5 but its image" in error
    assert "has values that are not classes: 9 (" in error
    assert f"val.txt line {val_lines + 1} is empty" in error
    assert f"val.txt line {val_lines + 2} has no label: 'images/lonely.png'" in error
    assert len(error.splitlines()) == 1 + 5
    with pytest.raises(DatasetProblems) as raised:
        check_tree(tmp_path / "nowhere")
    assert "does not exist" in raised.value.problems[0]


def test_a_prepared_tree_trains_with_image_seg_data(sources, tmp_path):
    out = tmp_path / "data"
    prepare(PrepareOptions(sources / "images", sources / "scribbles", out, truth=sources / "truth",
                           classes=sources / "classes.txt"))
    for source in ("train.txt", "val.txt"):
        text = (f'name: "data" type: "ImageSegData" top: "data" top: "label" '
                f'image_data_param {{ source: "{out / "list" / source}" root_folder: "{out}/" '
                f"batch_size: 2 label_type: PIXEL shuffle: true }} "
                f"transform_param {{ mean_value: 104 mean_value: 117 mean_value: 123 crop_size: 20 mirror: true }}")
        layer = layer_class("ImageSegData")(text_format.Parse(text, caffe_pb2.LayerParameter()), [], caffe_pb2.TRAIN)
        try:
            data, label, _ = layer()
        finally:
            layer.close()
        assert data.shape == (2, 3, 20, 20) and label.shape == (2, 1, 20, 20)
        assert set(np.unique(label.numpy()).tolist()) <= {0, 1, 2, 255}


def test_the_palette_warning_is_not_shown_for_files_that_are_converted(sources, tmp_path, caplog):
    dataset_labels.read_source_label(str(sources / "scribbles" / "photo1.png"), "scribbles")
    assert "palette" not in caplog.text


def test_prepare_on_the_msrc21_photos(tmp_path):
    msrc = shared_path("data", "msrc21")
    out = tmp_path / "msrc"
    report = prepare(PrepareOptions(msrc / "JPEGImages", msrc / "scribbles", out, truth=msrc / "SegmentationClass",
                                    classes=msrc / "classes.txt", val_list=msrc / "list" / "val_id.txt"))
    assert "images        335 (train 276, val 59; val from the list" in report
    assert "classes       21 (from " in report and " building " in report
    for name in ("train.txt", "val.txt", "train_full.txt"):  # the shared tree's lists, its images under images/
        ours = (out / "list" / name).read_text()
        assert ours == (msrc / "list" / name).read_text().replace("JPEGImages/", "images/"), name
    assert check_tree(out).lines == 276 * 2 + 59
    assert check_tree(msrc).lines > 0  # the shared tree itself passes the checks


def test_check_reads_lists_with_a_leading_slash_and_takes_another_classes_file(sources, tmp_path, capsys):
    out = tmp_path / "data"
    prepare(PrepareOptions(sources / "images", sources / "scribbles", out))
    train = (out / "list" / "train.txt").read_text()
    (out / "list" / "train.txt").write_text("".join(f"/{a} /{b}\n" for a, b in (line.split() for line in
                                                                               train.splitlines())))
    (out / "classes.txt").rename(tmp_path / "classes.txt")
    assert main(["data", "check", str(out)]) == 1
    error = _error(capsys)
    assert "classes file '" in error and "does not exist" in error and len(error.splitlines()) == 2
    assert main(["data", "check", str(out), "--classes", str(tmp_path / "classes.txt")]) == 0
    assert "no problems" in capsys.readouterr().out
