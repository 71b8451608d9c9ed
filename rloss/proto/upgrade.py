"""Old Caffe formats brought to the current one: V1 nets (`layers { type: CONVOLUTION ... }`), the
deprecated solver enum `solver_type`, and the `input`/`input_dim`/`input_shape` net inputs.

Old DeepLab files also use V1 enum names for the fork's own layers (`type: INTERP`) and the fork's
parameter messages inside `layers { }` (`interp_param { ... }`); neither exists in the V1 schema, so
`prepare_v1_text` takes them out of the text before parsing and `upgrade_v1_net` puts them back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from rloss.errors import NetError, ProtoError
from rloss.proto import caffe_pb2
from rloss.proto.compat import is_repeated

V1_TYPE_NAMES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN", "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}
"""The V1 `LayerType` enum names and the V2 type strings they become."""

FORK_V1_TYPE_NAMES = {
    "IMAGE_SEG_DATA": "ImageSegData", "INTERP": "Interp", "MAT_WRITE": "MatWrite", "MAT_READ": "MatRead",
    "DENSE_CRF": "DenseCRF", "DENSECRF_LOSS": "DenseCRFLoss", "SEG_ACCURACY": "SegAccuracy",
    "BATCH_NORM": "BatchNorm", "SCALE": "Scale", "BIAS": "Bias", "DOMAIN_TRANSFORM": "DomainTransform",
    "ADAPTIVE_BIAS_CHANNEL": "AdaptiveBiasChannel", "BIAS_CHANNEL": "BiasChannel",
    "UNIQUE_LABEL": "UniqueLabel",
}
"""V1-style enum names the DeepLab forks used for their own layers (absent from our V1 enum)."""

SOLVER_TYPE_NAMES = {
    "SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad", "RMSPROP": "RMSProp",
    "ADADELTA": "AdaDelta", "ADAM": "Adam",
}
"""The deprecated `solver_type` enum names and the `type` strings they become."""

_V1_COPIED = {"name", "bottom", "top", "include", "exclude", "loss_weight", "blobs"}
_DATA_PARAMS = {
    caffe_pb2.V1LayerParameter.DATA: "data_param",
    caffe_pb2.V1LayerParameter.IMAGE_DATA: "image_data_param",
    caffe_pb2.V1LayerParameter.WINDOW_DATA: "window_data_param",
}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
_V1_FIELDS = frozenset(caffe_pb2.V1LayerParameter.DESCRIPTOR.fields_by_name)
_V2_FIELDS = frozenset(caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name)


def copy_fields(source, target, keep: Callable[[str], bool] = lambda name: True) -> None:
    """Copy every present field of `source` whose name passes `keep` onto the same-named field of `target`."""
    for descriptor, value in source.ListFields():
        if not keep(descriptor.name):
            continue
        if is_repeated(descriptor):
            getattr(target, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


# ---- V1 text pre-pass ------------------------------------------------------------------------------

_V1_HINT = re.compile(r"\blayers\s*:?\s*[{<]")
_TOKEN = re.compile(
    r"(?P<skip>\s+|#[^\n]*)"
    r"|(?P<string>\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*')"
    r"|(?P<word>[\w.+-]+)"
    r"|(?P<other>.)",
    re.S,
)
_OPEN, _CLOSE = "{<[", "}>]"


class _Token(NamedTuple):
    kind: str
    text: str
    start: int
    end: int


class _Malformed(Exception):
    """The text is not well-formed enough to scan; the protobuf parser will say where."""


@dataclass
class V1Text:
    """A V1 net's text made parseable: fork-only types replaced by NONE (space-padded) and fork-only
    fields blanked out, so every line and column stays where it was; plus what was taken out, by
    the index of the `layers` entry."""

    text: str
    types: dict[int, str] = field(default_factory=dict)
    extra_texts: dict[int, str] = field(default_factory=dict)


def prepare_v1_text(text: str) -> V1Text:
    """Rewrite the `layers { }` entries of a net's text so the V1 schema can parse it."""
    if not _V1_HINT.search(text):
        return V1Text(text)
    tokens = [_Token(m.lastgroup, m.group(), m.start(), m.end())
              for m in _TOKEN.finditer(text) if m.lastgroup != "skip"]
    result = V1Text(text)
    type_tokens: list[_Token] = []
    moved: dict[int, list[tuple[int, int]]] = {}
    try:
        _scan_top_level(tokens, result.types, type_tokens, moved)
    except _Malformed:
        return V1Text(text)
    result.extra_texts = {index: _isolate(text, spans) for index, spans in moved.items()}
    result.text = _rewrite(text, type_tokens, [span for spans in moved.values() for span in spans])
    return result


