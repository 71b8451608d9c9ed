"""pycaffe's solver classes over rloss.solver: `caffe.SGDSolver(file)`, `NesterovSolver`, `AdaGradSolver`,
`RMSPropSolver`, `AdaDeltaSolver`, `AdamSolver` (each that type whatever the file's `type` says, as the
C++ classes are), and `caffe.get_solver(file)` (the file's type)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Mapping, Union

from rloss.caffe import Net, current_device
from rloss.proto import caffe_pb2
from rloss.solver import Solver as _Solver


class Solver:
    """pycaffe's `caffe.Solver`: Caffe's solver (rloss.solver) on the device of set_mode_cpu/set_mode_gpu,
    `${VAR}`s as for `Net`. `net` and `test_nets` are `Net`s over the solver's own nets, so after
    `step(n)` their blobs hold the last iteration's data and diffs (the weights already updated, each
    parameter diff holding the step taken). `precision` and `checkpoint_activations` go to
    rloss.solver.Solver."""

    type_name: ClassVar[str | None] = None  # None: the solver file's type

    def __init__(self, solver_file: Union[str, Path], values: Mapping[str, str] | None = None,
                 precision: str = "fp32", checkpoint_activations: bool = False):
        self._attach(_Solver(str(solver_file), values=values, device=current_device(), precision=precision,
                             checkpoint_activations=checkpoint_activations, type_name=self.type_name))

    def _attach(self, solver: _Solver) -> None:
        self._solver = solver
        self.net = Net._wrap(solver.net)
        self.test_nets = [Net._wrap(net) for net in solver.test_nets]

    def _push_host_writes(self) -> None:
        """Writes into the nets' host arrays (copies of CUDA or reduced-precision tensors) reach the
        tensors before the solver runs them."""
        for net in [self.net, *self.test_nets]:
            net._push_host_writes()

    @property
    def iter(self) -> int:
        return self._solver.iter

    @property
    def param(self) -> caffe_pb2.SolverParameter:
        return self._solver.param

    @property
    def type(self) -> str:
        return self._solver.rule.type_name

    @property
    def lr(self) -> float:
        """The learning rate of the current iteration (SGDSolver.GetLearningRate)."""
        return float(self._solver.lr(self._solver.iter))

    def step(self, iterations: int) -> None:
        """`iterations` training iterations (forward, backward, update), with Caffe's display and tests."""
        self._push_host_writes()
        self._solver.step(int(iterations))

    def solve(self, resume_file: Union[str, Path, None] = None) -> None:
        """Train to max_iter (resuming from a .solverstate if given), then snapshot and test as Caffe does."""
        self._push_host_writes()
        self._solver.solve(str(resume_file) if resume_file else None)

    def restore(self, state_file: Union[str, Path]) -> None:
        self._push_host_writes()
        self._solver.restore(str(state_file))

    def snapshot(self) -> None:
        """Write `<snapshot_prefix>_iter_<iter>.caffemodel` and `.solverstate`."""
        self._push_host_writes()
        self._solver.snapshot()

    def apply_update(self) -> None:
        """One update from the diffs the net holds now (Caffe's ApplyUpdate; `iter` is not advanced)."""
        self._push_host_writes()
        self._solver.apply_update()

    def add_callback(self, on_start: Callable[[], None], on_gradients_ready: Callable[[], None]) -> None:
        """Call `on_start()` at the start of each iteration and `on_gradients_ready()` after its backward,
        before the update."""
        self._solver.callbacks.append((on_start, on_gradients_ready))

    def share_weights(self, net: Net) -> None:
        """Make `net` use the train net's weights."""
        net.share_with(self.net)


class SGDSolver(Solver):
    type_name = "SGD"


class NesterovSolver(Solver):
    type_name = "Nesterov"


class AdaGradSolver(Solver):
    type_name = "AdaGrad"


class RMSPropSolver(Solver):
    type_name = "RMSProp"


class AdaDeltaSolver(Solver):
    type_name = "AdaDelta"


class AdamSolver(Solver):
    type_name = "Adam"


_CLASSES = {cls.type_name: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver,
                                           AdamSolver)}


def get_solver(solver_file: Union[str, Path], values: Mapping[str, str] | None = None) -> Solver:
    """pycaffe's `caffe.get_solver`: the solver of the file's `type` (an instance of its class)."""
    solver = Solver(solver_file, values)
    typed = _CLASSES[solver.type].__new__(_CLASSES[solver.type])
    typed._attach(solver._solver)
    return typed
