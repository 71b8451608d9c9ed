"""Net descriptions written from Python: a small builder of Caffe NetParameter text.

`NetBuilder` collects LayerParameter messages (`add` for any type, short helpers for the common ones;
each returns the name of its top so calls chain), then writes them as prototxt (`text`) or reads them
back as a NetParameter (`net_parameter`) exactly as a file would be read.

Placeholders: any field may hold `${NAME}`, as in the original experiment templates. A string field
simply contains it (`f"fc8_{exp}"` with `exp = "${EXP}"`); a numeric field cannot, so it is given a
`Var("NUM_LABELS")`: the builder keeps the field set (to the type's zero) and writes the placeholder
in its place. The messages in `NetBuilder.net` therefore hold 0 where a placeholder stands; use
`net_parameter(values)` for a message with the values filled in.

Keyword fields follow the protobuf field names; nested messages are dicts, repeated fields lists (a
single value is accepted), enums their names ("MAX", "TRAIN"), and None means "leave unset", so
optional settings can be passed straight through. The text has one style: fields in field-number
order, two-space indents, a blank line between layers, optional `#` comments before layers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from google.protobuf import text_format

from rloss.errors import ProtoError
from rloss.proto import caffe_pb2
from rloss.proto.compat import is_repeated


@dataclass(frozen=True)
class Var:
    """A `${NAME}` placeholder for a numeric field; written as `${NAME}`, substituted when read."""

    name: str

    def __str__(self) -> str:
        return "${" + self.name + "}"


Number = Union[int, float, Var]
Placeholders = dict[str, str]  # field path ("convolution_param.num_output", "loss_weight[0]") -> text


# ---- filling messages from keyword fields -----------------------------------------------------------

def assign_fields(message, fields: Mapping[str, Any], placeholders: Placeholders | None = None,
                  path: str = "") -> None:
    """Set `fields` (protobuf names -> values; dicts for messages, lists for repeated fields, None for
    unset) on `message`; numeric `Var`s are recorded in `placeholders` under their field path."""
    placeholders = {} if placeholders is None else placeholders
    for key, value in fields.items():
        if value is None:
            continue
        field = message.DESCRIPTOR.fields_by_name.get(key)
        if field is None:
            raise ProtoError(f"{message.DESCRIPTOR.name} has no field '{key}'")
        if is_repeated(field):
            items = value if isinstance(value, (list, tuple)) else [value]
            for index, item in enumerate(items):
                _assign_one(message, field, item, placeholders, f"{path}{key}[{index}]")
        else:
            _assign_one(message, field, value, placeholders, f"{path}{key}")


def _assign_one(message, field, value: Any, placeholders: Placeholders, path: str) -> None:
    if field.message_type is not None:
        if not isinstance(value, Mapping):
            raise ProtoError(f"{message.DESCRIPTOR.name}.{field.name} is a message: give a dict, not {value!r}")
        child = getattr(message, field.name).add() if is_repeated(field) else getattr(message, field.name)
        child.SetInParent()
        assign_fields(child, value, placeholders, path + ".")
        return
    value = _scalar_value(message, field, value, placeholders, path)
    if is_repeated(field):
        getattr(message, field.name).append(value)
    else:
        setattr(message, field.name, value)


def _scalar_value(message, field, value: Any, placeholders: Placeholders, path: str) -> Any:
    """The value to store: placeholders become the type's zero (strings keep their text), enum names
    their numbers."""
    if isinstance(value, Var):
        if field.type == field.TYPE_STRING:
            return str(value)
        placeholders[path] = str(value)
        return False if field.type == field.TYPE_BOOL else 0
    if field.enum_type is not None and isinstance(value, str):
        number = field.enum_type.values_by_name.get(value)
        if number is None:
            allowed = ", ".join(field.enum_type.values_by_name)
            raise ProtoError(f"{message.DESCRIPTOR.name}.{field.name}: no value named {value!r} (allowed: {allowed})")
        return number.number
    return value


# ---- writing messages as text -----------------------------------------------------------------------

def message_lines(message, placeholders: Mapping[str, str] | None = None, indent: int = 0,
                  path: str = "") -> list[str]:
    """`message` as prototxt lines, with the placeholder text where `placeholders` names a field."""
    placeholders = placeholders or {}
    pad = "  " * indent
    lines = []
    for field, value in message.ListFields():
        items = list(value) if is_repeated(field) else [value]
        for index, item in enumerate(items):
            key = f"{path}{field.name}[{index}]" if is_repeated(field) else f"{path}{field.name}"
            if field.message_type is not None:
                lines.append(f"{pad}{field.name} {{")
                lines += message_lines(item, placeholders, indent + 1, key + ".")
                lines.append(f"{pad}}}")
            else:
                lines.append(f"{pad}{field.name}: {placeholders.get(key) or _scalar_text(field, item)}")
    return lines


def _scalar_text(field, value: Any) -> str:
    """As text_format writes it, except that whole floats are written as integers (`lr_mult: 1`)."""
    if field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE) and float(value).is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    out = io.StringIO()
    text_format.PrintFieldValue(field, value, out, as_utf8=True)
    return out.getvalue()


def comment_lines(comment: str | None) -> list[str]:
    """`# ...` lines for a (possibly multi-line) comment."""
    return [f"# {line}".rstrip() for line in comment.split("\n")] if comment else []


# ---- the builder ------------------------------------------------------------------------------------

def lr_params(weight_lr: float, bias_lr: float) -> list[dict]:
    """The usual `param` pair of a convolution: weights with decay, biases without."""
    return [{"lr_mult": weight_lr, "decay_mult": 1}, {"lr_mult": bias_lr, "decay_mult": 0}]


def gaussian(std: float) -> dict:
    return {"type": "gaussian", "std": std}


def constant(value: float = 0) -> dict:
    return {"type": "constant", "value": value}


class NetBuilder:
    """A net description under construction; see the module docstring."""

    def __init__(self, name: str = "", header: str | None = None):
        self.net = caffe_pb2.NetParameter(name=name)
        self.header = header
        self._placeholders: list[Placeholders] = []
        self._comments: list[str | None] = []

    # -- generic --

    def add(self, name: str, type_name: str, bottoms: Sequence[str] = (), tops: Sequence[str] = (),
            comment: str | None = None, **fields: Any):
        """Append a layer of any type; `fields` are LayerParameter fields (e.g. `include=[{"phase": "TEST"}]`,
        `convolution_param={...}`). Returns the new LayerParameter."""
        layer = self.net.layer.add(name=name, type=type_name)
        layer.bottom.extend(bottoms)
        layer.top.extend(tops)
        placeholders: Placeholders = {}
        assign_fields(layer, fields, placeholders)
        self._placeholders.append(placeholders)
        self._comments.append(comment)
        return layer

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.net.layer]

    # -- common layer types; each returns its top --

    def conv(self, name: str, bottom: str, num_output: Number, kernel_size: int, top: str | None = None,
             params: Iterable[Mapping] = (), comment: str | None = None, **conv_fields: Any) -> str:
        """Convolution; `conv_fields` are ConvolutionParameter fields (pad, stride, dilation, bias_term,
        weight_filler, bias_filler...)."""
        top = top or name
        self.add(name, "Convolution", [bottom], [top], comment=comment, param=list(params),
                 convolution_param={"num_output": num_output, "kernel_size": kernel_size, **conv_fields})
        return top

    def relu(self, name: str, blob: str) -> str:
        """In-place ReLU."""
        self.add(name, "ReLU", [blob], [blob])
        return blob

    def dropout(self, name: str, blob: str, ratio: float = 0.5) -> str:
        """In-place Dropout."""
        self.add(name, "Dropout", [blob], [blob], dropout_param={"dropout_ratio": ratio})
        return blob

    def pool(self, name: str, bottom: str, pool: str, kernel_size: int, stride: int | None = None,
             pad: int | None = None, top: str | None = None) -> str:
        top = top or name
        self.add(name, "Pooling", [bottom], [top],
                 pooling_param={"pool": pool, "kernel_size": kernel_size, "stride": stride, "pad": pad})
        return top

    def interp(self, name: str, bottom: str, top: str | None = None, comment: str | None = None,
               **interp_fields: Any) -> str:
        """Interp (bilinear resize); `interp_fields`: zoom_factor, shrink_factor, pad_beg, pad_end..."""
        top = top or name
        self.add(name, "Interp", [bottom], [top], comment=comment, interp_param=interp_fields)
        return top

    def eltwise(self, name: str, bottoms: Sequence[str], operation: str | None = None, top: str | None = None,
                comment: str | None = None) -> str:
        """Eltwise; without `operation` the param block is left out (Caffe's default is SUM)."""
        top = top or name
        self.add(name, "Eltwise", bottoms, [top], comment=comment,
                 eltwise_param=None if operation is None else {"operation": operation})
        return top

    def softmax(self, name: str, bottom: str, top: str | None = None) -> str:
        top = top or name
        self.add(name, "Softmax", [bottom], [top])
        return top

    # -- output --

    def text(self) -> str:
        """The net as prototxt, placeholders included."""
        lines = comment_lines(self.header)
        if lines:
            lines.append("")
        head = caffe_pb2.NetParameter()
        head.CopyFrom(self.net)
        del head.layer[:]
        lines += message_lines(head)
        for layer, placeholders, comment in zip(self.net.layer, self._placeholders, self._comments):
            lines.append("")
            lines += comment_lines(comment)
            lines.append("layer {")
            lines += message_lines(layer, placeholders, indent=1)
            lines.append("}")
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.text(), encoding="utf-8")

    def net_parameter(self, values: Mapping[str, object] | None = None, phase: int | None = None,
                      defaults: Mapping[str, object] | None = None):
        """The NetParameter that reading `text()` gives, with `${VAR}`s from `values` (then
        `defaults`; the environment is not read); with `phase`, filtered for it as `read_net` does."""
        from rloss.proto.netstate import filter_net, merge_state
        from rloss.proto.text import expand_variables, parse_net

        source = f"<generated net {self.net.name or '?'}>"
        net = parse_net(expand_variables(self.text(), source, values, defaults), source)
        if phase is None:
            return net
        state = merge_state(net.state, phase)
        net = filter_net(net, state)
        net.state.CopyFrom(state)
        return net
