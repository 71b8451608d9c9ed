"""Reading Caffe's text files (prototxt): `${VAR}` substitution, parsing with errors that point at
file:line:column and suggest the fix, V1 upgrade and NetState filtering of nets, solver upgrade."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Union

from google.protobuf import text_format

from rloss.errors import ProtoError, VariableError
from rloss.proto import caffe_pb2
from rloss.proto.netstate import filter_net, merge_state
from rloss.proto.upgrade import (
    FORK_V1_TYPE_NAMES,
    V1_TYPE_NAMES,
    prepare_v1_text,
    upgrade_solver,
    upgrade_v1_net,
)
from rloss.variables import how_to_set

PathLike = Union[str, "os.PathLike[str]"]

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CODE_OR_COMMENT = re.compile(r"\"(?:[^\"\\]|\\.)*\"?|'(?:[^'\\]|\\.)*'?|#|[^\"'#]+")


# ---- ${VAR} substitution -----------------------------------------------------------------------------

def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one line: the comment starts at the first `#` outside a quoted string."""
    if "#" in line:
        for match in _CODE_OR_COMMENT.finditer(line):
            if match.group() == "#":
                return line[:match.start()], line[match.start():]
    return line, ""


def expand_variables(text: str, path: PathLike, values: Mapping[str, object] | None = None,
                     defaults: Mapping[str, object] | None = None) -> str:
    """Replace each `${NAME}` outside comments by its value: from `values` (merged once by
    `rloss.variables.variable_values`: `--set`, then the run script's variables from the environment),
    else `defaults`. This never reads the environment itself. Comments are left as they are (the
    reference files keep unresolvable placeholders in commented-out blocks). A placeholder without a
    value is an error."""
    lookup = _VariableLookup(values or {}, defaults or {})
    lines = text.split("\n")
    missing: dict[str, tuple[int, int]] = {}
    for number, line in enumerate(lines, 1):
        code, comment = split_comment(line)
        if "$" in code:
            lines[number - 1] = _expand_code(code, lookup, missing, path, number) + comment
    if missing:
        raise _missing_error(missing, path)
    return "\n".join(lines)


class _VariableLookup:
    """values, then defaults."""

    def __init__(self, values: Mapping[str, object], defaults: Mapping[str, object]):
        self.values, self.defaults = values, defaults

    def get(self, name: str) -> str | None:
        for source in (self.values, self.defaults):
            if name in source:
                return str(source[name])
        return None


def _expand_code(code: str, lookup: _VariableLookup, missing: dict[str, tuple[int, int]],
                 path: PathLike, number: int) -> str:
    """One line's code with its placeholders replaced; unresolved names are recorded in `missing`."""

    def replace(match: re.Match) -> str:
        value = lookup.get(match.group(1))
        if value is None:
            missing.setdefault(match.group(1), (number, match.start() + 1))
            return match.group()
        if "\n" in value or "\r" in value:
            raise VariableError(f"{path}:{number}:{match.start() + 1}: the value of ${{{match.group(1)}}} "
                                "contains a line break; values must be single-line")
        return value

    for start in (match.start() for match in re.finditer(r"\$\{", code)):
        if not _PLACEHOLDER.match(code, start):
            malformed = code[start:].split()[0]
            raise VariableError(f"{path}:{number}:{start + 1}: malformed placeholder {malformed!r}: write "
                                "${NAME} with a name made of letters, digits and underscores")
    return _PLACEHOLDER.sub(replace, code)


def _missing_error(missing: dict[str, tuple[int, int]], path: PathLike) -> VariableError:
    name, (line, column) = next(iter(missing.items()))
    message = f"{path}:{line}:{column}: ${{{name}}} has no value; {how_to_set(name)}"
    if len(missing) > 1:
        others = ", ".join(f"${{{n}}} (line {ln})" for n, (ln, _) in list(missing.items())[1:])
        message += f" (also without a value: {others})"
    return VariableError(message)


# ---- parsing ----------------------------------------------------------------------------------------

