"""The synthetic scribble dataset: deterministic, loadable by ImageSegData, scribbles like PASCAL's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from rloss.data.synthetic import IGNORE, write_dataset
from rloss.layers import layer_class
from rloss.proto import caffe_pb2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synthetic"), train=16, val=4, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(dataset, tmp_path):
    again = write_dataset(tmp_path / "again", train=16, val=4, seed=3)
    other = write_dataset(tmp_path / "other", train=16, val=4, seed=4)
    assert _files(dataset.root) == _files(again.root)
    ours, theirs = _files(dataset.root), _files(other.root)
    assert ours.keys() == theirs.keys()
    assert any(ours[name] != theirs[name] for name in ours if name.endswith(".png"))


def test_lists_name_existing_files(dataset):
    lines = {name: (dataset.root / "list" / name).read_text().splitlines()
             for name in ("train.txt", "train_full.txt", "val.txt", "train_id.txt", "val_id.txt")}
    assert len(lines["train.txt"]) == len(lines["train_full.txt"]) == len(lines["train_id.txt"]) == 16
    assert len(lines["val.txt"]) == len(lines["val_id.txt"]) == 4
    for name in ("train.txt", "train_full.txt", "val.txt"):
        for line in lines[name]:
            image, label = line.split()
            assert (dataset.root / image).is_file() and (dataset.root / label).is_file()
    assert (dataset.root / "classes.txt").read_text().splitlines()[0] == "0 background"


def _pairs(dataset):
    for image_id in (dataset.root / "list" / "train_id.txt").read_text().split():
        truth = Image.open(dataset.root / "SegmentationClass" / f"{image_id}.png")
        scribbles = Image.open(dataset.root / "scribbles" / f"{image_id}.png")
        assert truth.mode == scribbles.mode == "L"  # plain grey index PNGs, read the same by Caffe
        yield np.asarray(truth), np.asarray(scribbles)


def test_scribbles_are_sparse_and_agree_with_the_ground_truth(dataset):
    fractions, covered, present = [], 0, 0
    for truth, scribbles in _pairs(dataset):
        assert set(np.unique(truth)) <= set(range(dataset.num_classes))
        marked = scribbles != IGNORE
        assert np.array_equal(scribbles[marked], truth[marked])
        assert 0 in scribbles[marked]  # the background is always scribbled
        fractions.append(marked.mean())
        classes = set(np.unique(truth).tolist())
        present += len(classes)
        covered += len(classes & set(np.unique(scribbles[marked]).tolist()))
    assert 0.02 <= np.mean(fractions) <= 0.05, np.mean(fractions)
    assert covered >= 0.9 * present


def test_files_load_through_image_seg_data(dataset):
    for source, full in (("train.txt", False), ("train_full.txt", True), ("val.txt", True)):
        text = (f'name: "data" type: "ImageSegData" top: "data" top: "label" '
                f'image_data_param {{ source: "{dataset.root / "list" / source}" root_folder: "{dataset.root}/" '
                f"batch_size: 4 label_type: PIXEL shuffle: true }} "
                f"transform_param {{ mean_value: 104.008 mean_value: 116.669 mean_value: 122.675 "
                f"crop_size: 64 mirror: true }}")
        param = text_format.Parse(text, caffe_pb2.LayerParameter())
        layer = layer_class("ImageSegData")(param, [], caffe_pb2.TRAIN)
        try:
            data, label, data_dim = layer()
        finally:
            layer.close()
        assert data.shape == (4, 3, 64, 64) and label.shape == (4, 1, 64, 64)
        values = set(np.unique(label.numpy()).tolist())
        assert values <= set(range(dataset.num_classes)) | {IGNORE}
        assert (IGNORE in values) != full  # scribbles leave most pixels unlabelled; ground truth none
        assert data_dim.reshape(4, 2).tolist() == [[64, 64]] * 4
