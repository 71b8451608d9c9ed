"""Caffe's Data layer over LMDB databases written here with the lmdb package: raw uint8, float and
encoded PNG datums; key order with wrap-around, the label top, scale and mean_value, centre (TEST)
and random (TRAIN) crops and mirror, mean_file from a binaryproto, exact resume of the position (by
hand and through a solver snapshot), data-parallel sharing, and the errors. Expected values are
numpy formulas of Caffe's DataTransformer written here."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from PIL import Image

from rloss.errors import DataError, LayerError, WeightsError
from rloss.layers import layer_class
from rloss.proto import caffe_pb2
from rloss.solver import Solver

lmdb = pytest.importorskip("lmdb", reason="the Data layer's tests need the lmdb package (pip install lmdb)")


# ---- writing databases --------------------------------------------------------------------------------

def write_lmdb(path: Path, records: dict[bytes, caffe_pb2.Datum]) -> str:
    """An LMDB database of `records`, put in reverse key order (the layer must read key order)."""
    environment = lmdb.open(str(path), map_size=1 << 24)
    with environment.begin(write=True) as txn:
        for key in sorted(records, reverse=True):
            txn.put(key, records[key].SerializeToString())
    environment.close()
    return str(path)


def raw_datum(image_chw: np.ndarray, label: int) -> caffe_pb2.Datum:
    channels, height, width = image_chw.shape
    return caffe_pb2.Datum(channels=channels, height=height, width=width, label=label,
                           data=image_chw.astype(np.uint8).tobytes())


def float_datum(values_chw: np.ndarray, label: int) -> caffe_pb2.Datum:
    channels, height, width = values_chw.shape
    datum = caffe_pb2.Datum(channels=channels, height=height, width=width, label=label)
    datum.float_data.extend(values_chw.reshape(-1).tolist())
    return datum


def png_datum(pixels: np.ndarray, label: int) -> caffe_pb2.Datum:
    """An encoded datum: `pixels` (H, W, 3 RGB / 4 RGBA, or H, W grey) written as a PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return caffe_pb2.Datum(encoded=True, data=buffer.getvalue(), label=label)


def key(index: int) -> bytes:
    return f"{index:08d}".encode()


@pytest.fixture
def images() -> np.ndarray:
    """Five random 3 x 6 x 7 uint8 images (C x H x W)."""
    return np.random.default_rng(3).integers(0, 256, size=(5, 3, 6, 7), dtype=np.uint8)


@pytest.fixture
def raw_db(tmp_path, images) -> str:
    return write_lmdb(tmp_path / "raw", {key(i): raw_datum(image, 10 + i) for i, image in enumerate(images)})


MADE: list = []


def make(source: str, batch: int = 2, transform: str = "", tops: str = 'top: "data" top: "label"',
         phase: int = caffe_pb2.TRAIN, extra: str = ""):
    text = (f'name: "db" type: "Data" {tops} data_param {{ source: "{source}" backend: LMDB batch_size: {batch} '
            f'{extra} }} transform_param {{ {transform} }}')
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    layer = layer_class("Data")(param, [], phase)
    MADE.append(layer)
    return layer


def batches(layer, count: int) -> list[list[np.ndarray]]:
    return [[top.numpy() for top in layer()] for _ in range(count)]


@pytest.fixture(autouse=True)
def closed_layers():
    """The Data layers a test made with `make` are closed at its end (their loader threads stop)."""
    yield
    while MADE:
        MADE.pop().close()


# ---- order, label, values ---------------------------------------------------------------------------

def test_batches_follow_key_order_and_wrap_around_with_labels(raw_db, images):
    layer = make(raw_db)
    assert layer.top_shapes == [(2, 3, 6, 7), (2,)]
    order = [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]  # 5 records: the third batch straddles the end
    for (data, label), indices in zip(batches(layer, 5), order):
        np.testing.assert_array_equal(data, images[indices].astype(np.float32))
        np.testing.assert_array_equal(label, np.array(indices, dtype=np.float32) + 10)
        assert data.dtype == np.float32


def test_one_top_gives_data_only(raw_db, images):
    layer = make(raw_db, batch=3, tops='top: "data"')
    assert layer.top_shapes == [(3, 3, 6, 7)]
    (data,) = layer()
    np.testing.assert_array_equal(data.numpy(), images[:3])


