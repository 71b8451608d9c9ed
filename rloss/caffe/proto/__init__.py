"""pycaffe's `caffe.proto`: `from rloss.caffe.proto import caffe_pb2` (or `import rloss.caffe.proto.caffe_pb2`)
gives rloss's message classes, `rloss.proto.caffe_pb2`, made from our schema proto/caffe.proto."""

from __future__ import annotations

import sys

from rloss.proto import caffe_pb2

sys.modules[f"{__name__}.caffe_pb2"] = caffe_pb2
