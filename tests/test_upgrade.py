"""V1 -> V2 net upgrade (text and message level), net inputs, and NetState include/exclude filtering."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from rloss.errors import NetError, ProtoError
from rloss.proto import caffe_pb2
from rloss.proto.netstate import filter_net, layer_included, make_state, merge_state, state_meets_rule
from rloss.proto.text import parse_net, read_net
from rloss.proto.upgrade import (
    FORK_V1_TYPE_NAMES,
    V1_TYPE_NAMES,
    net_inputs,
    prepare_v1_text,
    upgrade_solver,
    upgrade_v1_net,
)

V1_NET = """name: "old"   # a DeepLab-v1 style net
layers {
  name: "data" type: IMAGE_SEG_DATA top: "data" top: "label"
  image_data_param { source: "list.txt" batch_size: 2 }
  transform_param { mirror: true crop_size: 5 }
  include { phase: TRAIN }
}
layers {
  name: "conv1"
  type: CONVOLUTION   # type: INTERP in a comment changes nothing
  bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 4 kernel_size: 3 }
}
layers { name: "shrink" type: INTERP bottom: "label" top: "label_shrink"
  interp_param {
    shrink_factor: 8  # a } in a comment
  }
  propagate_down: false
}
layers { name: "acc" type: SEG_ACCURACY bottom: "conv1" bottom: "label_shrink" top: "acc"
  seg_accuracy_param { ignore_label: 255 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "conv1" bottom: "label_shrink"
  loss_param { ignore_label: 255 } loss_weight: 2 }
"""

V2_NET = """name: "old"
layer {
  name: "data" type: "ImageSegData" top: "data" top: "label"
  image_data_param { source: "list.txt" batch_size: 2 }
  transform_param { mirror: true crop_size: 5 }
  include { phase: TRAIN }
}
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 }
}
layer { name: "shrink" type: "Interp" bottom: "label" top: "label_shrink"
  interp_param { shrink_factor: 8 } propagate_down: false }
