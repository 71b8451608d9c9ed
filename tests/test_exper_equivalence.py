"""The generated experiment tree (rloss.models) against the original exper/pascal_scribble/config files:
the same messages field by field after `${VAR}` substitution; the committed tree is what the
generators write now; every generated net builds for its phase; variants (crop, labels) build with the
expected score sizes."""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

import pytest
from google.protobuf import text_format

from rloss.errors import NetError, ProtoError
from rloss.models import (
    KINDS,
    NETWORKS,
    ORIGINAL_KINDS,
    ORIGINAL_SOLVER_FILES,
    REGULARIZERS,
    SOLVER_FILES,
    deeplab_largefov,
    deeplab_msc_largefov,
    resnet101_msc,
)
from rloss.models.small_fcn import SMALL_FCN_DIR, small_fcn_files
from rloss.models.write_exper import CONFIG_DIR, exper_files, main, stale_files
from rloss.net import Net
from rloss.netspec import NetBuilder, Var
from rloss.proto import caffe_pb2
from rloss.proto.text import read_net, read_solver
from rloss.wiring import data_layers_to_inputs
from tests.shared_data import REPO, shared_path

ORIGINAL_STEMS = list(ORIGINAL_SOLVER_FILES.values()) + list(ORIGINAL_KINDS)
SMALL_FCN_VALUES = {"CROP_SIZE": "33", "BATCH_SIZE": "2", "BI_XY_STD": "30", "BI_RGB_STD": "15", "DENSECRF_SCALE": "1",
                    "NUM_LABELS": "4", "LIST_DIR": "/absent"}
SMALL_NETS = ["deeplab_largeFOV", "deeplab_msc_largeFOV", "deeplab_vgg16"]


@lru_cache(maxsize=1)
def _generated() -> dict[Path, str]:
    return exper_files()


def _values(net_id: str) -> dict[str, str]:
    return {"NUM_LABELS": "21", "DENSECRF_LOSS_WEIGHT": "1e-8", "DATA_ROOT": "/data/", "EXP": "pascal_scribble",
            "TRAIN_SET": "train", "TEST_SET": "val", "NET_ID": net_id, "FEATURE_DIR": "/f",
            **{regularizer.weight.name: "0.5" for regularizer in REGULARIZERS.values()}}


def _read(path: Path, net_id: str, stem: str):
    if stem.startswith("solver"):
        return read_solver(path, values=_values(net_id))
    return read_net(path, values=_values(net_id))


def _first_difference(ours, theirs) -> str:
    """A readable diff: of the first differing layer for nets, of the whole message for solvers."""
    if isinstance(ours, caffe_pb2.NetParameter):
        if len(ours.layer) != len(theirs.layer):
            names = difflib.unified_diff([layer.name for layer in theirs.layer], [layer.name for layer in ours.layer],
                                         "original layers", "generated layers", lineterm="")
            return f"{len(ours.layer)} layers generated, {len(theirs.layer)} in the original:\n" + "\n".join(names)
        for index, (mine, original) in enumerate(zip(ours.layer, theirs.layer)):
            if mine != original:
                return f"layer {index} ('{original.name}'):\n" + _diff(mine, original)
        head_ours, head_theirs = caffe_pb2.NetParameter(), caffe_pb2.NetParameter()
        head_ours.CopyFrom(ours)
        head_theirs.CopyFrom(theirs)
        del head_ours.layer[:], head_theirs.layer[:]
        return "net-level fields:\n" + _diff(head_ours, head_theirs)
    return _diff(ours, theirs)


def _diff(mine, original) -> str:
    return "\n".join(difflib.unified_diff(text_format.MessageToString(original).splitlines(),
                                          text_format.MessageToString(mine).splitlines(),
                                          "original", "generated", lineterm=""))


@pytest.mark.parametrize("net_id", list(NETWORKS))
@pytest.mark.parametrize("stem", ORIGINAL_STEMS)
def test_generated_file_reads_as_the_original(net_id: str, stem: str, tmp_path: Path) -> None:
    original = shared_path("reference", "rloss-exper", CONFIG_DIR, net_id, f"{stem}.prototxt")
    ours = tmp_path / f"{stem}.prototxt"
    ours.write_text(_generated()[CONFIG_DIR / net_id / f"{stem}.prototxt"], encoding="utf-8")
    mine, theirs = _read(ours, net_id, stem), _read(original, net_id, stem)
    assert mine == theirs, _first_difference(mine, theirs)


