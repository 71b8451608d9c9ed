"""Prototxt reading: `${VAR}` substitution, parse errors with file:line:column and hints, the real
experiment files (their layer counts) and the golden prototxts."""

from __future__ import annotations

import collections

import pytest

from rloss.errors import ProtoError, VariableError
from rloss.proto import caffe_pb2
from rloss.proto.text import expand_variables, parse_net, read_net, read_prototxt, read_solver, split_comment
from tests.shared_data import shared_path

VALUES = {
    "NUM_LABELS": "21", "EXP": "pascal_scribble", "NET_ID": "resnet-101", "DATA_ROOT": "/data/voc/",
    "TRAIN_SET": "train", "TEST_SET": "val", "DENSECRF_LOSS_WEIGHT": "1e-8",
}

# layers per original file, and a few type counts
NET_FILES = {
    "deeplab_largeFOV/train": (43, {"Convolution": 16, "ReLU": 15, "Pooling": 6, "Dropout": 2, "Interp": 1}),
    "deeplab_largeFOV/trainwithdensecrfloss": (46, {"Interp": 2, "Softmax": 1, "DenseCRFLoss": 1}),
    "deeplab_largeFOV/test": (43, {"ImageSegData": 1, "SegAccuracy": 1, "Silence": 1}),
    "deeplab_msc_largeFOV/train": (79, {"Convolution": 31, "ReLU": 25, "Dropout": 12, "Eltwise": 1}),
    "deeplab_msc_largeFOV/trainwithdensecrfloss": (82, {"Interp": 2, "DenseCRFLoss": 1}),
    "deeplab_msc_largeFOV/test": (82, {"Interp": 5, "Eltwise": 1}),
    "deeplab_vgg16/train": (65, {"Convolution": 25, "Dropout": 8, "Silence": 1}),
    "deeplab_vgg16/trainwithdensecrfloss": (68, {"Interp": 2, "Softmax": 1, "DenseCRFLoss": 1}),
    "deeplab_vgg16/test": (63, {"Convolution": 25, "Pooling": 5}),
    "resnet-101/train": (1369, {"Convolution": 324, "BatchNorm": 312, "Scale": 312, "ReLU": 300,
                                "Eltwise": 103, "SoftmaxWithLoss": 4, "SegAccuracy": 4, "Interp": 6}),
    "resnet-101/trainwithdensecrfloss": (1372, {"Interp": 7, "DenseCRFLoss": 1}),
    "resnet-101/test": (1362, {"Interp": 5, "SegAccuracy": 1, "Silence": 1}),
}

# each original solver's (lr_policy, base_lr, max_iter, iter_size)
SOLVER_FILES = {
    "deeplab_largeFOV/solver": ("step", 1e-3, 9000, 1),
    "deeplab_largeFOV/solverwithdensecrfloss": ("step", 1e-4, 9000, 1),
    "deeplab_msc_largeFOV/solver": ("step", 1e-3, 6000, 1),
    "deeplab_msc_largeFOV/solverwithdensecrfloss": ("step", 1e-3, 9000, 1),
    "deeplab_vgg16/solver": ("poly", 1e-3, 20000, 1),
    "deeplab_vgg16/solverwithdensecrfloss": ("poly", 5e-4, 10000, 1),
    "resnet-101/solver": ("poly", 2.5e-4, 20000, 10),
    "resnet-101/solverwithdensecrfloss": ("poly", 1.5e-4, 10000, 10),
}


def config(name: str):
    return shared_path("reference", "rloss-exper", "exper", "pascal_scribble", "config", name + ".prototxt")


