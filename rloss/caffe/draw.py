"""pycaffe's `caffe.draw`: a net's layers and blobs as a Graphviz graph, the picture Caffe's draw_net.py makes.

    from rloss import caffe
    from rloss.proto.text import read_net
    caffe.draw.draw_net_to_file(read_net("train.prototxt"), "net.png", "TB", caffe.TRAIN)

What the picture shows, as in Caffe: a record node per layer labelled with its name, its type (a Pooling
layer's with its method), for Convolution, Deconvolution and Pooling the kernel size, stride and pad, and
with `display_lrm` a learning layer's two lr_mult values; an octagon per blob; an edge from each bottom
blob to its layer and from the layer to each top, the top edges labelled with a Data layer's batch size
or a Convolution, Deconvolution or InnerProduct layer's num_output. Convolutions are red, poolings orange,
inner products purple, in-place layers (one bottom that is also the one top) green, the rest blue. The
label's words are stacked for a left-right graph and on one line for a top-bottom one.

Where rloss differs: the graph is written as DOT text by rloss itself (`get_dot_source`), so pydot is
needed only for `get_pydot_graph` (`pip install rloss[draw]`), and images are made by Graphviz's `dot`
program directly; .dot, .gv and .raw files get that DOT text with no Graphviz at all. Each layer is a
node of its own (Caffe merges layers whose labels are equal, as a TRAIN and a TEST data layer of one
name), and every blob node is drawn as a blob (Caffe leaves the style off a blob last seen as a top).
A phase keeps the layers Caffe's net would have in it: the full NetStateRule, with the file's own
`state` (Caffe's draw.py compares the phases only). A V1 net is drawn in its V2 form.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Iterable

from rloss.errors import RlossError
from rloss.io import write_file_atomic
from rloss.proto import caffe_pb2
from rloss.proto.netstate import layer_included, merge_state
from rloss.proto.upgrade import upgrade_v1_net

RANKDIRS = ("LR", "TB", "BT", "RL")
TEXT_FORMATS = frozenset({"dot", "gv", "raw"})  # written as our DOT text, without Graphviz

LAYER_COLOR = "#6495ED"
IN_PLACE_COLOR = "#90EE90"
BLOB_COLOR = "#E0E0E0"
TYPE_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
               "InnerProduct": "#CC33FF"}
SPATIAL_TYPES = ("Convolution", "Deconvolution", "Pooling")
LEARNING_TYPES = ("Convolution", "Deconvolution", "InnerProduct")

_RECORD_SPECIALS = "{}|<>"  # field syntax of a record label; a backslash makes them plain characters


class DrawError(RlossError):
    """A net drawing that cannot be made: a bad rankdir, phase or format, Graphviz or pydot missing, dot failing."""


def get_dot_source(caffe_net, rankdir: str = "LR", label_edges: bool = True, phase: int | None = None,
                   display_lrm: bool = False) -> str:
    """The graph of a NetParameter as DOT text (an rloss addition: what get_pydot_graph parses).
    `phase` (caffe.TRAIN or caffe.TEST) keeps that phase's layers; None keeps them all."""
    if rankdir not in RANKDIRS:
        raise DrawError(f"rankdir must be one of {', '.join(RANKDIRS)}, got {rankdir!r}")
    layers = _drawn_layers(caffe_net, phase)
    graph = _DotGraph(caffe_net.name or "Net", rankdir, _blob_names(layers))
    for layer in layers:
        layer_id = graph.add_layer(layer, _layer_label(layer, rankdir, display_lrm), _layer_color(layer))
        for bottom in layer.bottom:
            graph.add_edge(graph.add_blob(bottom), layer_id)
        top_label = _top_edge_label(layer) if label_edges else ""
        for top in layer.top:
            graph.add_edge(layer_id, graph.add_blob(top), top_label)
    return graph.source()


def get_pydot_graph(caffe_net, rankdir: str, label_edges: bool = True, phase: int | None = None,
                    display_lrm: bool = False):
    """The graph as a pydot.Dot, as pycaffe returns it (needs pydot; get_dot_source does not)."""
    try:
        import pydot
    except ImportError:
        raise DrawError("get_pydot_graph needs the pydot package: pip install rloss[draw] (or pip install "
                        "pydot); get_dot_source gives the same graph as DOT text without it") from None
    return pydot.graph_from_dot_data(get_dot_source(caffe_net, rankdir, label_edges, phase, display_lrm))[0]