def test_committed_tree_is_what_the_generators_write() -> None:
    files = _generated()
    assert len(files) == len(NETWORKS) * (len(SOLVER_FILES) + len(KINDS)) == 44
    stale = stale_files(REPO, files)
    assert not stale, f"regenerate with `python -m rloss.models.write_exper`; out of date: {stale}"
    committed = {path.relative_to(REPO) for path in (REPO / CONFIG_DIR).rglob("*") if path.is_file()}
    assert committed == set(files), f"files no generator writes: {sorted(committed - set(files))}"


def test_committed_small_fcn_files_are_what_the_generator_derives() -> None:
    files = small_fcn_files(REPO)
    others = [r for r in REGULARIZERS.values() if r.name != "densecrf"]
    assert sorted(path.name for path in files) == sorted(
        f"{stem}.prototxt" for r in others for stem in (r.kind, r.solver_stem))
    assert not stale_files(REPO, files), "regenerate with `python -m rloss.models.write_exper`"
    values = {**_values("small_fcn"), **SMALL_FCN_VALUES}
    original = read_net(REPO / SMALL_FCN_DIR / "trainwithdensecrfloss.prototxt", values=values)
    for regularizer in others:
        path = REPO / SMALL_FCN_DIR / f"{regularizer.kind}.prototxt"
        net = read_net(path, values=values)
        assert [layer for layer in net.layer if layer.name != regularizer.layer_name] == [
            layer for layer in original.layer if layer.name != "densecrf_loss"]
        (layer,) = [layer for layer in net.layer if layer.name == regularizer.layer_name]
        assert layer.type == regularizer.layer_type and list(layer.propagate_down[:2]) == [False, True]
        built = Net.from_prototxt(path, caffe_pb2.TRAIN, values=values, feed_data_layers=True)
        assert built.blob_shapes[regularizer.layer_name] == (1, 1, 1, 1)


def test_write_exper_into_an_empty_folder_writes_the_deeplab_tree_only(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path)]) == 0
    assert "the small net's phase-2 files are left out" in capsys.readouterr().err
    assert main([str(tmp_path), "--check"]) == 0
    assert not (tmp_path / SMALL_FCN_DIR).exists()


def test_write_exper_command_writes_and_checks(tmp_path: Path) -> None:
    (tmp_path / SMALL_FCN_DIR).mkdir(parents=True)
    for stem in ("trainwithdensecrfloss", "solverwithdensecrfloss"):
        source = REPO / SMALL_FCN_DIR / f"{stem}.prototxt"
        (tmp_path / SMALL_FCN_DIR / source.name).write_bytes(source.read_bytes())
    assert main([str(tmp_path), "--check"]) == 1
    assert main([str(tmp_path)]) == 0
    assert main([str(tmp_path), "--check"]) == 0
    (tmp_path / CONFIG_DIR / "deeplab_vgg16" / "test.prototxt").write_text("name: \"edited\"\n")
    assert main([str(tmp_path), "--check"]) == 1


def _phase(kind: str) -> int:
    return caffe_pb2.TEST if kind == "test" else caffe_pb2.TRAIN


def _build_committed(net_id: str, kind: str) -> Net:
    path = REPO / CONFIG_DIR / net_id / f"{kind}.prototxt"
    return Net.from_prototxt(path, _phase(kind), values=_values(net_id), feed_data_layers=True)


def _check_scores(net: Net, kind: str, scores: str, labels: int = 21) -> None:
    size = 513 if kind == "test" else 41
    assert net.blob_shapes[scores][1:] == (labels, size, size)


SCORES = {"deeplab_largeFOV": "fc8_pascal_scribble", "deeplab_msc_largeFOV": "fc_fusion",
          "deeplab_vgg16": "fc8_pascal_scribble", "resnet-101": "fc_fusion"}


def _score_blob(net_id: str, kind: str) -> str:
    """The blob the accuracy is computed on: the scores, upsampled ×8 in the test nets."""
    if kind != "test" or net_id == "deeplab_msc_largeFOV":  # msc fuses at full resolution in its test net
        return SCORES[net_id]
    return "fc1_interp" if net_id == "resnet-101" else "fc8_interp"


@pytest.mark.parametrize("net_id", SMALL_NETS)
@pytest.mark.parametrize("kind", KINDS)
def test_committed_net_builds(net_id: str, kind: str) -> None:
    net = _build_committed(net_id, kind)
    _check_scores(net, kind, _score_blob(net_id, kind))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_committed_resnet_builds(kind: str) -> None:
    net = _build_committed("resnet-101", kind)
    _check_scores(net, kind, _score_blob("resnet-101", kind))
    if kind != "test":
        assert net.blob_shapes["fc1_pascal_scribble_res05"][2:] == (21, 21)


