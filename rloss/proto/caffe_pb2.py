"""Caffe's message classes (`NetParameter`, `LayerParameter`, `SolverParameter`, ...), made at import time
from our schema `proto/caffe.proto` by the installed protobuf runtime.

Use it like the module protoc would generate: `caffe_pb2.NetParameter()`, `caffe_pb2.TRAIN`,
`caffe_pb2.PoolingParameter.MAX`. The classes live in a private descriptor pool, so a real pycaffe
`caffe_pb2` imported in the same process does not clash with ours.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pool
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from rloss.proto.compat import message_class
from rloss.proto.schema import parse_proto


def _schema_path() -> Path:
    """The installed copy beside this module, else the source tree's `proto/caffe.proto`."""
    installed = Path(__file__).with_name("caffe.proto")
    return installed if installed.exists() else Path(__file__).resolve().parents[2] / "proto" / "caffe.proto"


SCHEMA_PATH = _schema_path()
FILE_DESCRIPTOR_PROTO = parse_proto(SCHEMA_PATH.read_text(), str(SCHEMA_PATH))
POOL = descriptor_pool.DescriptorPool()
DESCRIPTOR = POOL.Add(FILE_DESCRIPTOR_PROTO) or POOL.FindFileByName(FILE_DESCRIPTOR_PROTO.name)


for _name, _descriptor in DESCRIPTOR.message_types_by_name.items():
    globals()[_name] = message_class(_descriptor, POOL)
for _name, _descriptor in DESCRIPTOR.enum_types_by_name.items():
    globals()[_name] = EnumTypeWrapper(_descriptor)
    for _value in _descriptor.values:
        globals()[_value.name] = _value.number