def parse_prototxt(text: str, message, path: PathLike, shown_text: str | None = None,
                   partial: bool = False):
    """Parse text-format `text` into `message` (and return it); errors name file:line:column and
    quote the line from `shown_text` (the user's text when `text` is a rewritten copy of it).
    Unset required fields are an error (as in Caffe) unless `partial`."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise ProtoError(_describe_parse_error(error, text, shown_text or text, path)) from None
    if not partial:
        check_required(message, path)
    return message


def check_required(message, path: PathLike) -> None:
    """Caffe's text reader rejects messages with unset `required` fields (e.g. MatWrite's prefix)."""
    if not message.IsInitialized():
        raise ProtoError(f"{path}: required field(s) missing: {_missing_fields(message)}")


def _missing_fields(message) -> str:
    """The unset required fields, each with the name of its layer when it sits in a net's layer."""
    described = []
    for where in message.FindInitializationErrors():
        match = re.match(r"layer\[(\d+)\]", where)
        if match and message.DESCRIPTOR.name == "NetParameter":
            where += f" (layer '{message.layer[int(match.group(1))].name}')"
        described.append(where)
    return ", ".join(described)


def read_text(path: PathLike) -> str:
    """The file's text (UTF-8), or a ProtoError saying why it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ProtoError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ProtoError(f"{path}:{line}: not a UTF-8 text file (byte 0x{data[error.start]:02x}); "
                         "is this a binary file?") from None


def read_prototxt(path: PathLike, message_type, values: Mapping[str, object] | None = None,
                  defaults: Mapping[str, object] | None = None):
    """A message of `message_type` (e.g. caffe_pb2.SolverParameter) read from a prototxt file
    after `${VAR}` substitution."""
    text = expand_variables(read_text(path), path, values, defaults)
    return parse_prototxt(text, message_type(), path)


def parse_net(text: str, path: PathLike):
    """A NetParameter from (substituted) text, V1 `layers` upgraded to `layer`."""
    prepared = prepare_v1_text(text)
    net = parse_prototxt(prepared.text, caffe_pb2.NetParameter(), path, text, partial=True)
    extras = {index: parse_prototxt(extra, caffe_pb2.LayerParameter(), path, text, partial=True)
              for index, extra in prepared.extra_texts.items()}
    net = upgrade_v1_net(net, str(path), prepared.types, extras)
    check_required(net, path)
    return net


def read_net(path: PathLike, phase: int | None = None, values: Mapping[str, object] | None = None,
             defaults: Mapping[str, object] | None = None, level: int | None = None,
             stages: Iterable[str] = ()):
    """A net prototxt as an (upgraded) NetParameter. With `phase`, the layers are filtered for the
    state made of the file's own `state` with this phase (and `level`/`stages`), which is then
    stored in the result's `state`."""
    net = parse_net(expand_variables(read_text(path), path, values, defaults), path)
    if phase is None:
        return net
    state = merge_state(net.state, phase, level, stages)
    net = filter_net(net, state)
    net.state.CopyFrom(state)
    return net


def read_solver(path: PathLike, values: Mapping[str, object] | None = None,
                defaults: Mapping[str, object] | None = None):
    """A solver prototxt as a SolverParameter, with the deprecated `solver_type` turned into `type`."""
    return upgrade_solver(read_prototxt(path, caffe_pb2.SolverParameter, values, defaults), str(path))


# ---- error messages ---------------------------------------------------------------------------------

_UNKNOWN_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)"')
_UNKNOWN_ENUM = re.compile(r'Enum type "([\w.]+)" has no value named "?([^"\s.]+)"?')
_NOT_A_STRING = re.compile(r"Expected string but found: '([^']*)'")


