"""Old Caffe formats brought to the current one: V1 nets (`layers { type: CONVOLUTION ... }`), the
deprecated solver enum `solver_type`, and the `input`/`input_dim`/`input_shape` net inputs.

Old DeepLab files also use V1 enum names for the fork's own layers (`type: INTERP`) and the fork's
parameter messages inside `layers { }` (`interp_param { ... }`); neither exists in the V1 schema, so
`prepare_v1_text` takes them out of the text before parsing and `upgrade_v1_net` puts them back.

DeepLab v1 (deeplab-public, the fork before DeepLab v2) has fields of its own, which our schema holds
for reading old files (`upgrade_deeplab_v1_fields` turns them into their V2 form):
`convolution_param { hole }` (or hole_h/hole_w) is `dilation`; a V1 layer's `softmaxloss_param` becomes
`loss_param`; `image_data_param { has_label: false }` is `label_type: NONE`; a V1 layer's
`strict_dim` (copy weights by value count only) has no V2 form and is dropped.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from rloss.errors import NetError, ProtoError
from rloss.proto import caffe_pb2
from rloss.proto.compat import has_unknown_fields, is_repeated

log = logging.getLogger("rloss")

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
    tokens = _tokens(text)
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


def _tokens(text: str) -> list[_Token]:
    """The text's tokens, without white space and comments."""
    return [_Token(m.lastgroup, m.group(), m.start(), m.end())
            for m in _TOKEN.finditer(text) if m.lastgroup != "skip"]


def _scan_top_level(tokens, types, type_tokens, moved) -> None:
    """Walk the NetParameter's fields, looking inside each `layers` entry."""
    index, position = -1, 0
    while position < len(tokens):
        value, end = _field_extent(tokens, position)
        if tokens[position].text == "layers" and tokens[value].text in "{<":
            index += 1
            _scan_v1_layer(tokens, value + 1, end - 1, index, types, type_tokens, moved)
        position = end


def top_level_field_names(text: str) -> list[str]:
    """The names of the message's own fields in a text proto, in order (as far as the text is
    well-formed: a parse error there is the parser's to report)."""
    tokens = _tokens(text)
    names, position = [], 0
    try:
        while position < len(tokens):
            name = tokens[position].text
            position = _field_extent(tokens, position)[1]
            names.append(name)
    except _Malformed:
        pass
    return names


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
    """The net with its V1 `layers` turned into V2 `layer` entries (when it has none: the net itself),
    DeepLab v1's fields upgraded in either case.

    `types`/`extras` (by `layers` index) are the fork-only types and LayerParameter fields that
    `prepare_v1_text` took out of the text."""
    if not len(net.layers):
        upgrade_deeplab_v1_fields(net.layer, source)
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
    upgrade_deeplab_v1_fields(upgraded.layer, source)
    return upgraded


def _upgrade_layer(v1, layer, source: str, index: int) -> None:
    """One V1 layer into `layer`: copied fields, type string, ParamSpecs, data transform (DeepLab v1's
    `strict_dim`, a weight-loading switch V2 lacks, is left behind)."""
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


# ---- DeepLab v1 --------------------------------------------------------------------------------------

_HOLE_FIELDS = ("hole", "hole_h", "hole_w")
_LABEL_TYPE = caffe_pb2.ImageDataParameter.LabelType
_NO_LABEL = caffe_pb2.ImageDataParameter.NONE


def upgrade_deeplab_v1_fields(layers, source: str) -> None:
    """DeepLab v1's own fields of V2 `layers` (in place) in their V2 form, or our error naming the layer."""
    for index, layer in enumerate(layers):
        where = f"{source}: layer #{index} ('{layer.name}')"
        if layer.HasField("convolution_param"):
            _holes_to_dilation(layer.convolution_param, where)
        if layer.HasField("image_data_param"):
            _has_label_to_label_type(layer.image_data_param, where)
        if layer.HasField("softmaxloss_param"):
            _softmaxloss_to_loss_param(layer, where)