@pytest.mark.parametrize("means", [[104.0, 117.0, 123.5], [99.25]])
def test_scale_and_mean_values_in_float32(raw_db, images, means):
    mean_text = " ".join(f"mean_value: {m}" for m in means)
    layer = make(raw_db, batch=5, transform=f"scale: 0.017 {mean_text}")
    (data, _), = batches(layer, 1)
    mean = np.array(means, dtype=np.float32).reshape(-1, 1, 1)
    expected = (images.astype(np.float32) - mean) * np.float32(0.017)
    np.testing.assert_array_equal(data, expected)


def test_test_phase_takes_the_centre_crop(raw_db, images):
    layer = make(raw_db, batch=5, transform="crop_size: 4", phase=caffe_pb2.TEST)
    assert layer.top_shapes[0] == (5, 3, 4, 4)
    (data, _), = batches(layer, 1)
    np.testing.assert_array_equal(data, images[:, :, 1:5, 1:5])  # offsets (6 - 4) // 2, (7 - 4) // 2


def crop_windows(image: np.ndarray, crop: int) -> dict[tuple[int, int, bool], np.ndarray]:
    """Every crop x crop window of a C x H x W image, plain and mirrored, by (row, column, mirrored)."""
    _, height, width = image.shape
    windows = {}
    for row in range(height - crop + 1):
        for column in range(width - crop + 1):
            window = image[:, row:row + crop, column:column + crop]
            windows[(row, column, False)], windows[(row, column, True)] = window, window[:, :, ::-1]
    return windows


def test_train_phase_draws_random_crops_and_mirrors(raw_db, images):
    """Every sample is one of the crop windows of its record, mirrored or not; over 40 samples both
    mirror states and several offsets occur (each window has probability 1/24)."""
    torch.manual_seed(0)
    layer = make(raw_db, batch=5, transform="crop_size: 4 mirror: true")
    seen = set()
    for data, label in batches(layer, 8):
        for sample, record in zip(data, label.astype(int) - 10):
            matches = [where for where, window in crop_windows(images[record], 4).items()
                       if np.array_equal(window, sample)]
            assert matches, "a sample is no crop window of its record"
            seen.update(matches)
    assert {mirror for _, _, mirror in seen} == {False, True}
    assert len({(row, column) for row, column, _ in seen}) >= 6


def test_torch_seed_fixes_the_draws(raw_db):
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(batches(make(raw_db, transform="crop_size: 3 mirror: true"), 3))
    for first, second in zip(*runs):
        np.testing.assert_array_equal(first[0], second[0])


def write_mean(path: Path, mean_chw: np.ndarray) -> str:
    channels, height, width = mean_chw.shape
    blob = caffe_pb2.BlobProto(num=1, channels=channels, height=height, width=width)
    blob.data.extend(mean_chw.reshape(-1).tolist())
    path.write_bytes(blob.SerializeToString())
    return str(path)


def test_mean_file_is_cropped_with_the_datum(tmp_path, raw_db, images):
    mean = np.random.default_rng(8).uniform(0, 255, size=(3, 6, 7)).astype(np.float32)
    mean_file = write_mean(tmp_path / "mean.binaryproto", mean)
    layer = make(raw_db, batch=5, transform=f'crop_size: 4 scale: 0.5 mean_file: "{mean_file}"',
                 phase=caffe_pb2.TEST)
    (data, _), = batches(layer, 1)
    expected = ((images.astype(np.float32) - mean) * np.float32(0.5))[:, :, 1:5, 1:5]
    np.testing.assert_array_equal(data, expected)


def test_float_datums_are_scaled(tmp_path):
    values = np.random.default_rng(1).normal(size=(3, 2, 4, 5)).astype(np.float32)
    source = write_lmdb(tmp_path / "float", {key(i): float_datum(v, i) for i, v in enumerate(values)})
    layer = make(source, batch=3, transform="scale: 2 mean_value: 0.5 mean_value: -1")
    (data, label), = batches(layer, 1)
    expected = (values - np.array([0.5, -1], np.float32).reshape(2, 1, 1)) * np.float32(2)
    np.testing.assert_array_equal(data, expected)
    np.testing.assert_array_equal(label, [0, 1, 2])