def _scan_top_level(tokens, types, type_tokens, moved) -> None:
    """Walk the NetParameter's fields, looking inside each `layers` entry."""
    index, position = -1, 0
    while position < len(tokens):
        value, end = _field_extent(tokens, position)
        if tokens[position].text == "layers" and tokens[value].text in "{<":
            index += 1
            _scan_v1_layer(tokens, value + 1, end - 1, index, types, type_tokens, moved)
        position = end


def _scan_v1_layer(tokens, position, stop, index, types, type_tokens, moved) -> None:
    """Record a fork-only `type` and the fields the V1 schema lacks but LayerParameter has."""
    while position < stop:
        name = tokens[position].text
        value, end = _field_extent(tokens, position)
        if name == "type" and tokens[value].text in FORK_V1_TYPE_NAMES:
            types[index] = FORK_V1_TYPE_NAMES[tokens[value].text]
            type_tokens.append(tokens[value])
        elif name not in _V1_FIELDS and name in _V2_FIELDS:
            moved.setdefault(index, []).append((tokens[position].start, tokens[end - 1].end))
        position = end


def _field_extent(tokens, position) -> tuple[int, int]:
    """For the field whose name is at `position`: (index of its value's first token, index after it)."""
    if tokens[position].kind != "word":
        raise _Malformed
    value = position + 1
    if value < len(tokens) and tokens[value].text == ":":
        value += 1
    if value >= len(tokens):
        raise _Malformed
    if tokens[value].text in _OPEN:
        return value, _after_close(tokens, value)
    end = value + 1
    while tokens[value].kind == "string" and end < len(tokens) and tokens[end].kind == "string":
        end += 1
    return value, end


def _after_close(tokens, position) -> int:
    """The index just after the bracket that closes the one at `position`."""
    depth = 0
    for index in range(position, len(tokens)):
        text = tokens[index].text
        depth += (text in _OPEN) - (text in _CLOSE)
        if depth == 0:
            return index + 1
    raise _Malformed


def _blank(text: str) -> str:
    """`text` with everything but line breaks turned into spaces."""
    return re.sub(r"[^\n]", " ", text)


def _rewrite(text: str, type_tokens: list[_Token], spans: list[tuple[int, int]]) -> str:
    """Replace fork-only type names by NONE and blank out the moved fields."""
    edits = [(token.start, token.end, "NONE".ljust(len(token.text))) for token in type_tokens]
    edits += [(start, end, _blank(text[start:end])) for start, end in spans]
    pieces, position = [], 0
    for start, end, replacement in sorted(edits):
        pieces += [text[position:start], replacement]
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _isolate(text: str, spans: list[tuple[int, int]]) -> str:
    """Only `spans` of `text`, each at its original line and column (so parse errors point right)."""
    pieces, position = [], 0
    for start, end in spans:
        gap = text[position:start]
        pieces += ["\n" * gap.count("\n"), " " * (len(gap) - gap.rfind("\n") - 1), text[start:end]]
        position = end
    return "".join(pieces)


# ---- V1 -> V2 ----------------------------------------------------------------------------------------

def upgrade_v1_net(net, source: str, types: dict[int, str] | None = None,
                   extras: dict[int, object] | None = None):
    """The net with its V1 `layers` turned into V2 `layer` entries (returned as is when it has none).

    `types`/`extras` (by `layers` index) are the fork-only types and LayerParameter fields that
    `prepare_v1_text` took out of the text."""
    if not len(net.layers):
        return net
    if len(net.layer):
        raise ProtoError(
            f"{source}: the net mixes {len(net.layer)} V2 `layer` entries with {len(net.layers)} V1 "
            "`layers` entries; write all layers in one format (Caffe would silently drop the `layer` ones)"
        )
    types, extras = types or {}, extras or {}
    upgraded = caffe_pb2.NetParameter()
    copy_fields(net, upgraded, keep=lambda name: name != "layers")
    for index, v1 in enumerate(net.layers):
        layer = upgraded.layer.add()
        _upgrade_layer(v1, layer, source, index)
        if index in types:
            layer.type = types[index]
        if index in extras:
            layer.MergeFrom(extras[index])
    return upgraded