def _holes_to_dilation(param, where: str) -> None:
    """v1's hole (both axes) or hole_h and hole_w (its CHECK allows nothing else) spread the filter taps
    as dilation does: same output size, same sums."""
    given = [name for name in _HOLE_FIELDS if param.HasField(name)]
    if not given:
        return
    if len(param.dilation):
        raise ProtoError(f"{where}: convolution_param sets both DeepLab v1's {' and '.join(given)} and dilation "
                         f"{list(param.dilation)}; they are one setting: keep only dilation")
    if given not in (["hole"], ["hole_h", "hole_w"]):
        raise ProtoError(f"{where}: convolution_param sets {' and '.join(given)}; DeepLab v1 takes hole alone, "
                         "or hole_h and hole_w together")
    param.dilation.extend([param.hole] if given == ["hole"] else [param.hole_h, param.hole_w])
    for name in given:
        param.ClearField(name)


def _has_label_to_label_type(param, where: str) -> None:
    """v1's has_label: false (a list of images only; labels all ignore_label) is what v1 itself later
    wrote label_type: NONE; has_label: true says only that the list has labels, which label_type tells."""
    if not param.HasField("has_label"):
        return
    if param.HasField("label_type") and param.has_label != (param.label_type != _NO_LABEL):
        raise ProtoError(f"{where}: image_data_param has has_label: {str(param.has_label).lower()} and "
                         f"label_type: {_LABEL_TYPE.Name(param.label_type)}, which disagree; DeepLab v1's "
                         "has_label is replaced by label_type: keep only label_type")
    if not param.has_label:
        param.label_type = _NO_LABEL
    param.ClearField("has_label")


def _softmaxloss_to_loss_param(layer, where: str) -> None:
    """v1's SoftmaxWithLoss reads softmaxloss_param and divides by the number of pixels not ignored,
    which is V2's loss_param with its default normalization (VALID). Other layers never read it."""
    old = caffe_pb2.SoftmaxLossParameter()
    old.CopyFrom(layer.softmaxloss_param)
    layer.ClearField("softmaxloss_param")
    if layer.type != "SoftmaxWithLoss":
        log.warning("%s: softmaxloss_param is ignored on a %s layer (as DeepLab v1 does)", where, layer.type)
        return
    if old.HasField("weight_source"):
        raise ProtoError(f"{where}: softmaxloss_param.weight_source ('{old.weight_source}'), DeepLab v1's per-class "
                         "loss weights, has no V2 form here; remove it (every class then weighs 1)")
    if layer.HasField("loss_param"):
        raise ProtoError(f"{where}: the layer sets both DeepLab v1's softmaxloss_param and loss_param; "
                         "keep only loss_param")
    if len(old.ignore_label) > 1:
        raise ProtoError(f"{where}: softmaxloss_param ignores {len(old.ignore_label)} labels "
                         f"{list(old.ignore_label)}; V2's loss_param ignores one (ignore_label)")
    if len(old.ignore_label):
        layer.loss_param.ignore_label = old.ignore_label[0]


def deeplab_v1_binary_layers(net) -> list[str]:
    """The V1 layers of a binary net (parsed, not upgraded) that carry DeepLab v1's numbering, which
    the V1 schema reads as other fields: its layer types from 40 up and most of its parameter messages
    are unknown fields, its hole and hole_h are force_nd_im2col and dilation (never written in V1 files
    otherwise), its IMAGE_SEG_DATA (39) is DECONVOLUTION."""
    found = []
    for v1 in net.layers:
        convolution = v1.convolution_param
        if (has_unknown_fields(v1) or has_unknown_fields(convolution) or convolution.force_nd_im2col
                or len(convolution.dilation) or v1.HasField("strict_dim") or v1.HasField("softmaxloss_param")
                or (v1.type == caffe_pb2.V1LayerParameter.DECONVOLUTION and v1.HasField("image_data_param"))):
            found.append(v1.name)
    return found


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