def draw_net(caffe_net, rankdir: str, ext: str = "png", phase: int | None = None, display_lrm: bool = False) -> bytes:
    """The drawing in format `ext` (any Graphviz output format: png, svg, pdf, ...; dot, gv or raw: the
    DOT text), as bytes."""
    return _render(get_dot_source(caffe_net, rankdir, phase=phase, display_lrm=display_lrm), ext.lower())


def draw_net_to_file(caffe_net, filename, rankdir: str = "LR", phase: int | None = None,
                     display_lrm: bool = False) -> None:
    """Write the drawing to `filename` (atomically), in the format its extension names."""
    path = Path(filename)
    ext = path.suffix[1:]
    if not ext:
        raise DrawError(f"{path}: the file name needs an extension naming the format (.png, .svg, .pdf; "
                        ".dot or .gv for DOT text)")
    image = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    try:
        write_file_atomic(path, lambda temporary: temporary.write_bytes(image))
    except OSError as error:
        raise DrawError(f"cannot write {path}: {error.strerror or error}") from None


# ---- which layers, and what their nodes say ---------------------------------------------------------

def _drawn_layers(caffe_net, phase: int | None) -> list:
    layers = upgrade_v1_net(caffe_net, f"net '{caffe_net.name}'").layer if len(caffe_net.layers) else caffe_net.layer
    if phase is None:
        return list(layers)
    if phase not in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        raise DrawError(f"phase must be caffe.TRAIN ({caffe_pb2.TRAIN}), caffe.TEST ({caffe_pb2.TEST}) or None "
                        f"(every layer), got {phase!r}")
    state = merge_state(caffe_net.state, phase)
    return [layer for layer in layers if layer_included(layer, state)]


def _blob_names(layers: Iterable) -> set[str]:
    return {name for layer in layers for name in (*layer.bottom, *layer.top)}


def _layer_label(layer, rankdir: str, display_lrm: bool) -> list[str]:
    """The label's words: Caffe stacks them in a left-right graph, where height is free, and keeps them
    on one line in a top-bottom one."""
    words = [layer.name, f"({_type_text(layer)})"]
    if layer.type in SPATIAL_TYPES:
        words.append(_separator(rankdir).join(f"{what}: {value}" for what, value in _spatial_values(layer)))
    if display_lrm and layer.type in LEARNING_TYPES:
        weights, bias = _lr_mults(layer)
        if weights or bias:
            words.append(f"lr mult: {weights:.1f}, {bias:.1f}")
    return words


def _separator(rankdir: str) -> str:
    return " " if rankdir in ("TB", "BT") else "\n"


def _type_text(layer) -> str:
    if layer.type == "Pooling":
        return f"Pooling {caffe_pb2.PoolingParameter.PoolMethod.Name(layer.pooling_param.pool)}"
    return layer.type


def _spatial_values(layer) -> tuple[tuple[str, int], ...]:
    """Caffe shows the square fields only: a pooling's kernel_size/stride/pad as stored, a convolution's
    first kernel_size/stride/pad, or 1, 1, 0 when they are not given (kernel_h/kernel_w are not shown)."""
    if layer.type == "Pooling":
        pool = layer.pooling_param
        return ("kernel size", pool.kernel_size), ("stride", pool.stride), ("pad", pool.pad)
    conv = layer.convolution_param
    return (("kernel size", _first(conv.kernel_size, 1)), ("stride", _first(conv.stride, 1)),
            ("pad", _first(conv.pad, 0)))


def _first(values, default: int) -> int:
    return values[0] if len(values) else default


def _lr_mults(layer) -> tuple[float, float]:
    """The weights' and the bias' lr_mult; a missing param spec counts as lr_mult 1 (Caffe's default)."""
    if len(layer.param) > 2:
        raise DrawError(f"layer '{layer.name}' (type {layer.type}) has {len(layer.param)} param specs; it has "
                        "2 blobs at most (weights and bias)")
    specified = [spec.lr_mult for spec in layer.param]
    weights, bias = specified + [1.0] * (2 - len(specified))
    return weights, bias