def test_encoded_pngs_decode_as_opencv_does(tmp_path):
    """Colour PNGs give BGR, grey ones one channel (Caffe's native decode), force_color makes grey
    ones BGR, RGBA ones give BGRA."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(5, 6), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    colour_db = write_lmdb(tmp_path / "rgb", {key(i): png_datum(image, i) for i, image in enumerate(rgb)})
    (data, label), = batches(make(colour_db), 1)
    np.testing.assert_array_equal(data, rgb[:, :, :, ::-1].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(label, [0, 1])
    grey_db = write_lmdb(tmp_path / "grey", {key(0): png_datum(grey, 7)})
    (data, _), = batches(make(grey_db, batch=1), 1)
    np.testing.assert_array_equal(data, grey[None, None])
    (data, _), = batches(make(grey_db, batch=1, transform="force_color: true"), 1)
    np.testing.assert_array_equal(data, np.broadcast_to(grey, (1, 3, 5, 6)))
    rgba_db = write_lmdb(tmp_path / "rgba", {key(0): png_datum(rgba, 7)})
    (data, _), = batches(make(rgba_db, batch=1), 1)
    np.testing.assert_array_equal(data[0], rgba[:, :, [2, 1, 0, 3]].transpose(2, 0, 1))


def test_force_gray_gives_libpng_luma(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    source = write_lmdb(tmp_path / "rgb", {key(0): png_datum(rgb, 0)})
    (data, _), = batches(make(source, batch=1, transform="force_gray: true"), 1)
    red, green, blue = (rgb[:, :, i].astype(np.int64) for i in range(3))
    luma = (9797 * red + 19234 * green + 3737 * blue) >> 15  # 0.299, 0.587 and the rest in 15-bit fixed point
    np.testing.assert_array_equal(data[0, 0], luma)


def test_each_batch_takes_the_shape_of_its_records(tmp_path):
    small, large = np.zeros((1, 2, 3), np.uint8), np.ones((1, 4, 5), np.uint8)
    source = write_lmdb(tmp_path / "sizes", {key(0): raw_datum(small, 0), key(1): raw_datum(large, 1)})
    layer = make(source, batch=1)
    assert [data.shape for data, _ in batches(layer, 2)] == [(1, 1, 2, 3), (1, 1, 4, 5)]
    with pytest.raises(DataError, match="the first of its batch"):
        make(source, batch=2)()


# ---- resume, sharing ----------------------------------------------------------------------------------

def test_data_state_counts_consumed_batches_and_resumes_exactly(raw_db):
    torch.manual_seed(1)
    layer = make(raw_db, transform="crop_size: 3 mirror: true", extra="prefetch: 3")
    batches(layer, 3)  # 6 records: one pass and one more
    state = layer.data_state()
    assert (state.name, state.type, state.epoch, state.cursor) == ("db", "Data", 1, 1)
    expected = batches(layer, 4)
    torch.manual_seed(99)  # another generator: the state must carry the draws
    fresh = make(raw_db, transform="crop_size: 3 mirror: true", extra="prefetch: 3")
    batches(fresh, 1)
    fresh.load_data_state(state)
    for want, got in zip(expected, batches(fresh, 4)):
        np.testing.assert_array_equal(want[0], got[0])
        np.testing.assert_array_equal(want[1], got[1])


def test_a_state_past_the_end_or_without_generator_is_refused(raw_db):
    layer = make(raw_db)
    state = layer.data_state()
    state.cursor = 5
    with pytest.raises(WeightsError, match="past the end"):
        layer.load_data_state(state)
    state.cursor = 0
    state.ClearField("generator")
    with pytest.raises(WeightsError, match="PCG64"):
        layer.load_data_state(state)


def test_shard_reads_every_other_batch(raw_db, images):
    layer = make(raw_db)
    layer.shard(1, 2)
    labels = [label.tolist() for _, label in batches(layer, 2)]
    assert labels == [[12, 13], [11, 12]]  # batches 1 and 3 of [0 1] [2 3] [4 0] [1 2]


NET = """name: "tinydb"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  data_param {{ source: "{source}" backend: LMDB batch_size: 2 }}
  transform_param {{ crop_size: 4 mirror: true scale: 0.01 mean_value: 120 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


def test_a_solver_resumed_from_a_snapshot_equals_an_uninterrupted_run(tmp_path, images, monkeypatch):
    monkeypatch.setenv("RLOSS_SKIP_MEMORY_CHECK", "1")  # its trial runs cost seconds and are tested elsewhere
    labels = {key(i): raw_datum(image, i % 3) for i, image in enumerate(images)}
    net = tmp_path / "net.prototxt"
    net.write_text(NET.format(source=write_lmdb(tmp_path / "db", labels)))

    def solver(folder: str) -> Solver:
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "solver.prototxt"
        path.write_text(f'net: "{net}" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 max_iter: 7 snapshot: 3 '
                        f'test_iter: 1 test_interval: 2 snapshot_after_train: false display: 0 random_seed: 5 '
                        f'solver_mode: CPU '
                        f'snapshot_prefix: "{tmp_path / folder / "snap"}"')
        return Solver(str(path))

    whole = solver("whole")
    whole.solve()
    first = solver("first")
    first.step(3)
    again = solver("again")
    again.solve(resume_file=str(tmp_path / "first" / "snap_iter_3.solverstate"))
    for run in (whole, first, again):
        for net in (run.net, *run.test_nets):  # the test net reads the same database: LMDB is opened once
            net.layers[0].close()
    assert again.net.data_states() == whole.net.data_states()
    assert again.test_nets[0].data_states() == whole.test_nets[0].data_states()
    for a, b in zip(whole.net.learnable, again.net.learnable):
        assert torch.equal(a.tensor, b.tensor)


# ---- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("transform, extra, message", [
    ("", "batch_size: 0", "batch_size must be positive"),
    ("", "batch_size: 2 prefetch: 0", "prefetch must be positive"),
    ("crop_height: 3 crop_width: 3", "batch_size: 2", "give crop_size"),
    ('mean_value: 1 mean_file: "m.binaryproto"', "batch_size: 2", "not both"),
    ("force_color: true force_gray: true", "batch_size: 2", "not both"),
    ('mean_file: "/nonexistent/mean.binaryproto"', "batch_size: 2", "mean_file"),
])
def test_bad_parameters_are_refused(raw_db, transform, extra, message):
    text = (f'name: "db" type: "Data" top: "data" data_param {{ source: "{raw_db}" backend: LMDB {extra} }} '
            f'transform_param {{ {transform} }}')
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    with pytest.raises(LayerError, match=message):
        layer_class("Data")(param, [], caffe_pb2.TRAIN)


