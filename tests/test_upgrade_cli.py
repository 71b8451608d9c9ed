"""`python -m rloss upgrade IN OUT`, run through the command line's main function: old nets, solvers and
binary models written in the V2 form, and bad input refused with one error line and exit code 1."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from rloss.cli.main import main
from rloss.cli.upgrade import is_solver_text
from rloss.proto import caffe_pb2

V1_NET = """name: "old"  # a comment the output does not keep
layers {
  name: "data" type: IMAGE_SEG_DATA top: "data" top: "label"
  image_data_param { source: "${EXP}/list.txt" batch_size: 2 has_label: false }
  transform_param { crop_size: 9 }
}
layers {
  name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: ${NUM_LABELS} kernel_size: 3 pad: 2 hole: 2 }
}
layers { name: "shrink" type: INTERP bottom: "label" top: "small" interp_param { shrink_factor: 8 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "conv" bottom: "small" strict_dim: false
  softmaxloss_param { ignore_label: 255 } }
"""

V2_NET = """name: "old"
layer {
  name: "data" type: "ImageSegData" top: "data" top: "label"
  image_data_param { source: "voc/list.txt" batch_size: 2 label_type: NONE }
  transform_param { crop_size: 9 }
}
layer {
  name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 5 kernel_size: 3 pad: 2 dilation: 2 }
}
layer { name: "shrink" type: "Interp" bottom: "label" top: "small" interp_param { shrink_factor: 8 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv" bottom: "small" loss_param { ignore_label: 255 } }
"""

SETS = ["--set", "EXP=voc", "--set", "NUM_LABELS=5"]


def upgrade(source, target, *flags: str) -> int:
    return main(["upgrade", str(source), str(target), *flags])


def error_of(capsys) -> str:
    """The command's error (its one `rloss: error:` line and what follows it); a traceback would be a bug."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("rloss: error: ") == 1
    return err[err.index("rloss: error: "):]


def parsed(path, message_type=caffe_pb2.NetParameter):
    return text_format.Parse(path.read_text(), message_type())


# ---- nets ------------------------------------------------------------------------------------------

def test_v1_net_text_becomes_the_expected_v2_text(tmp_path):
    (tmp_path / "old.prototxt").write_text(V1_NET)
    assert upgrade(tmp_path / "old.prototxt", tmp_path / "new.prototxt", *SETS) == 0
    written = (tmp_path / "new.prototxt").read_text()
    assert "layers" not in written and "comment" not in written
    assert parsed(tmp_path / "new.prototxt") == text_format.Parse(V2_NET, caffe_pb2.NetParameter())


def test_upgrading_a_v2_net_changes_nothing(tmp_path):
    (tmp_path / "v2.prototxt").write_text(V2_NET)
    assert upgrade(tmp_path / "v2.prototxt", tmp_path / "once.prototxt") == 0
    assert upgrade(tmp_path / "once.prototxt", tmp_path / "twice.prototxt") == 0
    assert parsed(tmp_path / "once.prototxt") == text_format.Parse(V2_NET, caffe_pb2.NetParameter())
    assert (tmp_path / "twice.prototxt").read_bytes() == (tmp_path / "once.prototxt").read_bytes()


def test_a_placeholder_without_a_value_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    (tmp_path / "old.prototxt").write_text(V1_NET.replace("batch_size: 2", 'batch_size: 2 root_folder: "${DATA_ROOT}"'))
    assert upgrade(tmp_path / "old.prototxt", tmp_path / "new.prototxt", *SETS) == 1
    assert "old.prototxt:4:76: ${DATA_ROOT} has no value; set it with --set DATA_ROOT=<value>" in error_of(capsys)
    assert not (tmp_path / "new.prototxt").exists()


def test_v0_net_is_refused(tmp_path, capsys):
    (tmp_path / "v0.prototxt").write_text('layers { layer { name: "conv1" type: "conv" num_output: 4 } }')
    assert upgrade(tmp_path / "v0.prototxt", tmp_path / "out.prototxt") == 1
    assert "layer #0 ('') uses the V0 format" in error_of(capsys)
    assert not (tmp_path / "out.prototxt").exists()


def test_a_deeplab_v1_conflict_names_the_file_and_layer(tmp_path, capsys):
    text = 'layers { name: "fc6" type: CONVOLUTION convolution_param { kernel_size: 3 hole: 4 dilation: 4 } }'
    (tmp_path / "bad.prototxt").write_text(text)
    assert upgrade(tmp_path / "bad.prototxt", tmp_path / "out.prototxt") == 1
    assert f"{tmp_path / 'bad.prototxt'}: layer #0 ('fc6'): convolution_param sets both" in error_of(capsys)


def test_a_typo_is_the_parsers_error_with_its_hint(tmp_path, capsys):
    (tmp_path / "typo.prototxt").write_text('name: "n"\nlayer { name: "a" type: "ReLU" bottm: "x" }\n')
    assert upgrade(tmp_path / "typo.prototxt", tmp_path / "out.prototxt") == 1
    error = error_of(capsys)
    assert 'typo.prototxt:2:32: Message type "caffe.LayerParameter" has no field named "bottm"' in error
    assert "hint: did you mean bottom?" in error


# ---- solvers ---------------------------------------------------------------------------------------

def test_solver_type_enum_becomes_the_type_string(tmp_path):
    (tmp_path / "solver.prototxt").write_text(
        'net: "train.prototxt"\nbase_lr: 0.001\nsolver_type: ADAGRAD\ndelta: 1e-6\nmax_iter: 10\n')
    assert upgrade(tmp_path / "solver.prototxt", tmp_path / "new.prototxt") == 0
    solver = parsed(tmp_path / "new.prototxt", caffe_pb2.SolverParameter)
    assert solver.type == "AdaGrad" and not solver.HasField("solver_type")
    assert (solver.net, solver.base_lr, solver.max_iter) == ("train.prototxt", pytest.approx(0.001), 10)


def test_inline_v1_net_of_a_solver_is_upgraded(tmp_path):
    (tmp_path / "solver.prototxt").write_text(
        'base_lr: 0.1\ntrain_net_param { layers { name: "r" type: RELU bottom: "x" top: "x" } }\n')
    assert upgrade(tmp_path / "solver.prototxt", tmp_path / "new.prototxt") == 0
    solver = parsed(tmp_path / "new.prototxt", caffe_pb2.SolverParameter)
    assert solver.train_net_param == text_format.Parse(
        'layer { name: "r" type: "ReLU" bottom: "x" top: "x" }', caffe_pb2.NetParameter())


def test_solver_with_both_solver_type_and_type_is_an_error(tmp_path, capsys):
    (tmp_path / "solver.prototxt").write_text('base_lr: 0.1\nsolver_type: NESTEROV\ntype: "Adam"\n')
    assert upgrade(tmp_path / "solver.prototxt", tmp_path / "new.prototxt") == 1
    assert "both the deprecated `solver_type` (NESTEROV) and `type`" in error_of(capsys)


@pytest.mark.parametrize(("text", "solver"), [
    ('base_lr: 0.1 lr_policy: "fixed" net: "n.prototxt"', True),
    ('name: "n" layer { name: "a" }', False),
    ('name: "n" debug_info: true', False),  # debug_info is both's: the net's name decides
    ("", False),
    ("base_lr: 0.1 layers {", True),  # as far as it is well-formed
])
def test_solver_or_net_is_told_by_the_top_level_field_names(text, solver):
    assert is_solver_text(text) is solver


# ---- binary models ---------------------------------------------------------------------------------

def v1_model(rng: np.random.Generator):
    """A V1 .caffemodel as old Caffe wrote it: `layers` with enum types and legacy 4-d blobs."""
    net = caffe_pb2.NetParameter(name="old")
    for name, layer_type, shapes in (("conv1", "CONVOLUTION", [(4, 3, 3, 3), (1, 1, 1, 4)]),
                                     ("relu1", "RELU", []),
                                     ("fc", "INNER_PRODUCT", [(1, 1, 2, 36), (1, 1, 1, 2)])):
        layer = net.layers.add(name=name, type=caffe_pb2.V1LayerParameter.LayerType.Value(layer_type))
        layer.blobs_lr.extend([1, 2] if shapes else [])
        for shape in shapes:
            blob = layer.blobs.add(num=shape[0], channels=shape[1], height=shape[2], width=shape[3])
            blob.data.extend(rng.standard_normal(int(np.prod(shape))).astype(np.float32))
    return net


def test_binary_v1_model_becomes_a_binary_v2_model_with_equal_weights(tmp_path):
    old = v1_model(np.random.default_rng(0))
    (tmp_path / "old.caffemodel").write_bytes(old.SerializeToString())
    assert upgrade(tmp_path / "old.caffemodel", tmp_path / "new.caffemodel") == 0
    new = caffe_pb2.NetParameter.FromString((tmp_path / "new.caffemodel").read_bytes())
    assert not len(new.layers)
    assert [(layer.name, layer.type) for layer in new.layer] == [
        ("conv1", "Convolution"), ("relu1", "ReLU"), ("fc", "InnerProduct")]
    for v1, v2 in zip(old.layers, new.layer):
        assert len(v2.blobs) == len(v1.blobs)
        for before, after in zip(v1.blobs, v2.blobs):
            assert after == before  # shape fields and values, bit for bit
    assert [spec.lr_mult for spec in new.layer[0].param] == [1, 2]


def test_binary_v2_model_is_written_unchanged(tmp_path):
    text = 'name: "m" layer { name: "c" type: "Convolution" blobs { shape { dim: 2 } data: 1.5 data: -2 } }'
    model = text_format.Parse(text, caffe_pb2.NetParameter())
    (tmp_path / "in.caffemodel").write_bytes(model.SerializeToString())
    assert upgrade(tmp_path / "in.caffemodel", tmp_path / "out.caffemodel") == 0
    assert caffe_pb2.NetParameter.FromString((tmp_path / "out.caffemodel").read_bytes()) == model


def deeplab_v1_model() -> bytes:
    """DeepLab v1's bytes for a V1 layer with convolution_param { hole: 2 }: its field 17 (here force_nd_im2col)."""
    layer = caffe_pb2.V1LayerParameter(name="fc6", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
    convolution = bytes([0x08, 0x04, 0x88, 0x01, 0x02])  # num_output (1) = 4, field 17 = 2
    layer_bytes = layer.SerializeToString() + bytes([0x52, len(convolution)]) + convolution  # field 10
    return bytes([0x12, len(layer_bytes)]) + layer_bytes  # NetParameter.layers (2)


def test_deeplab_v1_binary_model_is_refused(tmp_path, capsys):
    (tmp_path / "v1.caffemodel").write_bytes(deeplab_v1_model())
    assert upgrade(tmp_path / "v1.caffemodel", tmp_path / "out.caffemodel") == 1
    assert "a DeepLab v1 model (layer(s) fc6 use its field and type numbers" in error_of(capsys)
    assert not (tmp_path / "out.caffemodel").exists()


@pytest.mark.parametrize(("name", "data", "message"), [
    ("bad.caffemodel", b"\x12\xff\x01\x0a", "not a Caffe model (.caffemodel), or truncated/corrupt"),
    ("bad.caffemodel", b"\x08\x96\x01\x10\x01", "not a Caffe model: it holds no layers"),
    ("bad.h5", b"\x89HDF\r\n\x1a\n" + bytes(64), "an HDF5 model holds layer names and blobs only"),
])
def test_a_bad_binary_is_an_error(tmp_path, capsys, name, data, message):
    (tmp_path / name).write_bytes(data)
    assert upgrade(tmp_path / name, tmp_path / "out.caffemodel") == 1
    assert message in error_of(capsys)
    assert not (tmp_path / "out.caffemodel").exists()


# ---- files -----------------------------------------------------------------------------------------

def test_a_missing_or_empty_input_is_an_error(tmp_path, capsys):
    assert upgrade(tmp_path / "absent.prototxt", tmp_path / "out.prototxt") == 1
    assert "absent.prototxt: cannot read: No such file or directory" in error_of(capsys)
    (tmp_path / "empty.prototxt").write_text("\n  \n")
    assert upgrade(tmp_path / "empty.prototxt", tmp_path / "out.prototxt") == 1
    assert "empty.prototxt: the file is empty: nothing to upgrade" in error_of(capsys)


def test_an_unwritable_output_is_an_error_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "v2.prototxt").write_text(V2_NET)
    assert upgrade(tmp_path / "v2.prototxt", tmp_path / "no" / "dir" / "out.prototxt") == 1
    assert "cannot write" in error_of(capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["v2.prototxt"]


def test_an_output_over_the_input_replaces_it(tmp_path):
    (tmp_path / "net.prototxt").write_text(V1_NET)
    assert upgrade(tmp_path / "net.prototxt", tmp_path / "net.prototxt", *SETS) == 0
    assert parsed(tmp_path / "net.prototxt") == text_format.Parse(V2_NET, caffe_pb2.NetParameter())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["net.prototxt"]