def write(tmp_path, text: str, name: str = "net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(function, *args, **kwargs) -> str:
    with pytest.raises(ProtoError) as info:
        function(*args, **kwargs)
    return str(info.value)


# ---- the real files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(NET_FILES))
def test_reference_net_layer_counts(name):
    count, types = NET_FILES[name]
    net = read_net(config(name), values=VALUES)
    assert len(net.layer) == count
    found = collections.Counter(layer.type for layer in net.layer)
    assert {t: found[t] for t in types} == types
    data = net.layer[0]
    assert data.type == "ImageSegData"
    expected_phase = caffe_pb2.TEST if name.endswith("test") else caffe_pb2.TRAIN
    assert [rule.phase for rule in data.include] == [expected_phase]
    for layer in net.layer:
        if layer.type == "SoftmaxWithLoss":
            assert [rule.phase for rule in layer.include] == [caffe_pb2.TRAIN]
    assert "${" not in str(net)


def test_reference_values_land_in_fields():
    net = read_net(config("deeplab_largeFOV/trainwithdensecrfloss"), values=VALUES)
    by_name = {layer.name: layer for layer in net.layer}
    assert by_name["fc8_pascal_scribble"].convolution_param.num_output == 21
    crf = [layer for layer in net.layer if layer.type == "DenseCRFLoss"][0]
    assert crf.loss_weight[0] == pytest.approx(1e-8)
    assert (crf.densecrf_loss_param.bi_xy_std, crf.densecrf_loss_param.bi_rgb_std) == (100, 15)
    assert net.layer[0].image_data_param.root_folder == "/data/voc/"


def test_reference_phase_filtering():
    test_file = config("deeplab_largeFOV/test")
    assert len(read_net(test_file, caffe_pb2.TEST, VALUES).layer) == 43
    train_view = read_net(test_file, caffe_pb2.TRAIN, VALUES)
    assert len(train_view.layer) == 41  # the TEST-only data and Silence layers are gone
    assert train_view.state.phase == caffe_pb2.TRAIN
    resnet = read_net(config("resnet-101/train"), caffe_pb2.TEST, VALUES)
    assert len(resnet.layer) == 1369 - 1 - 4  # data layer and the 4 SoftmaxWithLoss are TRAIN-only


def test_commented_placeholders_survive():
    net = read_net(config("resnet-101/test"), values=VALUES)  # ${TEST_SET_POSTFIX} only in a comment
    assert len(net.layer) == 1362


@pytest.mark.parametrize("name", sorted(SOLVER_FILES))
def test_reference_solvers(name):
    policy, base_lr, max_iter, iter_size = SOLVER_FILES[name]
    solver = read_solver(config(name), values=VALUES)
    assert (solver.lr_policy, solver.max_iter, solver.iter_size) == (policy, max_iter, iter_size)
    assert solver.base_lr == pytest.approx(base_lr)
    assert solver.type == "SGD" and solver.solver_mode == caffe_pb2.SolverParameter.GPU
    assert solver.train_net.startswith("pascal_scribble/config/resnet-101/")
    assert solver.train_net.endswith("_train.prototxt")


def test_every_golden_prototxt_parses():
    golden = shared_path("golden")
    nets = [p for p in golden.rglob("*.prototxt") if "solver" not in p.name]
    solvers = [p for p in golden.rglob("*.prototxt") if "solver" in p.name]
    assert len(nets) >= 20 and len(solvers) >= 3
    for path in nets:
        assert len(read_net(path).layer) > 0, path
    for path in solvers:
        solver = read_solver(path)
        assert solver.net or solver.train_net, path


def test_golden_layer_net_declares_inputs():
    net = read_net(shared_path("golden", "01_layers", "pooling", "net.prototxt"))
    assert len(net.input) == 3 and len(net.input_shape) == 3
    assert {layer.type for layer in net.layer} == {"Pooling"}


# ---- ${VAR} -----------------------------------------------------------------------------------------

def test_missing_variable_names_file_line_and_how(tmp_path):
    path = write(tmp_path, 'name: "n"\nlayer {\n  name: "conv_${EXP}"\n}\n')
    with pytest.raises(VariableError) as info:
        read_net(path)
    message = str(info.value)
    assert f"{path}:3:15:" in message and "${EXP}" in message
    assert "--set EXP=" in message and "environment" in message


def test_several_missing_variables_are_all_listed(tmp_path):
    path = write(tmp_path, 'name: "${A}"\nlayer { name: "${B}" }\n')
    message = error_of(read_net, path)
    assert "${A}" in message and "${B} (line 2)" in message


def test_explicit_values_beat_defaults_and_the_environment_is_never_read(monkeypatch):
    monkeypatch.setenv("Y", "env")
    expanded = expand_variables("${X} ${Y}", "f", values={"X": "set"}, defaults={"X": "d", "Y": "d"})
    assert expanded == "set d"


def test_comments_are_not_substituted_but_hash_in_strings_is_not_a_comment():
    text = 'source: "a#${X}" # uses ${UNSET_IN_COMMENT}\n# ${ALSO_UNSET}\n'
    assert expand_variables(text, "f", {"X": "1"}) == 'source: "a#1" # uses ${UNSET_IN_COMMENT}\n# ${ALSO_UNSET}\n'


def test_split_comment():
    assert split_comment('a: "x#y" # c') == ('a: "x#y" ', "# c")
    assert split_comment("a: 'it\\'s#' #c") == ("a: 'it\\'s#' ", "#c")
    assert split_comment("#only") == ("", "#only")
    assert split_comment("no comment") == ("no comment", "")


def test_malformed_placeholder(tmp_path):
    path = write(tmp_path, 'name: "${NUM LABELS}"\n')
    with pytest.raises(VariableError, match=r":1:8: malformed placeholder"):
        read_net(path)


def test_value_with_line_break_is_rejected():
    with pytest.raises(VariableError, match="line break"):
        expand_variables("name: ${X}", "f", {"X": "a\nb"})


# ---- parse errors -----------------------------------------------------------------------------------

def test_parse_error_has_file_line_column_and_caret(tmp_path):
    path = write(tmp_path, 'layer {\n  name: "p"\n  pooling_param { pool: MAXX }\n}\n')
    message = error_of(read_net, path)
    assert message.startswith(f"{path}:3:25:")
    lines = message.split("\n")
    assert lines[1].strip() == "pooling_param { pool: MAXX }"
    assert lines[2].index("^") == lines[1].index("MAXX")
    assert "did you mean MAX?" in message


def test_typo_in_field_name_suggests_the_field(tmp_path):
    path = write(tmp_path, 'layer {\n  convolution_param {\n    kernal_size: 3\n  }\n}\n')
    message = error_of(read_net, path)
    assert f"{path}:3:5:" in message and "did you mean kernel_size" in message


def test_v1_enum_in_layer_block_hints_the_v2_string(tmp_path):
    path = write(tmp_path, 'layer { name: "c" type: CONVOLUTION }\n')
    message = error_of(read_net, path)
    assert ":1:25:" in message and 'type: "Convolution"' in message and "V1" in message


def test_fork_enum_in_layer_block_hints_the_v2_string(tmp_path):
    path = write(tmp_path, 'layer { name: "crf" type: DENSE_CRF }\n')  # the commented blocks' spelling
    assert 'type: "DenseCRF"' in error_of(read_net, path)


def test_v2_string_in_v1_block_hints_the_enum(tmp_path):
    path = write(tmp_path, 'layers { name: "c" type: "Convolution" }\n')
    message = error_of(read_net, path)
    assert "CONVOLUTION" in message and "`layer { }`" in message


def test_v1_field_in_layer_block_hints_param(tmp_path):
    path = write(tmp_path, 'layer { name: "c" blobs_lr: 1 }\n')
    assert "lr_mult" in error_of(read_net, path)


def test_unquoted_string_hint(tmp_path):
    path = write(tmp_path, 'layer { name: conv1 }\n')
    assert 'double quotes: "conv1"' in error_of(read_net, path)


def test_duplicate_singular_field(tmp_path):
    path = write(tmp_path, 'layer {\n name: "a"\n name: "b"\n}\n')
    message = error_of(read_net, path)
    assert f"{path}:3:" in message and "given twice" in message


def test_unclosed_brace(tmp_path):
    path = write(tmp_path, 'layer {\n  name: "a"\n')
    assert 'Expected "}"' in error_of(read_net, path)


def test_unknown_top_level_field(tmp_path):
    path = write(tmp_path, 'layerz { name: "a" }\n')
    message = error_of(read_net, path)
    assert f"{path}:1:1:" in message and "did you mean layer" in message


def test_missing_required_field_names_the_layer(tmp_path):
    path = write(tmp_path, 'layer { name: "w" type: "MatWrite" mat_write_param { period: 1 } }\n')
    message = error_of(read_net, path)
    assert "mat_write_param.prefix" in message and "'w'" in message


def test_unreadable_files(tmp_path):
    assert "cannot read" in error_of(read_net, tmp_path / "absent.prototxt")
    binary = tmp_path / "weights.prototxt"
    binary.write_bytes(b'name: "x"\n\xff\xfe\x00')
    assert f"{binary}:2: not a UTF-8 text file" in error_of(read_net, binary)


def test_read_prototxt_generic_message(tmp_path):
    path = write(tmp_path, "phase: TEST level: 2 stage: \"${S}\"", "state.prototxt")
    state = read_prototxt(path, caffe_pb2.NetState, values={"S": "deploy"})
    assert (state.phase, state.level, list(state.stage)) == (caffe_pb2.TEST, 2, ["deploy"])


def test_parse_net_accepts_colon_before_blocks():
    net = parse_net('layer: { name: "a" include: { phase: TEST } }', "inline")
    assert net.layer[0].include[0].phase == caffe_pb2.TEST


# ---- solvers -----------------------------------------------------------------------------------------

def test_solver_type_enum_becomes_type_string(tmp_path):
    path = write(tmp_path, 'net: "n.prototxt"\nsolver_type: ADAM\n', "solver.prototxt")
    solver = read_solver(path)
    assert solver.type == "Adam" and not solver.HasField("solver_type")


def test_solver_type_and_type_together_is_an_error(tmp_path):
    path = write(tmp_path, 'solver_type: NESTEROV\ntype: "SGD"\n', "solver.prototxt")
    message = error_of(read_solver, path)
    assert str(path) in message and "solver_type" in message and "NESTEROV" in message


def test_solver_inline_v1_net_is_upgraded(tmp_path):
    path = write(tmp_path, 'net_param { layers { name: "r" type: RELU bottom: "x" top: "x" } }\n', "solver.prototxt")
    solver = read_solver(path)
    assert [(layer.name, layer.type) for layer in solver.net_param.layer] == [("r", "ReLU")]
    assert not len(solver.net_param.layers) and solver.type == "SGD"