layer { name: "acc" type: "SegAccuracy" bottom: "conv1" bottom: "label_shrink" top: "acc"
  seg_accuracy_param { ignore_label: 255 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv1" bottom: "label_shrink"
  loss_param { ignore_label: 255 } loss_weight: 2 }
"""


def v2(text: str):
    return text_format.Parse(text, caffe_pb2.NetParameter())


# ---- V1 text ---------------------------------------------------------------------------------------

def test_v1_text_with_fork_layers_upgrades_to_the_v2_net(tmp_path):
    path = tmp_path / "old.prototxt"
    path.write_text(V1_NET)
    assert read_net(path) == v2(V2_NET)


def test_v1_text_keeps_positions_for_errors():
    broken = V1_NET.replace("shrink_factor: 8", "shrink_factr: 8")
    with pytest.raises(ProtoError) as info:
        parse_net(broken, "old.prototxt")
    message = str(info.value)
    assert "old.prototxt:17:5:" in message and "did you mean shrink_factor" in message
    assert "shrink_factr: 8  # a } in a comment" in message  # the user's line, not the rewritten one


def test_v1_text_error_after_a_replaced_type_keeps_its_column():
    text = 'layers { name: "u" type: INTERP bottom: BAD }'
    with pytest.raises(ProtoError) as info:
        parse_net(text, "x")
    lines = str(info.value).split("\n")
    assert lines[0].startswith(f"x:1:{text.index('BAD') + 1}: ")
    assert lines[2].index("^") == lines[1].index("BAD")


def test_prepare_v1_text_leaves_strings_comments_and_v2_nets_alone():
    v2_text = 'layer { name: "layers { type: INTERP }" type: "Interp" }  # layers { type: INTERP }'
    assert prepare_v1_text(v2_text).text == v2_text
    prepared = prepare_v1_text('layers { name: "type: INTERP" type: INTERP }')
    assert prepared.text == 'layers { name: "type: INTERP" type: NONE   }'
    assert prepared.types == {0: "Interp"}


def test_v1_data_layer_transform_fields_move():
    net = parse_net('layers { name: "d" type: DATA top: "d" '
                    'data_param { source: "db" scale: 0.5 mean_file: "m" crop_size: 3 mirror: true batch_size: 4 } '
                    'transform_param { crop_size: 9 } }', "x")
    layer = net.layer[0]
    assert layer.type == "Data"
    assert layer.data_param == text_format.Parse('source: "db" batch_size: 4', caffe_pb2.DataParameter())
    expected = text_format.Parse('scale: 0.5 mean_file: "m" crop_size: 3 mirror: true',
                                 caffe_pb2.TransformationParameter())
    assert layer.transform_param == expected


def test_v1_param_names_and_share_modes():
    net = parse_net('layers { name: "a" type: INNER_PRODUCT param: "w" param: "b" '
                    'blob_share_mode: PERMISSIVE blobs_lr: 0 }', "x")
    params = net.layer[0].param
    assert [p.name for p in params] == ["w", "b"]
    assert params[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE and not params[1].HasField("share_mode")
    assert params[0].lr_mult == 0 and not params[1].HasField("lr_mult")


def test_v1_type_map_covers_the_enum_and_params_exist_in_v2():
    assert set(V1_TYPE_NAMES) == set(caffe_pb2.V1LayerParameter.LayerType.keys())
    assert not set(FORK_V1_TYPE_NAMES) & set(V1_TYPE_NAMES)
    v2_fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    for name in caffe_pb2.V1LayerParameter.DESCRIPTOR.fields_by_name:
        if name.endswith("_param"):
            assert name in v2_fields, name


def test_layer_and_layers_together_is_an_error():
    with pytest.raises(ProtoError, match=r"mixed\.prototxt: the net mixes 1 V2 `layer` entries with 2 V1"):
        parse_net('layer { name: "a" } layers { name: "b" } layers { name: "c" }', "mixed.prototxt")


def test_v0_layers_are_refused():
    with pytest.raises(ProtoError, match=r"layer #0 \('old'\) uses the V0 format"):
        parse_net('layers { name: "old" layer { name: "old" type: "conv" } }', "v0")


def test_unknown_v1_type_suggests_close_names():
    with pytest.raises(ProtoError, match="did you mean INTERP"):
        parse_net('layers { name: "u" type: INTERPP }', "x")


def test_binary_style_upgrade_keeps_blobs():
    net = caffe_pb2.NetParameter(name="bin")
    layer = net.layers.add(name="fc", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    layer.blobs.add(num=1, channels=1, height=2, width=3).data.extend(range(6))
    layer.blobs_lr.extend([1, 2])
    upgraded = upgrade_v1_net(net, "bin.caffemodel")
    assert upgraded.name == "bin" and not len(upgraded.layers)
    assert upgraded.layer[0].type == "InnerProduct"
    assert list(upgraded.layer[0].blobs[0].data) == list(range(6))
    assert [p.lr_mult for p in upgraded.layer[0].param] == [1, 2]
    assert upgrade_v1_net(upgraded, "again") is upgraded


def test_upgrade_solver_in_place():
    solver = caffe_pb2.SolverParameter(solver_type=caffe_pb2.SolverParameter.RMSPROP)
    assert upgrade_solver(solver, "s").type == "RMSProp"
    with pytest.raises(ProtoError, match="both"):
        upgrade_solver(caffe_pb2.SolverParameter(solver_type=0, type="Adam"), "s")


# ---- net inputs -------------------------------------------------------------------------------------

def test_net_inputs_from_input_shape_and_input_dim():
    shaped = v2('input: "a" input_shape { dim: 1 dim: 3 } input: "b" input_shape { dim: 2 dim: 1 dim: 5 dim: 5 }')
    assert net_inputs(shaped) == [("a", (1, 3)), ("b", (2, 1, 5, 5))]
    dims = v2('input: "a" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 5')
    assert net_inputs(dims) == [("a", (1, 3, 4, 5))]
    assert net_inputs(v2('name: "none"')) == []


@pytest.mark.parametrize("text, message", [
    ('input: "a" input_dim: 1 input_dim: 3', "need 4 input_dim values"),
    ('input: "a" input: "b" input_shape { dim: 1 }', "need one input_shape each, found 1"),
    ('input: "a"', "found 0"),
    ('input: "a" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1 input_shape { dim: 1 }', "not both"),
    ('input: "a" input: "a" input_shape { dim: 1 } input_shape { dim: 1 }', "declared twice"),
    ('input: "a" input_shape { dim: -1 }', "negative dimension"),
])
def test_bad_net_inputs(text, message):
    with pytest.raises(NetError, match=message):
        net_inputs(v2('name: "n" ' + text))


# ---- NetState filtering ----------------------------------------------------------------------------

def rule(text: str):
    return text_format.Parse(text, caffe_pb2.NetStateRule())


@pytest.mark.parametrize("rule_text, state, met", [
    ("phase: TRAIN", (caffe_pb2.TRAIN, 0, ()), True),
    ("phase: TRAIN", (caffe_pb2.TEST, 0, ()), False),
    ("", (caffe_pb2.TEST, 0, ()), True),
    ("min_level: 2", (caffe_pb2.TEST, 1, ()), False),
    ("min_level: 2", (caffe_pb2.TEST, 2, ()), True),
    ("max_level: 2", (caffe_pb2.TEST, 3, ()), False),
    ("max_level: -1", (caffe_pb2.TEST, 0, ()), False),
    ("min_level: 0 max_level: 0", (caffe_pb2.TEST, 0, ()), True),
    ('stage: "a" stage: "b"', (caffe_pb2.TEST, 0, ("a",)), False),
    ('stage: "a" stage: "b"', (caffe_pb2.TEST, 0, ("b", "a", "c")), True),
    ('not_stage: "deploy"', (caffe_pb2.TEST, 0, ("deploy",)), False),
    ('not_stage: "deploy"', (caffe_pb2.TEST, 0, ("train",)), True),
    ('phase: TEST stage: "x" not_stage: "y"', (caffe_pb2.TEST, 0, ("x", "y")), False),
])
def test_state_meets_rule(rule_text, state, met):
    assert state_meets_rule(make_state(*state), rule(rule_text)) is met


FILTER_NET = """name: "f" input: "x" input_shape { dim: 1 }
layer { name: "always" }
layer { name: "train_only" include { phase: TRAIN } }
layer { name: "test_or_deep" include { phase: TEST } include { min_level: 3 } }
layer { name: "not_in_deploy" exclude { stage: "deploy" } }
layer { name: "excluded_in_test_level1" exclude { phase: TEST min_level: 1 } }
"""


@pytest.mark.parametrize("state, kept", [
    ((caffe_pb2.TRAIN, 0, ()), ["always", "train_only", "not_in_deploy", "excluded_in_test_level1"]),
    ((caffe_pb2.TEST, 0, ()), ["always", "test_or_deep", "not_in_deploy", "excluded_in_test_level1"]),
    ((caffe_pb2.TEST, 1, ("deploy",)), ["always", "test_or_deep"]),
    ((caffe_pb2.TRAIN, 3, ()), ["always", "train_only", "test_or_deep", "not_in_deploy",
                                "excluded_in_test_level1"]),
])
def test_filter_net(state, kept):
    filtered = filter_net(v2(FILTER_NET), make_state(*state))
    assert [layer.name for layer in filtered.layer] == kept
    assert filtered.name == "f" and list(filtered.input) == ["x"] and len(filtered.input_shape) == 1


def test_include_and_exclude_together_is_an_error():
    net = v2('layer { name: "both" type: "ReLU" include { phase: TRAIN } exclude { phase: TEST } }')
    with pytest.raises(NetError, match=r"layer 'both' \(type ReLU\) has both include and exclude"):
        filter_net(net, make_state(caffe_pb2.TRAIN))
    with pytest.raises(NetError):
        layer_included(net.layer[0], make_state(caffe_pb2.TEST))


def test_filter_refuses_v1_nets():
    with pytest.raises(NetError, match="V1"):
        filter_net(v2('layers { name: "a" }'), make_state(caffe_pb2.TEST))


def test_merge_state_overrides_scalars_and_appends_stages():
    base = make_state(caffe_pb2.TRAIN, 2, ["a"])
    merged = merge_state(base, caffe_pb2.TEST, None, ["b"])
    assert (merged.phase, merged.level, list(merged.stage)) == (caffe_pb2.TEST, 2, ["a", "b"])
    assert list(base.stage) == ["a"]


def test_read_net_uses_the_files_own_state(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('state { stage: "deploy" } ' + FILTER_NET)
    net = read_net(path, caffe_pb2.TEST, level=1)
    assert [layer.name for layer in net.layer] == ["always", "test_or_deep"]
    assert list(net.state.stage) == ["deploy"] and net.state.level == 1