def _build_variant(builder: NetBuilder, kind: str) -> Net:
    net_param = builder.net_parameter(_values("variant"), phase=_phase(kind))
    return Net(data_layers_to_inputs(net_param), _phase(kind))


@pytest.mark.parametrize("kind", ["train", "test"])
def test_largefov_variant_with_small_crop_and_five_labels(kind: str) -> None:
    builder = deeplab_largefov(kind, crop_size=161, num_labels=5, batch_size=2, exp="voc")
    text = builder.text()
    assert "${NUM_LABELS}" not in text and "fc8_voc" in text
    net = _build_variant(builder, kind)
    assert net.blob_shapes["data"] == (2, 3, 161, 161)
    assert net.blob_shapes["fc8_voc"] == (2, 5, 21, 21)  # (161 - 1) / 8 + 1
    if kind == "test":
        assert net.blob_shapes["fc8_interp"] == (2, 5, 161, 161)
    else:
        assert net.blob_shapes["label_shrink"] == (2, 1, 21, 21)


def test_msc_variant_fuses_heads_at_the_score_size() -> None:
    net = _build_variant(deeplab_msc_largefov("test", crop_size=129, num_labels=3), "test")
    for blob in ("data_ms", "pool1_interp", "pool2_interp", "pool3_interp", "pool4_interp", "fc_fusion"):
        assert net.blob_shapes[blob] == (1, 3, 129, 129), blob


def test_crf_variant_writes_its_settings() -> None:
    builder = deeplab_largefov("trainwithdensecrfloss", crop_size=161, densecrf_loss_weight=2e-9, bi_xy_std=50,
                               bi_rgb_std=10)
    layer = [layer for layer in builder.net_parameter(_values("v")).layer if layer.name == "densecrf_loss"][0]
    assert list(layer.loss_weight) == [pytest.approx(2e-9)]
    assert (layer.densecrf_loss_param.bi_xy_std, layer.densecrf_loss_param.bi_rgb_std) == (50, 10)
    net = _build_variant(builder, "trainwithdensecrfloss")
    assert net.blob_shapes["fc8_interp_softmax"] == (20, 21, 161, 161)


@pytest.mark.slow
def test_resnet_variant_with_small_crop() -> None:
    net = _build_variant(resnet101_msc("train", crop_size=161, num_labels=4), "train")
    assert net.blob_shapes["fc_fusion"] == (1, 4, 21, 21)
    assert net.blob_shapes["fc1_pascal_scribble_res05"] == (1, 4, 11, 11)  # vs label_shrink16


def test_bad_options_are_explained() -> None:
    with pytest.raises(NetError, match="crop_size 320 .* multiple of 8"):
        deeplab_largefov("train", crop_size=320)
    with pytest.raises(NetError, match="multiple of 32"):
        resnet101_msc("test", crop_size=177)
    with pytest.raises(NetError, match="unknown option.*crop\\b"):
        deeplab_largefov("train", crop=161)
    with pytest.raises(NetError, match="unknown net kind 'deploy'"):
        deeplab_largefov("deploy")
    with pytest.raises(NetError, match="num_labels"):
        deeplab_largefov("train", num_labels=0)


def test_builder_placeholders_and_field_errors() -> None:
    builder = NetBuilder("${NET_ID}")
    builder.add("data", "Input", tops=["data"], input_param={"shape": [{"dim": [1, 3, 9, 9]}]})
    builder.conv("conv", "data", Var("N"), 3, pad=1, bias_term=False)
    builder.add("loss", "EuclideanLoss", ["conv", "conv"], ["loss"], loss_weight=[Var("W")])
    text = builder.text()
    assert "num_output: ${N}" in text and "loss_weight: ${W}" in text and 'name: "${NET_ID}"' in text
    net = builder.net_parameter({"N": 7, "W": 0.5, "NET_ID": "tiny"})
    assert (net.name, net.layer[1].convolution_param.num_output, list(net.layer[2].loss_weight)) == ("tiny", 7, [0.5])
    assert not net.layer[1].convolution_param.bias_term and net.layer[1].convolution_param.HasField("bias_term")
    with pytest.raises(ProtoError, match="ConvolutionParameter has no field 'kernel'"):
        builder.conv("bad", "data", 1, 1, kernel=3)
    with pytest.raises(ProtoError, match="no value named 'MEDIAN'"):
        builder.pool("bad", "data", "MEDIAN", 3)
