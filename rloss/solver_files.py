"""The files of a solver: the solver prototxt itself and the nets, models and outputs it names, found
as rloss.paths describes, with `${VAR}`s expanded once (rloss.variables), and the nets built with
Caffe's state rules."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

from rloss.errors import SolverError, WeightsError
from rloss.lr_policy import check_policy
from rloss.net import Net
from rloss.paths import anchors_of, resolve_net_file, resolve_net_paths, resolve_output_prefix
from rloss.proto import caffe_pb2
from rloss.proto.netstate import filter_net
from rloss.proto.text import read_net, read_solver
from rloss.variables import variable_values

log = logging.getLogger("rloss")
TRAIN_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param")


class SolverFiles:
    """A solver's parameters (checked) and where its files are: `source` names it in messages,
    `anchors` are the folders its relative paths may be relative to."""

    def __init__(self, solver: str | Path | caffe_pb2.SolverParameter, values: Mapping[str, str] | None = None,
                 environ: Mapping[str, str] | None = None):
        self.source = "<SolverParameter>" if isinstance(solver, caffe_pb2.SolverParameter) else str(solver)
        self.file = None if isinstance(solver, caffe_pb2.SolverParameter) else Path(solver)
        self.values, self.defaults = variable_values(values or {}, self.file, environ)
        self.param = self._read_param(solver)
        self.anchors = anchors_of(self.file)
        self._check_param()

    def _read_param(self, solver):
        """The SolverParameter itself, or read from its (resolved) file."""
        if isinstance(solver, caffe_pb2.SolverParameter):
            return solver
        path = resolve_net_file(solver, [], self.values, self.defaults)
        if not path.exists():
            raise SolverError(f"solver file '{solver}' does not exist (working directory {os.getcwd()})")
        if path != Path(solver):
            log.info("Using %s for %s", path, solver)
        self.file = path
        return read_solver(path, self.values, self.defaults)

    def _check_param(self) -> None:
        """Caffe's checks of the settings rloss relies on."""
        p = self.param
        if p.average_loss < 1:
            raise SolverError(f"{self.source}: average_loss must be >= 1, got {p.average_loss}")
        if p.iter_size < 1:
            raise SolverError(f"{self.source}: iter_size must be >= 1, got {p.iter_size}")
        if p.regularization_type not in ("L1", "L2"):
            raise SolverError(f"{self.source}: unknown regularization_type '{p.regularization_type}' (L1 or L2)")
        if p.snapshot > 0 and not p.snapshot_prefix:
            raise SolverError(f"{self.source}: snapshot is {p.snapshot} but snapshot_prefix is not set")
        try:
            check_policy(p)
        except SolverError as error:
            raise SolverError(f"{self.source}: {error}") from None

    def snapshot_prefix(self) -> str:
        """The prefix snapshot names start with (resolved, directory created), after a write probe."""
        p = self.param
        if not p.snapshot_prefix:
            return ""
        prefix = str(resolve_output_prefix(p.snapshot_prefix, self.anchors))
        if p.snapshot > 0:
            probe = Path(f"{prefix}_iter_{0}.tempfile")
            try:
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as error:
                raise SolverError(f"cannot write to snapshot prefix '{prefix}' ({error.strerror or error}); "
                                  "make sure that directory exists and is writable") from None
        return prefix

    def train_net(self) -> Net:
        """The one train net the solver names (file or inline), for TRAIN with train_state."""
        p = self.param
        given = [name for name in TRAIN_NET_FIELDS if p.HasField(name)]
        if len(given) != 1:
            what = "no" if not given else f"{len(given)} ({', '.join(given)})"
            raise SolverError(f"{self.source}: the solver names {what} train net; give exactly one of "
                              f"{', '.join(TRAIN_NET_FIELDS)}")
        field = given[0]
        if field.endswith("_param"):
            log.info("Creating training net specified in %s.", field)
            return build_net(self._located(getattr(p, field)), caffe_pb2.TRAIN, p.train_state,
                             f"{self.source} ({field})")
        path = self._net_file(getattr(p, field))
        log.info("Creating training net from %s file: %s", field, path)
        return build_net(self._read_net(path), caffe_pb2.TRAIN, p.train_state, str(path))

    def test_nets(self) -> list[Net]:
        """Caffe's InitTestNets: test_net_param entries, test_net files, then the generic net once per
        remaining test_iter, each with its test_state."""
        p = self.param
        generic = p.HasField("net") or p.HasField("net_param")
        specific = len(p.test_net_param) + len(p.test_net)
        if (generic and len(p.test_iter) < specific) or (not generic and len(p.test_iter) != specific):
            raise SolverError(f"{self.source}: {len(p.test_iter)} test_iter values for {specific} test nets"
                              f"{' (plus the generic net)' if generic else ''}: give one test_iter per test net")
        count = len(p.test_iter) if generic else specific
        if len(p.test_state) and len(p.test_state) != count:
            raise SolverError(f"{self.source}: {len(p.test_state)} test_state entries for {count} test nets")
        if count and p.test_interval <= 0:
            log.info("test_interval is 0: the test nets run only after training")
        sources: list[tuple[object, str]] = []
        sources += [(net, f"{self.source} (test_net_param)") for net in p.test_net_param]
        sources += [(self._net_file(name), name) for name in p.test_net]
        while len(sources) < count:
            sources.append((p.net_param, f"{self.source} (net_param)") if p.HasField("net_param")
                           else (self._net_file(p.net), p.net))
        nets = []
        for index, (source, name) in enumerate(sources):
            state = p.test_state[index] if len(p.test_state) else caffe_pb2.NetState()
            net_param = self._read_net(source) if isinstance(source, Path) else self._located(source)
            log.info("Creating test net (#%d) specified by %s", index, name)
            nets.append(build_net(net_param, caffe_pb2.TEST, state, str(source) if isinstance(source, Path) else name))
        return nets

    def _net_file(self, name: str) -> Path:
        path = resolve_net_file(name, self.anchors, self.values, self.defaults)
        if not path.exists():
            raise SolverError(f"{self.source}: net file '{name}' does not exist (looked in {os.getcwd()} and in "
                              f"the folders above {self.file}, and for its template)")
        return path

    def _read_net(self, path: Path):
        return self._located(read_net(path, values=self.values, defaults=self.defaults))

    def _located(self, net_param):
        return located(net_param, self.anchors)


def located(net_param, anchors) -> caffe_pb2.NetParameter:
    """A copy of the net with its relative input paths found under `anchors` as rloss.paths
    describes, each change logged."""
    copy = caffe_pb2.NetParameter()
    copy.CopyFrom(net_param)
    for written, used in resolve_net_paths(copy, anchors):
        log.info("Using %s for %s", used, written)
    return copy


def build_net(net_param, phase: int, solver_state, source: str) -> Net:
    """A Net for `phase` with Caffe's state rule: phase, then the file's state, then the solver's."""
    state = caffe_pb2.NetState(phase=phase)
    state.MergeFrom(net_param.state)
    state.MergeFrom(solver_state)
    filtered = filter_net(net_param, state)
    filtered.state.CopyFrom(state)
    return Net(filtered, state.phase, source=source)


def learned_net(name: str, state_file: Path) -> Path:
    """The model a solver state names: as written (relative to the working directory), else beside
    the state file."""
    candidates = [Path(name), state_file.parent / name, state_file.parent / Path(name).name]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise WeightsError(f"{state_file}: its learned_net '{name}' does not exist (tried {tried})")