def _upgrade_layer(v1, layer, source: str, index: int) -> None:
    """One V1 layer into `layer`: copied fields, type string, ParamSpecs, data transform."""
    if v1.HasField("layer"):
        raise ProtoError(
            f"{source}: layer #{index} ('{v1.name}') uses the V0 format (a `layer` block inside `layers`), "
            "which is not supported; convert it with Caffe's upgrade_net_proto_text tool"
        )
    copy_fields(v1, layer, keep=lambda name: name in _V1_COPIED or name.endswith("_param"))
    if v1.HasField("type"):
        layer.type = V1_TYPE_NAMES[caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)]
    _move_transform_fields(v1.type, layer)
    _add_param_specs(v1, layer)


def _move_transform_fields(v1_type: int, layer) -> None:
    """Old data layers kept scale/mean_file/crop_size/mirror in their own parameter message."""
    name = _DATA_PARAMS.get(v1_type)
    if name is None or not layer.HasField(name):
        return
    data_param = getattr(layer, name)
    for field_name in _TRANSFORM_FIELDS:
        if data_param.HasField(field_name):
            setattr(layer.transform_param, field_name, getattr(data_param, field_name))
            data_param.ClearField(field_name)


def _add_param_specs(v1, layer) -> None:
    """param[i] / blob_share_mode[i] / blobs_lr[i] / weight_decay[i] -> ParamSpec i."""
    count = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    specs = [layer.param.add() for _ in range(count)]
    for spec, name in zip(specs, v1.param):
        spec.name = name
    for spec, mode in zip(specs, v1.blob_share_mode):
        spec.share_mode = mode
    for spec, lr_mult in zip(specs, v1.blobs_lr):
        spec.lr_mult = lr_mult
    for spec, decay_mult in zip(specs, v1.weight_decay):
        spec.decay_mult = decay_mult


# ---- solver ----------------------------------------------------------------------------------------

def upgrade_solver(solver, source: str):
    """Turn the deprecated `solver_type` enum into the `type` string (in place) and upgrade inline
    V1 nets; returns the solver."""
    if solver.HasField("solver_type"):
        if solver.HasField("type"):
            raise ProtoError(
                f"{source}: both the deprecated `solver_type` ({_solver_type_name(solver)}) and `type` "
                f"(\"{solver.type}\") are set; keep only `type`"
            )
        solver.type = SOLVER_TYPE_NAMES[_solver_type_name(solver)]
        solver.ClearField("solver_type")
    for name in ("net_param", "train_net_param"):
        if solver.HasField(name):
            getattr(solver, name).CopyFrom(upgrade_v1_net(getattr(solver, name), f"{source} ({name})"))
    for index, net in enumerate(solver.test_net_param):
        net.CopyFrom(upgrade_v1_net(net, f"{source} (test_net_param #{index})"))
    return solver


def _solver_type_name(solver) -> str:
    return caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)


# ---- net inputs ------------------------------------------------------------------------------------

def net_inputs(net_param) -> list[tuple[str, tuple[int, ...]]]:
    """The net's declared inputs as (name, shape): `input` with one `input_shape` each, or with four
    deprecated `input_dim` values each."""
    names, dims, shapes = list(net_param.input), list(net_param.input_dim), net_param.input_shape
    where = f"net '{net_param.name}'"
    if dims and len(shapes):
        raise NetError(f"{where}: give input shapes with input_shape or the deprecated input_dim, not both")
    if dims:
        if len(dims) != 4 * len(names):
            raise NetError(f"{where}: {len(names)} input(s) need {4 * len(names)} input_dim values "
                           f"(4 per input), found {len(dims)}")
        result = [(name, tuple(dims[4 * i:4 * i + 4])) for i, name in enumerate(names)]
    else:
        if len(shapes) != len(names):
            raise NetError(f"{where}: {len(names)} input(s) need one input_shape each, found {len(shapes)}")
        result = [(name, tuple(int(d) for d in shape.dim)) for name, shape in zip(names, shapes)]
    _check_inputs(where, result)
    return result


def _check_inputs(where: str, inputs: list[tuple[str, tuple[int, ...]]]) -> None:
    seen = set()
    for name, shape in inputs:
        if name in seen:
            raise NetError(f"{where}: input '{name}' is declared twice")
        if any(d < 0 for d in shape):
            raise NetError(f"{where}: input '{name}' has a negative dimension in {shape}")
        seen.add(name)