def _describe_parse_error(error: text_format.ParseError, parsed: str, shown: str, path: PathLike) -> str:
    """`file:line:column: what`, the offending line with a caret under the column, and a hint."""
    line, column = error.GetLine(), error.GetColumn()
    what = re.sub(r"^\d+:\d+ : ", "", str(error))
    if not line:
        return f"{path}: {what}"
    what = what.removeprefix(f"'{_line(parsed, line)}': ")
    source = _line(shown, line)
    column = column or 1
    hint = _hint(what, source[:column - 1])
    quoted, at = _around(source.rstrip(), column - 1)
    caret = "".join(c if c == "\t" else " " for c in quoted[:at]) + "^"
    message = f"{path}:{line}:{column}: {what}\n    {quoted}\n    {caret}"
    return f"{message}\n  hint: {hint}" if hint else message


QUOTE_CHARS = 120


def _around(source: str, index: int) -> tuple[str, int]:
    """The part of a source line quoted in an error (at most about QUOTE_CHARS characters around
    `index`, "..." where cut: a one-line 200 KB file must not make a 200 KB message) and where
    `index` falls in it."""
    start = max(0, min(index - QUOTE_CHARS // 2, max(len(source), index + 1) - QUOTE_CHARS))
    end = start + QUOTE_CHARS
    head = "..." if start > 0 else ""
    tail = "..." if end < len(source) else ""
    return head + source[start:end] + tail, index - start + len(head)


def _line(text: str, number: int) -> str:
    lines = text.split("\n")
    return lines[number - 1] if number <= len(lines) else ""


def _hint(what: str, before: str) -> str:
    """A suggestion for the usual mistakes: typos in field or enum names, V1/V2 type mix-ups."""
    for pattern, explain in ((_UNKNOWN_FIELD, _unknown_field_hint), (_UNKNOWN_ENUM, _unknown_enum_hint),
                             (_NOT_A_STRING, _not_a_string_hint)):
        match = pattern.search(what)
        if match:
            return explain(match, before)
    if what.startswith('Expected "}"'):
        return "a `{` opened above is not closed"
    if "should not have multiple" in what:
        return "this field takes one value and is given twice (only repeated fields may repeat)"
    return ""


def _unknown_field_hint(match: re.Match, before: str) -> str:
    message_name, name = match.groups()
    fields = list(_descriptor(message_name).fields_by_name)
    close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
    if message_name == "caffe.LayerParameter" and name in ("blobs_lr", "weight_decay"):
        return (f"{name} belongs to the V1 `layers {{ }}` format; in a `layer {{ }}` block write "
                "param { lr_mult: ... decay_mult: ... } once per parameter blob")
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return f"{message_name.removeprefix('caffe.')} has no such field in this Caffe fork's schema"


def _unknown_enum_hint(match: re.Match, before: str) -> str:
    enum_name, value = match.groups()
    if enum_name == "caffe.V1LayerParameter.LayerType" and value in _V2_TYPE_NAMES:
        return (f'"{value}" is a V2 type string; in a V1 `layers {{ }}` block the type is an enum '
                f"({_V2_TYPE_NAMES[value]}); or write the layer as `layer {{ }}`")
    names = list(_enum_descriptor(enum_name).values_by_name)
    if enum_name == "caffe.V1LayerParameter.LayerType":
        names += list(FORK_V1_TYPE_NAMES)
    close = difflib.get_close_matches(value.upper(), names, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return "allowed values: " + ", ".join(names)


def _not_a_string_hint(match: re.Match, before: str) -> str:
    token = match.group(1)
    v2_name = V1_TYPE_NAMES.get(token, FORK_V1_TYPE_NAMES.get(token))
    if re.search(r"\btype\s*:?\s*$", before) and v2_name is not None:
        return (f"{token} is a V1 enum name (for `layers {{ }}` blocks); "
                f'in a `layer {{ }}` block write type: "{v2_name}"')
    return f'text values are written in double quotes: "{token}"'


_V2_TYPE_NAMES = {v2: v1 for v1, v2 in {**V1_TYPE_NAMES, **FORK_V1_TYPE_NAMES}.items() if v2}


def _descriptor(full_name: str):
    return caffe_pb2.POOL.FindMessageTypeByName(full_name)


def _enum_descriptor(full_name: str):
    return caffe_pb2.POOL.FindEnumTypeByName(full_name)
