"""pycaffe's net specification in Python: `NetSpec`, `layers` (L), `params` (P) and `to_proto`.

    n = caffe.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[2, 1, 8, 8]), dict(dim=[2, 1, 1, 1])], ntop=2)
    n.conv = L.Convolution(n.data, kernel_size=3, num_output=8, weight_filler=dict(type="xavier"))
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.relu, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    net_param = n.to_proto()               # a NetParameter; str() of it is the prototxt

`L.Type(*bottoms, **fields)` makes a `Function` (a layer yet to be named) and returns its top (a
`Top`), a tuple of tops for `ntop` > 1, or the Function itself for `ntop=0`. `in_place=True` makes the
tops the bottoms. pycaffe's naming: a top assigned to the NetSpec takes that attribute's name, any
other `TypeN` (counted per type in the order the layers are written); a layer takes its first top's
name (`TypeN` itself when it has none). Fields: a key ending in `param` is a LayerParameter field
(`param=[dict(lr_mult=1)]`, `transform_param=...`); another key goes to the layer type's own message
when that has such a field (Convolution -> convolution_param, InnerProduct -> inner_product_param,
the pairs read from the schema as pycaffe does; rloss adds Deconvolution and ImageSegData, whose
settings live in another type's message), else to the LayerParameter (`loss_weight`, `include`).
Dicts become messages, lists repeated fields, enum names or `P.Type.NAME` enum values (rloss.netspec's
assign_fields). Tops expose `.fn` with `.type_name`, `.params` (the fields as given) and `.inputs`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, Union

import numpy as np

from rloss.errors import ProtoError
from rloss.netspec import assign_fields
from rloss.proto import caffe_pb2

# layer types whose settings live in the message another type is named after
_SHARED_PARAMS = {"Deconvolution": "convolution_param", "ImageSegData": "image_data_param"}


def _type_params() -> dict[str, str]:
    """Layer type -> its LayerParameter field, from the schema: `FooBarParameter foo_bar_param`
    gives FooBar -> foo_bar_param (pycaffe's rule), plus the shared ones."""
    fields = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type.name.endswith("Parameter"):
            fields[field.message_type.name[: -len("Parameter")]] = field.name
    return {**fields, **_SHARED_PARAMS}


TYPE_PARAMS = _type_params()


class Top:
    """Output `n` of the layer `fn` (pycaffe's Top)."""

    def __init__(self, fn: Function, n: int):
        self.fn = fn
        self.n = n

    def to_proto(self):
        """A NetParameter with every layer this top needs (their tops named automatically)."""
        return to_proto(self)


class Function:
    """A layer of a spec: its type, its input tops and its fields (pycaffe's Function); `ntop` and
    `in_place` are taken out of the fields."""

    def __init__(self, type_name: str, inputs: tuple, params: dict[str, Any]):
        for index, value in enumerate(inputs):
            if not isinstance(value, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (type is {type(value)})")
        self.type_name = type_name
        self.inputs = tuple(inputs)
        self.params = dict(params)
        self.ntop = int(self.params.pop("ntop", 1))
        self.in_place = bool(self.params.pop("in_place", False))
        self.tops = tuple(Top(self, n) for n in range(self.ntop))


Named = Union[Top, Function]


class _Writer:
    """Turns Functions into LayerParameters, each after the layers of its inputs, naming blobs and
    layers by pycaffe's rules (module docstring)."""

    def __init__(self, names: dict[Named, str]):
        self.names = dict(names)
        self.counts: Counter[str] = Counter()
        self.layers: OrderedDict[Function, Any] = OrderedDict()

    def add(self, fn: Function) -> None:
        if fn in self.layers:
            return
        for top in fn.inputs:
            self.add(top.fn)
        layer = caffe_pb2.LayerParameter(type=fn.type_name)
        layer.bottom.extend(self.layers[top.fn].top[top.n] for top in fn.inputs)
        layer.top.extend(layer.bottom if fn.in_place else [self._name(top) for top in fn.tops])
        if fn not in self.names and fn.tops:
            self.names[fn] = self._name(fn.tops[0])
        layer.name = self._name(fn)
        _assign_layer_fields(layer, fn.params)
        self.layers[fn] = layer

    def _name(self, item: Named) -> str:
        if item not in self.names:
            type_name = item.fn.type_name if isinstance(item, Top) else item.type_name
            self.counts[type_name] += 1
            self.names[item] = f"{type_name}{self.counts[type_name]}"
        return self.names[item]

    def net(self):
        net = caffe_pb2.NetParameter()
        net.layer.extend(self.layers.values())
        return net


def _assign_layer_fields(layer, fields: dict[str, Any]) -> None:
    own = TYPE_PARAMS.get(layer.type)
    for key, value in fields.items():
        target = layer
        if not key.endswith("param") and own is not None:
            message = getattr(layer, own)
            if key in message.DESCRIPTOR.fields_by_name:
                target = message
        try:
            assign_fields(target, {key: _plain(value)})
        except (ProtoError, TypeError, ValueError) as error:
            raise ProtoError(f"layer type {layer.type}, field '{key}' = {value!r}: {error}") from None


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (coord_map's crop offsets) as Python lists and numbers."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def to_proto(*tops: Named):
    """A NetParameter with every layer the given tops need, blobs and layers named automatically."""
    writer = _Writer({})
    for top in tops:
        writer.add(_function(top))
    return writer.net()


def _function(item: Named) -> Function:
    return item.fn if isinstance(item, Top) else item


class NetSpec:
    """Tops (or top-less Functions) assigned as attributes or items name their blobs and layers;
    `to_proto` writes every layer they need, in the order they were assigned (pycaffe's NetSpec)."""

    def __init__(self) -> None:
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value: Named) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str) -> Named:
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"this NetSpec has no top '{name}'") from None

    def __setitem__(self, name: str, value: Named) -> None:
        self.tops[name] = value

    def __getitem__(self, name: str) -> Named:
        return self.tops[name]

    def to_proto(self):
        writer = _Writer({value: name for name, value in self.tops.items()})
        for value in self.tops.values():
            writer.add(_function(value))
        return writer.net()


class Layers:
    """`layers.Type(*bottoms, **fields)` specifies a layer of that type (pycaffe's `caffe.layers`)."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def layer(*inputs: Top, **fields: Any):
            fn = Function(type_name, inputs, fields)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops

        return layer


class _EnumValues:
    """`params.Pooling.MAX`: the enum values of one layer type's parameter message."""

    def __init__(self, message: str):
        self._message = message

    def __getattr__(self, name: str) -> int:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(getattr(caffe_pb2, self._message), name)


class Parameters:
    """`params.Type.NAME`: the value NAME of an enum of `TypeParameter` (pycaffe's `caffe.params`)."""

    def __getattr__(self, type_name: str) -> _EnumValues:
        if type_name.startswith("__"):
            raise AttributeError(type_name)
        return _EnumValues(type_name + "Parameter")


layers = Layers()
params = Parameters()
