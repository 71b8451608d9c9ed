"""Input, DummyData and HDF5Data: shapes, feeding, refilling, HDF5 reading order and error reports."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.errors import DataError, LayerError
from rloss.layers import layer_class
from rloss.proto import caffe_pb2
from tests.shared_data import shared_path


def make(text: str, phase=caffe_pb2.TRAIN):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class(param.type)(param, [], phase)


# ---- Input ---------------------------------------------------------------------------------------


def test_input_one_shape_per_top_and_zeros_when_unfed():
    layer = make('name: "in" type: "Input" top: "data" top: "label" '
                 "input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } "
                 "shape { dim: 2 dim: 1 dim: 4 dim: 5 } }")
    assert layer.top_shapes == [(2, 3, 4, 5), (2, 1, 4, 5)]
    data, label = layer()
    assert data.shape == (2, 3, 4, 5) and label.shape == (2, 1, 4, 5)
    assert data.dtype == torch.float32 and not data.any() and not label.any()


def test_input_one_shape_for_all_tops():
    layer = make('name: "in" type: "Input" top: "a" top: "b" top: "c" '
                 "input_param { shape { dim: 1 dim: 7 } }")
    assert layer.top_shapes == [(1, 7)] * 3


def test_input_returns_fed_tensors_and_lets_gradients_reach_them():
    layer = make('name: "in" type: "Input" top: "data" top: "label" input_param { shape { dim: 1 dim: 2 } }')
    data = torch.randn(1, 2, requires_grad=True)
    layer.feed("data", data)
    layer.feed(1, np.array([[3, 4]], dtype=np.uint8))
    for _ in range(2):  # a fed value stays until replaced
        out_data, out_label = layer()
        assert out_data is data
        assert out_label.dtype == torch.float32 and out_label.tolist() == [[3.0, 4.0]]
    (out_data * 2).sum().backward()
    assert data.grad.tolist() == [[2.0, 2.0]]


def test_input_zeros_follow_the_module_dtype():
    layer = make('name: "in" type: "Input" top: "x" input_param { shape { dim: 3 } }').double()
    assert layer()[0].dtype == torch.float64


@pytest.mark.parametrize(
    "text, message",
    [
        ('name: "in" type: "Input" top: "a" top: "b" top: "c" '
         "input_param { shape { dim: 1 } shape { dim: 2 } }", "give input_param shape once or once per top"),
        ('name: "in" type: "Input" top: "a"', "needs a shape"),
        ('name: "in" type: "Input" top: "a" input_param { shape { dim: 2 dim: -1 } }', "negative dimension"),
    ],
)
def test_input_rejects_bad_shapes(text, message):
    with pytest.raises(LayerError, match=rf"'in' \(type Input\).*{message}"):
        make(text)


def test_input_rejects_unknown_tops():
    layer = make('name: "in" type: "Input" top: "data" input_param { shape { dim: 1 } }')
    with pytest.raises(LayerError, match=r"has no top named 'label' \(tops: data\)"):
        layer.feed("label", torch.zeros(1))
    with pytest.raises(LayerError, match="has no top 1"):
        layer.feed(1, torch.zeros(1))


# ---- DummyData -----------------------------------------------------------------------------------


def test_dummy_data_constant_fillers_per_top_with_legacy_dims():
    layer = make('name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { '
                 "num: 2 channels: 3 channels: 1 height: 4 width: 5 "
                 'data_filler { type: "constant" value: 1.5 } data_filler { type: "constant" value: -2 } }')
    assert layer.top_shapes == [(2, 3, 4, 5), (2, 1, 4, 5)]
    a, b = layer()
    assert torch.all(a == 1.5) and torch.all(b == -2.0)


def test_dummy_data_defaults_to_zeros_with_one_shape_for_all_tops():
    layer = make('name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { shape { dim: 3 dim: 2 } }')
    a, b = layer()
    assert a.shape == b.shape == (3, 2) and not a.any() and not b.any()


def test_dummy_data_refills_random_fillers_every_forward():
    layer = make('name: "d" type: "DummyData" top: "a" dummy_data_param { shape { dim: 200 dim: 100 } '
                 'data_filler { type: "gaussian" mean: 1 std: 2 } }')
    torch.manual_seed(0)
    first, second = layer()[0], layer()[0]
    assert not torch.equal(first, second)
    for sample in (first, second):
        assert float(sample.mean()) == pytest.approx(1.0, abs=0.05)
        assert float(sample.std()) == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize(
    "params, message",
    [
        ("shape { dim: 1 } num: 1 channels: 1 height: 1 width: 1", "either shape or num/channels"),
        ("num: 1 channels: 1 height: 1", "give width once or once per top"),
        ("shape { dim: 1 } shape { dim: 2 } shape { dim: 3 }", "give shape once or once per top"),
        ("shape { dim: 1 } data_filler { } data_filler { } data_filler { }", "give data_filler once"),
        ("", "needs shape"),
    ],
)
def test_dummy_data_rejects_inconsistent_parameters(params, message):
    with pytest.raises(LayerError, match=rf"'d' \(type DummyData\).*{message}"):
        make(f'name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param {{ {params} }}')


def test_dummy_data_names_itself_for_an_unknown_filler():
    layer = make('name: "d" type: "DummyData" top: "a" dummy_data_param { shape { dim: 2 } '
                 'data_filler { type: "nonsense" } }')
    with pytest.raises(LayerError, match=r"'d' \(type DummyData\).*unknown filler type 'nonsense'"):
        layer()


# ---- HDF5Data ------------------------------------------------------------------------------------


def hdf5_text(source: str, batch_size: int, shuffle: bool = False, tops=("data", "label")) -> str:
    top_text = " ".join(f'top: "{top}"' for top in tops)
    return (f'name: "h5" type: "HDF5Data" {top_text} hdf5_data_param {{ source: "{source}" '
            f"batch_size: {batch_size} shuffle: {str(shuffle).lower()} }}")


def write_h5(path, rows: int, start: int, label_dtype=np.float32, data_shape=(2, 3)):
    """Row r of `data` is filled with start + r, `label` holds start + r: rows are recognisable."""
    ids = np.arange(start, start + rows)
    with h5py.File(path, "w") as h5:
        h5["data"] = (ids[:, None, None] * np.ones((1, *data_shape))).astype(np.float32)
        h5["label"] = ids.astype(label_dtype)[:, None]
    return path


def row_ids(layer) -> list[int]:
    data, label = layer()
    assert torch.equal(data[:, 0, 0], label[:, 0])
    return [int(v) for v in label[:, 0]]


def test_hdf5_golden_solver_data_in_order_with_wrap_around(monkeypatch):
    folder = shared_path("golden", "02_solver")
    monkeypatch.chdir(folder.parent)  # list and file names are relative to the working directory
    net = text_format.Parse((folder / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    layer = layer_class("HDF5Data")(net.layer[0], [], caffe_pb2.TRAIN)
    assert layer.top_shapes == [(2, 3, 12, 12), (2, 1, 12, 12)]
    with h5py.File(folder / "train.h5", "r") as h5:
        data, label = h5["data"][...], h5["label"][...]
    for start in (0, 2, 0):
        out_data, out_label = layer()
        assert out_data.dtype == torch.float32
        np.testing.assert_array_equal(out_data.numpy(), data[start:start + 2])
        np.testing.assert_array_equal(out_label.numpy(), label[start:start + 2])


def test_hdf5_batches_span_files_and_wrap_to_the_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_h5(tmp_path / "a.h5", rows=3, start=0, label_dtype=np.int32)  # integer datasets become float
    write_h5(tmp_path / "b.h5", rows=2, start=10)
    (tmp_path / "list.txt").write_text("a.h5\n\n  b.h5  \n")
    layer = make(hdf5_text("list.txt", batch_size=4))
    assert layer.top_shapes == [(4, 2, 3), (4, 1)]
    assert row_ids(layer) == [0, 1, 2, 10]
    assert row_ids(layer) == [11, 0, 1, 2]
    assert row_ids(layer) == [10, 11, 0, 1]


def test_hdf5_single_file_shorter_than_a_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_h5(tmp_path / "a.h5", rows=2, start=5)
    (tmp_path / "list.txt").write_text("a.h5\n")
    assert row_ids(make(hdf5_text("list.txt", batch_size=5))) == [5, 6, 5, 6, 5]


def test_hdf5_shuffle_draws_a_permutation_of_each_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_h5(tmp_path / "a.h5", rows=6, start=0)
    write_h5(tmp_path / "b.h5", rows=6, start=100)
    (tmp_path / "list.txt").write_text("a.h5 b.h5\n")  # names are whitespace-separated, as in Caffe
    torch.manual_seed(3)
    layer = make(hdf5_text("list.txt", batch_size=6, shuffle=True))
    passes = [row_ids(layer) for _ in range(6)]
    orders = set()
    for ids in passes:
        assert sorted(ids) in (list(range(6)), list(range(100, 106)))
        orders.add(tuple(ids))
    assert len(orders) > 1  # not the file order


def test_hdf5_reports_a_missing_file_with_its_list_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_h5(tmp_path / "a.h5", rows=1, start=0)
    (tmp_path / "list.txt").write_text("a.h5\nmissing.h5\n")
    layer = make(hdf5_text("list.txt", batch_size=1))
    layer()
    with pytest.raises(DataError, match=r"'h5' \(type HDF5Data\).*'missing.h5' "
                                        r"\(line 2 of the list 'list.txt'\)"):
        layer()


def test_hdf5_reports_a_missing_or_empty_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="cannot read the list file 'nolist.txt'"):
        make(hdf5_text("nolist.txt", batch_size=1))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="the list file 'empty.txt' names no file"):
        make(hdf5_text("empty.txt", batch_size=1))


def test_hdf5_reports_bad_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_h5(tmp_path / "a.h5", rows=2, start=0)
    (tmp_path / "list.txt").write_text("a.h5\n")
    with pytest.raises(DataError, match=r"'a.h5' \(line 1 .* has no dataset 'weights' "
                                        r"\(it holds: data, label\)"):
        make(hdf5_text("list.txt", batch_size=1, tops=("data", "weights")))
    with h5py.File(tmp_path / "rows.h5", "w") as h5:
        h5["data"], h5["label"] = np.zeros((3, 2), np.float32), np.zeros((2, 1), np.float32)
    (tmp_path / "rows.txt").write_text("rows.h5\n")
    with pytest.raises(DataError, match="same, non-zero number of rows, got data: 3, label: 2"):
        make(hdf5_text("rows.txt", batch_size=1))


def test_hdf5_reports_a_later_file_with_other_sample_shapes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_h5(tmp_path / "a.h5", rows=1, start=0)
    write_h5(tmp_path / "b.h5", rows=1, start=1, data_shape=(3, 3))
    (tmp_path / "list.txt").write_text("a.h5\nb.h5\n")
    layer = make(hdf5_text("list.txt", batch_size=1))
    layer()
    with pytest.raises(DataError, match=r"'b.h5' \(line 2 .*\(3, 3\).*"
                                        r"the first file had \[\(2, 3\), \(1,\)\]"):
        layer()


def test_hdf5_rejects_bad_parameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_h5(tmp_path / "a.h5", rows=1, start=0)
    (tmp_path / "list.txt").write_text("a.h5\n")
    with pytest.raises(LayerError, match="batch_size must be positive, got 0"):
        make(hdf5_text("list.txt", batch_size=0))
    with pytest.raises(LayerError, match="does not transform its data"):
        make(hdf5_text("list.txt", batch_size=1) + " transform_param { scale: 2 }")


def test_hdf5_without_h5py_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_h5(tmp_path / "a.h5", rows=1, start=0)
    (tmp_path / "list.txt").write_text("a.h5\n")
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(LayerError, match=r"needs the h5py package \(pip install h5py\)"):
        make(hdf5_text("list.txt", batch_size=1))
