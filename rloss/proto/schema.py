"""A reader for the proto2 subset that `proto/caffe.proto` is written in.

It turns the schema into a `FileDescriptorProto`, so the message classes are made at import time
by the installed protobuf runtime itself. That removes protoc (and its version coupling between
generated code and runtime) from the build. Supported: `syntax`, `package`, top-level and nested
`message`/`enum`, `optional|repeated|required` scalar, enum and message fields with `[default = X]`
and `[packed = true]`, `//` comments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import descriptor_pb2

from rloss.errors import ProtoError

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _FDP.TYPE_DOUBLE, "float": _FDP.TYPE_FLOAT, "int64": _FDP.TYPE_INT64,
    "uint64": _FDP.TYPE_UINT64, "int32": _FDP.TYPE_INT32, "fixed64": _FDP.TYPE_FIXED64,
    "fixed32": _FDP.TYPE_FIXED32, "bool": _FDP.TYPE_BOOL, "string": _FDP.TYPE_STRING,
    "bytes": _FDP.TYPE_BYTES, "uint32": _FDP.TYPE_UINT32, "sfixed32": _FDP.TYPE_SFIXED32,
    "sfixed64": _FDP.TYPE_SFIXED64, "sint32": _FDP.TYPE_SINT32, "sint64": _FDP.TYPE_SINT64,
}
_LABELS = {"optional": _FDP.LABEL_OPTIONAL, "repeated": _FDP.LABEL_REPEATED, "required": _FDP.LABEL_REQUIRED}
_TOKEN = re.compile(r'(\s+)|(//[^\n]*)|("(?:[^"\\]|\\.)*")|([A-Za-z_][\w.]*|[-+]?[\d.][\w.+-]*)|(\S)')


@dataclass
class _Token:
    text: str
    line: int
    is_string: bool = False


@dataclass
class _Scope:
    """A message being read, with the fields whose type names still need resolving."""

    full_name: str
    proto: descriptor_pb2.DescriptorProto
    pending: list[tuple[descriptor_pb2.FieldDescriptorProto, str, int]] = field(default_factory=list)


def _tokenize(text: str) -> list[_Token]:
    tokens, line = [], 1
    for match in _TOKEN.finditer(text):
        space, comment, string, word, punct = match.groups()
        if string is not None:
            tokens.append(_Token(string, line, is_string=True))
        elif word is not None or punct is not None:
            tokens.append(_Token(word if word is not None else punct, line))
        line += match.group(0).count("\n")
    return tokens


class _Reader:
    def __init__(self, text: str, path: str):
        self.tokens = _tokenize(text)
        self.pos = 0
        self.path = path

    def error(self, message: str) -> ProtoError:
        line = self.tokens[min(self.pos, len(self.tokens) - 1)].line if self.tokens else 1
        return ProtoError(f"{self.path}:{line}: {message}")

    def peek(self) -> str | None:
        return self.tokens[self.pos].text if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> _Token:
        if self.pos >= len(self.tokens):
            raise self.error("unexpected end of file")
        token = self.tokens[self.pos]
        if expected is not None and token.text != expected:
            raise self.error(f"expected '{expected}', found '{token.text}'")
        self.pos += 1
        return token


def _unquote(token: _Token) -> str:
    return bytes(token.text[1:-1], "utf-8").decode("unicode_escape") if token.is_string else token.text


def _read_enum(reader: _Reader) -> descriptor_pb2.EnumDescriptorProto:
    enum = descriptor_pb2.EnumDescriptorProto(name=reader.take().text)
    reader.take("{")
    while reader.peek() != "}":
        name = reader.take().text
        reader.take("=")
        number = reader.take().text
        reader.take(";")
        try:
            enum.value.add(name=name, number=int(number))
        except ValueError:
            raise reader.error(f"enum value {name} has a non-integer number '{number}'") from None
    reader.take("}")
    return enum


def _read_options(reader: _Reader, fdp: descriptor_pb2.FieldDescriptorProto) -> None:
    reader.take("[")
    while True:
        option = reader.take().text
        reader.take("=")
        value = reader.take()
        if option == "default":
            fdp.default_value = _unquote(value)
        elif option == "packed":
            fdp.options.packed = value.text == "true"
        else:
            raise reader.error(f"field option '{option}' is not supported")
        if reader.peek() != ",":
            break
        reader.take(",")
    reader.take("]")


def _read_message(reader: _Reader, container, parent: str, scopes: list[_Scope]) -> None:
    """Read a message into `container` (added in place: the pending fields keep pointing into it)."""
    message = container.add(name=reader.take().text)
    scope = _Scope(f"{parent}.{message.name}", message)
    scopes.append(scope)
    reader.take("{")
    while reader.peek() != "}":
        keyword = reader.take().text
        if keyword == "message":
            _read_message(reader, message.nested_type, scope.full_name, scopes)
        elif keyword == "enum":
            message.enum_type.append(_read_enum(reader))
        elif keyword in _LABELS:
            type_token = reader.take()
            fdp = message.field.add(name=reader.take().text, label=_LABELS[keyword])
            reader.take("=")
            fdp.number = int(reader.take().text)
            if type_token.text in _SCALARS:
                fdp.type = _SCALARS[type_token.text]
            else:
                scope.pending.append((fdp, type_token.text, type_token.line))
            if reader.peek() == "[":
                _read_options(reader, fdp)
            reader.take(";")
        else:
            raise reader.error(f"unexpected '{keyword}' in message {message.name}")
    reader.take("}")


def _collect_types(prefix: str, messages, enums, kinds: dict[str, int]) -> None:
    for enum in enums:
        kinds[f"{prefix}.{enum.name}"] = _FDP.TYPE_ENUM
    for message in messages:
        name = f"{prefix}.{message.name}"
        kinds[name] = _FDP.TYPE_MESSAGE
        _collect_types(name, message.nested_type, message.enum_type, kinds)


def _resolve(scopes: list[_Scope], kinds: dict[str, int], path: str) -> None:
    """Protobuf scoping: a type name is looked up from the innermost enclosing scope outwards."""
    for scope in scopes:
        for fdp, type_name, line in scope.pending:
            parts = scope.full_name.split(".")
            for depth in range(len(parts), 0, -1):
                candidate = ".".join(parts[:depth] + [type_name])
                if candidate in kinds:
                    fdp.type, fdp.type_name = kinds[candidate], candidate
                    break
            else:
                raise ProtoError(f"{path}:{line}: unknown type '{type_name}' of field {fdp.name}")


def parse_proto(text: str, path: str = "caffe.proto") -> descriptor_pb2.FileDescriptorProto:
    """Read proto2 schema text into a FileDescriptorProto (named after `path`'s file name)."""
    reader = _Reader(text, path)
    fdp = descriptor_pb2.FileDescriptorProto(name=Path(path).name, syntax="proto2")
    scopes: list[_Scope] = []
    while reader.peek() is not None:
        keyword = reader.take().text
        if keyword == "syntax":
            reader.take("=")
            if _unquote(reader.take()) != "proto2":
                raise reader.error("only proto2 schemas are supported")
            reader.take(";")
        elif keyword == "package":
            fdp.package = reader.take().text
            reader.take(";")
        elif keyword == "message":
            _read_message(reader, fdp.message_type, "", scopes)
        elif keyword == "enum":
            fdp.enum_type.append(_read_enum(reader))
        else:
            raise reader.error(f"unexpected '{keyword}' at top level")
    prefix = f".{fdp.package}" if fdp.package else ""
    for scope in scopes:
        scope.full_name = prefix + scope.full_name
    kinds: dict[str, int] = {}
    _collect_types(prefix, fdp.message_type, fdp.enum_type, kinds)
    _resolve(scopes, kinds, path)
    return fdp
