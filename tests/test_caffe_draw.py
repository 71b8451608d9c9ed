"""pycaffe's caffe.draw and `python -m rloss draw NET OUT`: the DOT graph of a net (a node per layer and
per blob, Caffe's labels, colours and edge labels, in-place layers, phases, rankdir), read back here with
a small DOT reader of the test's own; files written as DOT text, images through Graphviz's `dot` (a fake
one where the real one is absent), and the errors when it is missing."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
from google.protobuf import text_format

from rloss import caffe
from rloss.caffe.draw import DrawError, draw_net, draw_net_to_file, get_dot_source, get_pydot_graph
from rloss.cli.main import main
from rloss.errors import NetError
from rloss.proto import caffe_pb2

NET = """name: "small"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        data_param { source: "train_db" batch_size: ${BATCH} } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
        data_param { source: "test_db" batch_size: 2 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 16 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 10 } }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc_drop" exclude { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" include { phase: TEST } }
"""

LAYER_IDS = {"data (Data)", "data (Data) #2", "conv1 (Convolution)", "relu1 (ReLU)", "pool1 (Pooling)",
             "fc (InnerProduct)", "drop (Dropout)", "loss (SoftmaxWithLoss)", "acc (Accuracy)"}
BLOBS = {"data", "label", "conv1", "pool1", "fc", "fc_drop", "loss", "acc"}

_STRING = r'"((?:[^"\\]|\\.)*)"'
_NODE = re.compile(rf"^\s*{_STRING} \[(.*)\];$")
_EDGE = re.compile(rf"^\s*{_STRING} -> {_STRING}(?: \[(.*)\])?;$")
_ATTRIBUTE = re.compile(rf"(\w+)={_STRING}")


class Dot:
    """What a DOT text says, read with the test's own patterns: nodes (id -> attributes) and edges
    (source, target, label)."""

    def __init__(self, text: str):
        lines = text.strip().splitlines()
        assert lines[-1] == "}"
        self.header, self.rankdir = lines[0], re.fullmatch(r"\s*rankdir=(\w+);", lines[1]).group(1)
        self.nodes, self.edges = {}, []
        for line in lines[2:-1]:
            edge = _EDGE.match(line)
            if edge:
                label = dict(_ATTRIBUTE.findall(edge.group(3) or "")).get("label", "")
                self.edges.append((_unquote(edge.group(1)), _unquote(edge.group(2)), label))
            else:
                node = _NODE.match(line)
                assert node, line
                self.nodes[_unquote(node.group(1))] = dict(_ATTRIBUTE.findall(node.group(2)))

    def layers(self) -> set[str]:
        return {name for name, attributes in self.nodes.items() if attributes["shape"] == "record"}

    def blobs(self) -> set[str]:
        return {name for name, attributes in self.nodes.items() if attributes["shape"] == "octagon"}

    def label(self, node: str) -> str:
        return self.nodes[node]["label"]

    def color(self, node: str) -> str:
        return self.nodes[node]["fillcolor"]

    def edge_labels(self, source: str) -> dict[str, str]:
        return {target: label for start, target, label in self.edges if start == source}


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def net_of(text: str = NET, batch: int = 8):
    return text_format.Parse(text.replace("${BATCH}", str(batch)), caffe_pb2.NetParameter())


def dot(text: str = NET, **options) -> Dot:
    return Dot(get_dot_source(net_of(text), **options))


def single_layer(body: str) -> str:
    return 'layer { name: "x" type: "Input" top: "in" input_param { shape { dim: 1 } } }\n' + body


# ---- the graph --------------------------------------------------------------------------------------

def test_a_node_per_layer_and_per_blob_and_an_edge_per_bottom_and_top():
    graph = dot()
    assert graph.header == 'digraph "small" {' and graph.rankdir == "LR"
    assert graph.layers() == LAYER_IDS and graph.blobs() == BLOBS
    assert all(graph.nodes[blob] == {"label": blob, "shape": "octagon", "style": "filled", "fillcolor": "#E0E0E0"}
               for blob in BLOBS)
    expected = {("data (Data)", "data"), ("data (Data)", "label"), ("data (Data) #2", "data"),
                ("data (Data) #2", "label"), ("data", "conv1 (Convolution)"), ("conv1 (Convolution)", "conv1"),
                ("conv1", "relu1 (ReLU)"), ("relu1 (ReLU)", "conv1"), ("conv1", "pool1 (Pooling)"),
                ("pool1 (Pooling)", "pool1"), ("pool1", "fc (InnerProduct)"), ("fc (InnerProduct)", "fc"),
                ("fc", "drop (Dropout)"), ("drop (Dropout)", "fc_drop"), ("fc", "loss (SoftmaxWithLoss)"),
                ("label", "loss (SoftmaxWithLoss)"), ("loss (SoftmaxWithLoss)", "loss"), ("fc", "acc (Accuracy)"),
                ("label", "acc (Accuracy)"), ("acc (Accuracy)", "acc")}
    assert {(source, target) for source, target, _ in graph.edges} == expected and len(graph.edges) == len(expected)


def test_colours_by_type_and_in_place_layers_green():
    graph = dot()
    assert graph.color("conv1 (Convolution)") == "#FF5050"
    assert graph.color("pool1 (Pooling)") == "#FF9900"
    assert graph.color("fc (InnerProduct)") == "#CC33FF"
    assert graph.color("relu1 (ReLU)") == "#90EE90"  # conv1 -> relu1 -> conv1: the blob's one node both ways
    assert graph.color("drop (Dropout)") == "#6495ED"  # one bottom, one top, not in place
    assert graph.color("loss (SoftmaxWithLoss)") == graph.color("data (Data)") == "#6495ED"
    deconvolution = dot(single_layer('layer { name: "up" type: "Deconvolution" bottom: "in" top: "in" '
                                     'convolution_param { num_output: 4 kernel_size: 4 } }'))
    assert deconvolution.color("up (Deconvolution)") == "#90EE90"  # in place wins over the type


def test_layer_labels_stacked_left_to_right_and_on_one_line_top_to_bottom():
    assert dot().label("conv1 (Convolution)") == r"conv1\n(Convolution)\nkernel size: 3\nstride: 2\npad: 1"
    assert dot().label("pool1 (Pooling)") == r"pool1\n(Pooling AVE)\nkernel size: 2\nstride: 2\npad: 0"
    assert dot().label("relu1 (ReLU)") == r"relu1\n(ReLU)"
    for rankdir in ("TB", "BT"):
        graph = dot(rankdir=rankdir)
        assert graph.rankdir == rankdir
        assert graph.label("conv1 (Convolution)") == "conv1 (Convolution) kernel size: 3 stride: 2 pad: 1"
    assert dot(rankdir="RL").label("fc (InnerProduct)") == r"fc\n(InnerProduct)"


def test_spatial_defaults_and_rectangular_kernels_show_caffe_s_square_fields():
    graph = dot(single_layer(
        'layer { name: "c" type: "Convolution" bottom: "in" top: "c" '
        'convolution_param { num_output: 2 kernel_h: 3 kernel_w: 5 } }\n'
        'layer { name: "p" type: "Pooling" bottom: "c" top: "p" pooling_param { global_pooling: true } }'))
    assert graph.label("c (Convolution)") == r"c\n(Convolution)\nkernel size: 1\nstride: 1\npad: 0"
    assert graph.label("p (Pooling)") == r"p\n(Pooling MAX)\nkernel size: 0\nstride: 1\npad: 0"


def test_top_edges_labelled_with_batch_size_or_num_output_and_bottom_edges_not():
    graph = dot()
    assert graph.edge_labels("data (Data)") == {"data": "Batch 8", "label": "Batch 8"}
    assert graph.edge_labels("data (Data) #2") == {"data": "Batch 2", "label": "Batch 2"}
    assert graph.edge_labels("conv1 (Convolution)") == {"conv1": "16"}
    assert graph.edge_labels("fc (InnerProduct)") == {"fc": "10"}
    assert graph.edge_labels("loss (SoftmaxWithLoss)") == {"loss": ""}
    assert all(label == "" for source, _, label in graph.edges if source in BLOBS)
    assert all(label == "" for _, _, label in dot(label_edges=False).edges)


def test_display_lrm_shows_learning_layers_lr_mults():
    assert r"lr mult" not in dot().label("conv1 (Convolution)")
    graph = dot(display_lrm=True)
    assert graph.label("conv1 (Convolution)").endswith(r"\npad: 1\nlr mult: 1.0, 2.0")
    assert graph.label("fc (InnerProduct)") == r"fc\n(InnerProduct)\nlr mult: 1.0, 1.0"  # no specs: 1, 1
    assert graph.label("pool1 (Pooling)").count("lr mult") == 0
    specs = dot(single_layer(
        'layer { name: "one" type: "InnerProduct" bottom: "in" top: "a" param { lr_mult: 0 } '
        'inner_product_param { num_output: 1 } }\n'
        'layer { name: "frozen" type: "Convolution" bottom: "in" top: "b" param { lr_mult: 0 } param { lr_mult: 0 } '
        'convolution_param { num_output: 1 kernel_size: 1 } }'), display_lrm=True, rankdir="TB")
    assert specs.label("one (InnerProduct)") == "one (InnerProduct) lr mult: 0.0, 1.0"  # one not 0: shown
    assert "lr mult" not in specs.label("frozen (Convolution)")  # all 0: nothing to show
    three = single_layer('layer { name: "c" type: "Convolution" bottom: "in" top: "c" param {} param {} param {} '
                         'convolution_param { num_output: 1 kernel_size: 1 } }')
    with pytest.raises(DrawError, match=r"layer 'c' \(type Convolution\) has 3 param specs"):
        dot(three, display_lrm=True)


def test_phase_keeps_the_layers_of_that_phase():
    train, test = dot(phase=caffe.TRAIN), dot(phase=caffe.TEST)
    assert train.layers() == LAYER_IDS - {"data (Data) #2", "acc (Accuracy)"}
    assert train.edge_labels("data (Data)") == {"data": "Batch 8", "label": "Batch 8"}
    assert test.layers() == LAYER_IDS - {"data (Data) #2", "drop (Dropout)"}
    assert test.edge_labels("data (Data)") == {"data": "Batch 2", "label": "Batch 2"}
    assert "fc_drop" not in test.blobs() and "acc" not in train.blobs()


def test_phase_rules_are_caffe_s_net_state_rules():
    staged = 'layer { name: "s" type: "ReLU" bottom: "in" top: "in" include { phase: TRAIN stage: "deploy" } }'
    assert dot(single_layer(staged), phase=caffe.TRAIN).layers() == {"x (Input)"}
    assert dot('state { stage: "deploy" }\n' + single_layer(staged), phase=caffe.TRAIN).layers() == \
        {"x (Input)", "s (ReLU)"}
    assert dot(single_layer(staged)).layers() == {"x (Input)", "s (ReLU)"}  # no phase: every layer
    both = single_layer('layer { name: "b" type: "ReLU" bottom: "in" top: "in" include { phase: TRAIN } '
                        'exclude { phase: TEST } }')
    with pytest.raises(NetError, match="layer 'b' .*both include and exclude"):
        dot(both, phase=caffe.TEST)


def test_bad_rankdir_and_phase_are_refused():
    with pytest.raises(DrawError, match="rankdir must be one of LR, TB, BT, RL, got 'XY'"):
        dot(rankdir="XY")
    with pytest.raises(DrawError, match="phase must be caffe.TRAIN .* got 5"):
        dot(phase=5)


def test_names_are_escaped_for_dot_and_record_labels():
    graph = dot(single_layer('layer { name: "a\\"b|{c}" type: "ReLU" bottom: "in" top: "o\\"ut" }'))
    assert graph.layers() == {"x (Input)", 'a"b|{c} (ReLU)'}
    assert graph.label('a"b|{c} (ReLU)') == r'a\"b\|\{c\}\n(ReLU)'
    assert graph.blobs() == {"in", 'o"ut'}


def test_a_layer_id_never_takes_a_blob_s_name():
    graph = dot(single_layer('layer { name: "r" type: "ReLU" bottom: "in" top: "r (ReLU)" }'))
    assert graph.blobs() == {"in", "r (ReLU)"} and graph.layers() == {"x (Input)", "r (ReLU) #2"}


def test_a_v1_net_is_drawn_in_its_v2_form():
    v1 = net_of('layers { name: "c" type: CONVOLUTION bottom: "in" top: "c" '
                'convolution_param { num_output: 3 kernel_size: 5 } }')
    graph = Dot(get_dot_source(v1))
    assert graph.layers() == {"c (Convolution)"} and graph.edge_labels("c (Convolution)") == {"c": "3"}


# ---- files and images -------------------------------------------------------------------------------

def test_dot_gv_and_raw_are_the_dot_text(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Graphviz needed
    net = net_of()
    source = get_dot_source(net, "TB", phase=caffe.TEST)
    assert draw_net(net, "TB", "dot", caffe.TEST) == source.encode()
    assert draw_net(net, "TB", "RAW", caffe.TEST) == source.encode()
    draw_net_to_file(net, tmp_path / "net.gv", "TB", caffe.TEST)
    assert (tmp_path / "net.gv").read_text() == source
    draw_net_to_file(net, str(tmp_path / "net.dot"))
    assert (tmp_path / "net.dot").read_text() == get_dot_source(net)


def test_images_without_graphviz_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DrawError, match=r"a \.png drawing needs Graphviz's `dot` program.*install Graphviz.*\.dot"):
        draw_net_to_file(net_of(), tmp_path / "net.png")
    assert not (tmp_path / "net.png").exists()
    with pytest.raises(DrawError, match="needs an extension"):
        draw_net_to_file(net_of(), tmp_path / "net")


def fake_dot(directory, script: str) -> None:
    program = directory / "dot"
    program.write_text("#!/bin/sh\n" + script)
    program.chmod(0o755)


@pytest.mark.skipif(sys.platform == "win32" or shutil.which("cat") is None, reason="a POSIX shell script as dot")
def test_images_come_from_dot_given_the_source_on_stdin(tmp_path, monkeypatch):
    fake_dot(tmp_path, f"printf 'args:%s\\n' \"$*\"\nexec {shutil.which('cat')}\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    net = net_of()
    assert draw_net(net, "LR", "SVG") == b"args:-Tsvg\n" + get_dot_source(net).encode()
    draw_net_to_file(net, tmp_path / "net.pdf", "BT", caffe.TRAIN, True)
    expected = get_dot_source(net, "BT", phase=caffe.TRAIN, display_lrm=True)
    assert (tmp_path / "net.pdf").read_bytes() == b"args:-Tpdf\n" + expected.encode()
    fake_dot(tmp_path, "echo 'Format: \"xyz\" not recognized' >&2\nexit 1\n")
    with pytest.raises(DrawError, match=r"dot could not draw a \.xyz file: Format: \"xyz\" not recognized"):
        draw_net_to_file(net, tmp_path / "net.xyz")
    assert not (tmp_path / "net.xyz").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_a_png_from_graphviz(tmp_path):
    draw_net_to_file(net_of(), tmp_path / "net.png", "TB", caffe.TEST, True)
    assert (tmp_path / "net.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pydot_graph():
    pydot = pytest.importorskip("pydot")
    graph = get_pydot_graph(net_of(), "TB", phase=caffe.TRAIN)
    assert isinstance(graph, pydot.Dot) and graph.get_name() == '"small"'
    names = {node.get_name().strip('"') for node in graph.get_nodes()}
    assert names == (LAYER_IDS | BLOBS) - {"data (Data) #2", "acc (Accuracy)", "acc"}
    assert graph.get_node('"conv1 (Convolution)"')[0].get("fillcolor") == '"#FF5050"'
    assert len(graph.get_edges()) == len(dot(phase=caffe.TRAIN).edges)


# ---- python -m rloss draw ---------------------------------------------------------------------------

def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("rloss: error: ") == 1
    return err[err.index("rloss: error: "):]


def test_cli_writes_dot_text_with_variables_phase_and_rankdir(tmp_path):
    net_file = tmp_path / "train.prototxt"
    net_file.write_text(NET)
    out = tmp_path / "net.dot"
    assert main(["draw", str(net_file), str(out), "--set", "BATCH=3", "--phase", "TRAIN", "--rankdir", "TB",
                 "--display_lrm"]) == 0
    graph = Dot(out.read_text())
    assert graph.rankdir == "TB" and "acc (Accuracy)" not in graph.layers()
    assert graph.edge_labels("data (Data)") == {"data": "Batch 3", "label": "Batch 3"}
    assert graph.label("conv1 (Convolution)").endswith("lr mult: 1.0, 2.0")
    assert main(["draw", str(net_file), str(out), "--set", "BATCH=3"]) == 0
    assert Dot(out.read_text()).layers() == LAYER_IDS and Dot(out.read_text()).rankdir == "LR"


def test_cli_errors(tmp_path, monkeypatch, capsys):
    net_file = tmp_path / "train.prototxt"
    net_file.write_text(NET.replace("${BATCH}", "1"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["draw", str(net_file), str(tmp_path / "net.png")]) == 1
    assert "Graphviz" in error_of(capsys)
    assert main(["draw", str(tmp_path / "missing.prototxt"), str(tmp_path / "net.dot")]) == 1
    assert "does not exist" in error_of(capsys)
    for flags in (["--rankdir", "XY"], ["--phase", "DEPLOY"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["draw", str(net_file), str(tmp_path / "net.dot"), *flags])
        assert exit_info.value.code == 2
