"""`python -m rloss upgrade IN OUT`: an old Caffe file in today's (V2) form, what Caffe's
upgrade_net_proto_text, upgrade_net_proto_binary and upgrade_solver_proto_text do, in one command
that tells the kinds apart by their content:

* a binary model (.caffemodel) -> a binary model whose V1 `layers` are V2 `layer` entries, the
  weights unchanged (a DeepLab v1 model is refused: the V1 schema misreads its numbering);
* a net prototxt -> text: V1 `layers`, the DeepLab forks' V1 type names and DeepLab v1's own fields
  (hole, softmaxloss_param, has_label, strict_dim) in their V2 form (rloss.proto.upgrade);
* a solver prototxt -> text: the `solver_type` enum as the `type` string, inline V1 nets upgraded.

A text file's `${VAR}`s get their values as in every command (--set, the environment, the run
script's defaults): an unfilled placeholder is not protobuf text. The comments of a text file are not
kept (protobuf drops them, as Caffe's tools do). OUT is written atomically: never half-written."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import DecodeError

from rloss.cli.common import add_set_flag
from rloss.errors import ProtoError
from rloss.io import read_net_param, write_file_atomic, write_message_atomic
from rloss.proto import caffe_pb2
from rloss.proto.text import expand_variables, parse_net, parse_prototxt
from rloss.proto.upgrade import deeplab_v1_binary_layers, top_level_field_names, upgrade_solver
from rloss.variables import parse_assignments, variable_values

log = logging.getLogger("rloss")

_NET_FIELDS = frozenset(caffe_pb2.NetParameter.DESCRIPTOR.fields_by_name)
_SOLVER_FIELDS = frozenset(caffe_pb2.SolverParameter.DESCRIPTOR.fields_by_name)
_TEXT_CONTROLS = "\t\n\r\f\v"


def add_upgrade_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="old net prototxt, solver prototxt or binary .caffemodel")
    parser.add_argument("output", metavar="OUT", help="where to write the upgraded file (text for text, binary "
                                                      "for binary)")
    add_set_flag(parser)


def upgrade(args: argparse.Namespace) -> None:
    source, target = Path(args.input), Path(args.output)
    data = _read_bytes(source)
    if _is_binary(data):
        _upgrade_model(source, target, data)
        return
    values, defaults = variable_values(parse_assignments(args.set), source)
    text = expand_variables(data.decode("utf-8"), source, values, defaults)
    if is_solver_text(text):
        solver = upgrade_solver(parse_prototxt(text, caffe_pb2.SolverParameter(), source), str(source))
        _write_text(solver, target)
        log.info("Upgraded the solver %s; wrote %s", source, target)
        return
    net = parse_net(text, source)
    _write_text(net, target)
    log.info("Upgraded the net %s (%d layers); wrote %s", source, len(net.layer), target)


def is_solver_text(text: str) -> bool:
    """Whether a prototxt is a solver rather than a net: more of its top-level field names are
    SolverParameter's than NetParameter's (a tie, an empty file included, reads as a net)."""
    names = top_level_field_names(text)
    return sum(name in _SOLVER_FIELDS for name in names) > sum(name in _NET_FIELDS for name in names)


def _upgrade_model(source: Path, target: Path, data: bytes) -> None:
    if source.suffix == ".h5":
        raise ProtoError(f"{source}: an HDF5 model holds layer names and blobs only, with no old format to "
                         "upgrade; it loads as it is")
    refused = deeplab_v1_binary_layers(_parsed_as_stored(data))
    if refused:
        raise ProtoError(f"{source}: a DeepLab v1 model (layer(s) {', '.join(refused[:5])} use its field and type "
                         "numbers, which the V1 schema reads as others); its binary form is not upgraded: its "
                         "weights load as they are, and its prototxt upgrades (rloss upgrade NET.prototxt OUT)")
    net = read_net_param(source)
    write_message_atomic(net, target)
    log.info("Upgraded the model %s (%d layers); wrote %s", source, len(net.layer), target)


def _parsed_as_stored(data: bytes):
    """The NetParameter as the file holds it (V1 layers not upgraded); empty when it cannot be decoded,
    which read_net_param then explains."""
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except (DecodeError, RuntimeError):
        net.Clear()
    return net


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ProtoError(f"{path}: cannot read: {error.strerror or error}") from None
    if not data.strip():
        raise ProtoError(f"{path}: the file is empty: nothing to upgrade")
    return data


def _is_binary(data: bytes) -> bool:
    """Protobuf's binary form is rarely UTF-8, and when it is, it holds control bytes (field tags)
    that no prototxt has."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return any(ord(c) < 32 and c not in _TEXT_CONTROLS for c in text)


def _write_text(message, target: Path) -> None:
    text = text_format.MessageToString(message)
    try:
        write_file_atomic(target, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    except OSError as error:
        raise ProtoError(f"cannot write {target}: {error.strerror or error}") from None