def _layer_color(layer) -> str:
    in_place = len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
    return IN_PLACE_COLOR if in_place else TYPE_COLORS.get(layer.type, LAYER_COLOR)


def _top_edge_label(layer) -> str:
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


# ---- DOT text ---------------------------------------------------------------------------------------

class _DotGraph:
    """Nodes (in the order first met) and edges of a digraph, written as DOT text. A blob's node id is its
    name; a layer's is 'NAME (TYPE)', numbered when that is taken (a blob's name or an earlier layer's)."""

    def __init__(self, name: str, rankdir: str, blob_names: set[str]):
        self.name = name
        self.rankdir = rankdir
        self.nodes: dict[str, str] = {}
        self.edges: list[str] = []
        self.taken = set(blob_names)

    def add_layer(self, layer, words: list[str], color: str) -> str:
        node_id = f"{layer.name} ({layer.type})"
        number = 1
        while node_id in self.taken:
            number += 1
            node_id = f"{layer.name} ({layer.type}) #{number}"
        self.taken.add(node_id)
        label = _separator(self.rankdir).join(words)
        self.nodes[node_id] = _attributes(label=_escape(label, record=True), shape="record", style="filled",
                                          fillcolor=color)
        return node_id

    def add_blob(self, name: str) -> str:
        self.nodes.setdefault(name, _attributes(label=_escape(name), shape="octagon", style="filled",
                                                fillcolor=BLOB_COLOR))
        return name

    def add_edge(self, source: str, target: str, label: str = "") -> None:
        attributes = f" {_attributes(label=_escape(label))}" if label else ""
        self.edges.append(f"{_quoted(source)} -> {_quoted(target)}{attributes};")

    def source(self) -> str:
        lines = [f"digraph {_quoted(self.name)} {{", f"  rankdir={self.rankdir};"]
        lines += [f"  {_quoted(node_id)} {attributes};" for node_id, attributes in self.nodes.items()]
        lines += [f"  {edge}" for edge in self.edges]
        return "\n".join(lines + ["}"]) + "\n"


def _escape(text: str, record: bool = False) -> str:
    """`text` for a Graphviz label: backslashes and newlines in Graphviz's escString form, and in a record
    label its field characters made plain (a layer named 'a|b' must not split the record)."""
    escaped = text.replace("\\", "\\\\").replace("\n", "\\n")
    if record:
        for special in _RECORD_SPECIALS:
            escaped = escaped.replace(special, "\\" + special)
    return escaped


def _quoted(text: str) -> str:
    """A DOT quoted string: inside one only a double quote (and a backslash before it) needs escaping."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _attributes(**values: str) -> str:
    return "[" + ", ".join(f"{key}={_quoted_escaped(value)}" for key, value in values.items()) + "]"


def _quoted_escaped(value: str) -> str:
    """An attribute value already in escString form: only its double quotes still need escaping."""
    return '"' + value.replace('"', '\\"') + '"'


def _render(source: str, ext: str) -> bytes:
    if ext in TEXT_FORMATS:
        return source.encode("utf-8")
    if not ext:
        raise DrawError("no format given: name one (png, svg, pdf, ...; dot or gv for DOT text)")
    program = shutil.which("dot")
    if program is None:
        raise DrawError(f"a .{ext} drawing needs Graphviz's `dot` program, which is not on PATH: install "
                        "Graphviz (apt-get install graphviz, conda install graphviz or brew install graphviz), "
                        "or write DOT text to a .dot or .gv file and draw it elsewhere")
    try:
        result = subprocess.run([program, f"-T{ext}"], input=source.encode("utf-8"), capture_output=True,
                                check=False)
    except OSError as error:
        raise DrawError(f"cannot run Graphviz's dot ({program}): {error.strerror or error}") from None
    if result.returncode != 0:
        reason = result.stderr.decode("utf-8", "replace").strip() or f"exit code {result.returncode}"
        raise DrawError(f"Graphviz's dot could not draw a .{ext} file: {reason}")
    return result.stdout