def test_leveldb_is_refused(raw_db):
    param = text_format.Parse(f'name: "db" type: "Data" top: "data" data_param {{ source: "{raw_db}" batch_size: 2 }}',
                              caffe_pb2.LayerParameter())
    with pytest.raises(LayerError, match="LEVELDB .* not supported"):
        layer_class("Data")(param, [], caffe_pb2.TRAIN)


def test_without_lmdb_it_says_what_to_install(raw_db, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(LayerError, match=r"needs the lmdb package: pip install rloss\[lmdb\]"):
        make(raw_db)


def test_missing_or_empty_database(tmp_path):
    with pytest.raises(LayerError, match="source must name the LMDB database"):
        make("")
    with pytest.raises(DataError, match="cannot open the LMDB database"):
        make(str(tmp_path / "absent"))
    with pytest.raises(DataError, match="is empty"):
        make(write_lmdb(tmp_path / "empty", {}))


@pytest.mark.parametrize("value, transform, message", [
    (b"\xff\xff\xff", "", "is not a Caffe Datum"),
    (caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc").SerializeToString(), "", "holds 3 data bytes"),
    (caffe_pb2.Datum(channels=0, height=2, width=2).SerializeToString(), "", "must all be positive"),
    (caffe_pb2.Datum(encoded=True, data=b"not a png").SerializeToString(), "", "cannot be decoded"),
    (raw_datum(np.zeros((1, 2, 2)), 0).SerializeToString(), "crop_size: 3", "smaller than crop_size 3"),
    (raw_datum(np.zeros((2, 2, 2)), 0).SerializeToString(), "mean_value: 1 mean_value: 2 mean_value: 3",
     "give mean_value once or 2 times"),
])
def test_bad_records_name_their_entry(tmp_path, value, transform, message):
    environment = lmdb.open(str(tmp_path / "bad"), map_size=1 << 20)
    with environment.begin(write=True) as txn:
        txn.put(b"rec-0", value)
    environment.close()
    with pytest.raises(DataError, match=message) as error:
        make(str(tmp_path / "bad"), batch=1, transform=transform)
    assert "entry 0 (key 'rec-0')" in str(error.value)


def test_a_mean_file_of_another_size_is_refused(tmp_path, raw_db):
    mean_file = write_mean(tmp_path / "mean.binaryproto", np.zeros((3, 5, 7), np.float32))
    with pytest.raises(DataError, match="differ from the mean's"):
        make(raw_db, transform=f'mean_file: "{mean_file}"')
