"""A pycaffe-like face over `rloss.net.Net`, so Caffe users' scripts run with only the import changed:

    from rloss import caffe
    from rloss.caffe import layers as L, params as P
    net = caffe.Net("deploy.prototxt", caffe.TEST, weights="weights.caffemodel")
    net.blobs["data"].data[...] = image
    out = net.forward()                       # or forward(start="fc7", end="fc8"), forward_all(data=...)
    net.backward()
    net.params["conv1"][0].diff

    solver = caffe.SGDSolver("solver.prototxt")
    solver.net.copy_from("init.caffemodel")
    solver.step(1)
    solver.net.blobs["fc8_interp"].diff      # that iteration's gradient

    n = caffe.NetSpec()                       # nets written in Python (rloss.caffe.net_spec)
    n.data = L.Input(shape=dict(dim=[1, 3, 32, 32]))
    n.conv = L.Convolution(n.data, kernel_size=3, num_output=8)
    print(n.to_proto())

Blob data and diffs are numpy arrays that share memory with the net's CPU tensors (host copies, written
back before the next run, for CUDA or reduced-precision blobs), so writing into them changes what the
net computes, as in pycaffe. `${VAR}` placeholders in prototxt files take the `values=` keyword (an
rloss extension), then the run script's variables from the environment, then its defaults
(`rloss.variables`). As in pycaffe, the device is the one chosen with set_mode_cpu/set_mode_gpu (the
solver file's solver_mode is not used). `precision="bf16"` (or "fp16"; rloss.precision) runs a Net or a
solver's nets under torch.autocast, the weights kept float32; blobs autocast computed in bf16 show as
float32 copies. `SGDSolver` also takes `checkpoint_activations=True` (it has no effect on the solver's
own net while pycaffe shows every blob's diff, which needs every activation kept).
"""

from __future__ import annotations

from rloss.caffe import proto  # noqa: F401  (caffe.proto.caffe_pb2)
from rloss.caffe.blob import Blob  # noqa: F401
from rloss.caffe.mode import current_device, set_device, set_mode_cpu, set_mode_gpu, set_random_seed  # noqa: F401
from rloss.caffe.net import Net, NetLayer  # noqa: F401
from rloss.caffe.net_spec import NetSpec, layers, params, to_proto  # noqa: F401
from rloss.layers import layer_types
from rloss.layers.python_layer import PythonLayerBase as Layer  # noqa: F401  (what Python layers subclass)
from rloss.proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


def layer_type_list() -> list[str]:
    """The layer types nets can use (Caffe's registered types, and rloss's), sorted."""
    return layer_types()


from rloss.caffe import classifier, coord_map, draw, io  # noqa: E402, F401  (the modules; most use Net above)
from rloss.caffe.classifier import Classifier  # noqa: E402, F401
from rloss.caffe.solver import (  # noqa: E402, F401
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    Solver,
    get_solver,
)
