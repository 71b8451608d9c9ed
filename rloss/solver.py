"""Caffe's SGD solver: the same iteration loop, update rule, learning-rate schedule, smoothed loss,
log lines and snapshot files as `caffe.bin train`, on a `rloss.net.Net`.

The update is Caffe's, not torch.optim.SGD's: the learning rate is folded into the momentum buffer
(`h = momentum * h + lr * lr_mult * (g / iter_size + decay * decay_mult * w); w -= h`), and `h` is what
the `.solverstate` stores, so snapshots resume Caffe runs and Caffe resumes ours.

Resuming is exact for the weights, the momentum history, `iter` and the lr schedule. Like Caffe, a
snapshot does not record data-layer positions or random-generator states: a resumed run sees the
same batches as an uninterrupted one only when the data order does not depend on them.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from google.protobuf import text_format

from rloss.caffe_log import caffe_float, format_duration
from rloss.errors import SolverError, WeightsError
from rloss.io import read_solver_state, write_message_atomic
from rloss.lr_policy import LearningRate, check_policy
from rloss.net import Net
from rloss.paths import (
    anchors_of,
    resolve_input,
    resolve_net_file,
    resolve_net_paths,
    resolve_output_prefix,
    variable_values,
)
from rloss.proto import caffe_pb2
from rloss.proto.blob import array_to_blob, blob_shape, blob_to_array
from rloss.proto.netstate import filter_net
from rloss.proto.text import read_net, read_solver

log = logging.getLogger("rloss")
f32 = np.float32
EFFECTS = ("stop", "snapshot", "none")
TRAIN_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param")


class SGDSolver:
    """`caffe.SGDSolver`: build the train (and test) nets from a solver file and train them.

    `solver` is a path or a SolverParameter; `values` are explicit `${VAR}` values (`--set`), taken
    before the environment and the run script's defaults (rloss.paths); `device` overrides
    `solver_mode`/`device_id`; the signal effects are those of caffe.bin's --sigint_effect and
    --sighup_effect ("stop", "snapshot" or "none"), active during `solve()`.
    """

    def __init__(
        self,
        solver: str | Path | caffe_pb2.SolverParameter,
        values: Mapping[str, str] | None = None,
        device: str | torch.device | None = None,
        sigint_effect: str = "stop",
        sighup_effect: str = "snapshot",
        environ: Mapping[str, str] | None = None,
    ):
        for flag, effect in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect)):
            if effect not in EFFECTS:
                raise SolverError(f"--{flag}={effect}: expected one of {', '.join(EFFECTS)}")
        self.effects = {"SIGINT": sigint_effect, "SIGHUP": sighup_effect}
        self.source = "<SolverParameter>" if isinstance(solver, caffe_pb2.SolverParameter) else str(solver)
        self.file = None if isinstance(solver, caffe_pb2.SolverParameter) else Path(solver)
        self.values, self.defaults = variable_values(values or {}, self.file, environ)
        self.anchors = anchors_of(self.file)
        self.param = self._read_param(solver)
        self._check_param()
        log.info("Initializing solver from parameters: \n%s", text_format.MessageToString(self.param))
        self.snapshot_prefix = self._snapshot_prefix()
        if self.param.random_seed >= 0:
            seed_everything(self.param.random_seed)
        self.device = torch.device(device) if device is not None else solver_device(self.param)
        self.net = self._train_net().to(self.device)
        self.test_nets = [net.to(self.device) for net in self._test_nets()]
        self.iter = 0
        self.lr = LearningRate(self.param)
        self.history = [torch.zeros_like(p.tensor, memory_format=torch.contiguous_format)
                        for p in self.net.learnable]
        self._history_nonzero = [False] * len(self.history)
        self.smoothed_loss = 0.0
        self._start_iter = 0
        self._losses: list[np.float32] = []
        self.requested_early_exit = False
        self._pending: list[str] = []
        log.info("Solver scaffolding done.")

    # ---- construction -----------------------------------------------------------------------------
    def _read_param(self, solver):
        if isinstance(solver, caffe_pb2.SolverParameter):
            return solver
        path = resolve_net_file(solver, [], self.values, self.defaults)
        if not path.exists():
            raise SolverError(f"solver file '{solver}' does not exist (working directory {os.getcwd()})")
        if path != Path(solver):
            log.info("Using %s for %s", path, solver)
        self.file = path
        self.anchors = anchors_of(path)
        return read_solver(path, self.values, self.defaults)

    def _check_param(self) -> None:
        p = self.param
        if p.type != "SGD":
            raise SolverError(f"{self.source}: solver type '{p.type}' is not supported; rloss implements SGD")
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

    def _snapshot_prefix(self) -> str:
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

    def _train_net(self) -> Net:
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

    def _test_nets(self) -> list[Net]:
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
        """A copy of the net with its relative input paths found as rloss.paths describes."""
        located = caffe_pb2.NetParameter()
        located.CopyFrom(net_param)
        for written, used in resolve_net_paths(located, self.anchors):
            log.info("Using %s for %s", used, written)
        return located

    # ---- weights ----------------------------------------------------------------------------------
    def copy_weights(self, weights: str) -> None:
        """caffe.bin's --weights: each comma-separated model is copied into the train and test nets."""
        for name in filter(None, (w.strip() for w in weights.split(","))):
            path = resolve_input(name, self.anchors)
            log.info("Finetuning from %s", path)
            for net in [self.net, *self.test_nets]:
                net.copy_from(str(path))

    # ---- training ---------------------------------------------------------------------------------
    def solve(self, resume_file: str | Path | None = None) -> None:
        """Caffe's Solve: (restore,) step to max_iter, final snapshot, final display and tests."""
        p = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        with _SignalRequests(self._pending):
            self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (p.snapshot == 0 or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display > 0 and self.iter % p.display == 0:
            with torch.no_grad():
                loss = f32(float(self.net.forward()))
            smoothed = _smooth(self._losses, f32(self.smoothed_loss), loss, self.iter - self._start_iter,
                               p.average_loss)
            self.smoothed_loss = float(smoothed)
            log.info("Iteration %d, loss = %s", self.iter, caffe_float(smoothed))
        if p.test_interval > 0 and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    def step(self, iterations: int) -> None:
        """Caffe's Step: `iterations` updates (fewer if a signal asks to stop)."""
        p = self.param
        start_iter, stop_iter = self.iter, self.iter + iterations
        # the ring of recent losses lives on the solver: Solve's final display pass adds to it
        self._start_iter, self._losses = start_iter, []
        smoothed = f32(0)
        clock = _Progress(self.iter, p.max_iter)
        while self.iter < stop_iter:
            for entry in self.net.learnable:
                entry.tensor.grad = None
            if (p.test_interval > 0 and self.iter % p.test_interval == 0
                    and (self.iter > 0 or p.test_initialization)):
                self.test_all()
                if self.requested_early_exit:
                    break
            display = p.display > 0 and self.iter % p.display == 0
            loss = self._forward_backward()
            smoothed = _smooth(self._losses, smoothed, loss, self.iter - start_iter, p.average_loss)
            self.smoothed_loss = float(smoothed)
            if display:
                log.info("Iteration %d, loss = %s", self.iter, caffe_float(smoothed))
                self._log_outputs(self.net, "Train")
            self.apply_update(display)
            self.iter += 1
            if display:
                clock.report(self.iter)
            action = self._requested_action()
            if (p.snapshot > 0 and self.iter % p.snapshot == 0) or action == "snapshot":
                self.snapshot()
            if action == "stop":
                self.requested_early_exit = True
                break

    def _forward_backward(self) -> np.float32:
        """iter_size forward/backward passes; the gradients add up, the loss is their float mean."""
        iter_size = self.param.iter_size
        total = f32(0)
        for _ in range(iter_size):
            loss = self.net.forward()
            if loss.requires_grad:
                loss.backward()
            total = f32(total + f32(loss.item()))
        mean = f32(total / f32(iter_size))
        if not math.isfinite(float(mean)):
            raise SolverError(f"iteration {self.iter}: the loss is {caffe_float(mean)}; training stopped "
                              f"(the last snapshot written before this iteration is kept; lower base_lr or "
                              f"check the data)")
        return mean

    def _log_outputs(self, net: Net, kind: str) -> None:
        """`    Train net output #k: name = v (* w = w*v loss)` for every element of every output."""
        weights = dict(net.loss_top_names())
        for index, (name, value) in enumerate(output_values(net)):
            log.info("    %s net output #%d: %s = %s%s", kind, index, name, caffe_float(value),
                     loss_suffix(weights.get(name, 0.0), value))

    # ---- the update -------------------------------------------------------------------------------
    def apply_update(self, display: bool = False) -> None:
        """Caffe's ApplyUpdate: clip, /iter_size, + weight decay, momentum with lr folded in, w -= h."""
        p = self.param
        rate = self.lr(self.iter)
        if display:
            log.info("Iteration %d, lr = %s", self.iter, caffe_float(rate))
        self._clip()
        groups: dict[tuple[float, float], list[int]] = {}
        for i, entry in enumerate(self.net.learnable):
            if entry.lr_mult == 0 and not self._history_nonzero[i]:
                continue  # h stays 0 and w unchanged: skip the work (Caffe computes the same zeros)
            decay = float(f32(p.weight_decay) * f32(entry.decay_mult))
            local_rate = float(f32(rate) * f32(entry.lr_mult))
            groups.setdefault((decay, local_rate), []).append(i)
        with torch.no_grad():
            for (decay, local_rate), members in groups.items():
                self._update_group(members, decay, local_rate)

    def _gradient(self, index: int) -> torch.Tensor:
        """A learnable parameter's accumulated diff (zeros where backward left none)."""
        tensor = self.net.learnable[index].tensor
        if tensor.grad is None:
            tensor.grad = torch.zeros_like(tensor)
        return tensor.grad

    def _clip(self) -> None:
        """Scale all diffs down to an L2 norm of clip_gradients (parameters without a diff add 0)."""
        threshold = self.param.clip_gradients
        grads = [e.tensor.grad for e in self.net.learnable if e.tensor.grad is not None]
        if threshold < 0 or not grads:
            return
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        if norm > threshold:
            factor = threshold / norm
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                     caffe_float(norm), caffe_float(threshold), caffe_float(factor))
            torch._foreach_mul_(grads, float(f32(factor)))

    def _update_group(self, members: list[int], decay: float, local_rate: float) -> None:
        """The update of parameters sharing one (decay, rate) pair, with fused multi-tensor ops.
        Afterwards each diff holds the step taken (= h), as Caffe's does."""
        p = self.param
        grads = [self._gradient(i) for i in members]
        weights = [self.net.learnable[i].tensor.data for i in members]
        history = [self.history[i] for i in members]
        if p.iter_size > 1:
            torch._foreach_mul_(grads, float(f32(1) / f32(p.iter_size)))
        if decay != 0:
            if p.regularization_type == "L2":
                torch._foreach_add_(grads, weights, alpha=decay)
            else:
                torch._foreach_add_(grads, [torch.sign(w) for w in weights], alpha=decay)
        torch._foreach_mul_(history, float(f32(p.momentum)))
        torch._foreach_add_(history, grads, alpha=local_rate)
        torch._foreach_copy_(grads, history)
        torch._foreach_sub_(weights, history)
        for i in members:
            self._history_nonzero[i] = True

    # ---- tests ------------------------------------------------------------------------------------
    def test_all(self) -> None:
        for index in range(len(self.test_nets)):
            self.test(index)

    def test(self, index: int) -> None:
        """Caffe's Test: test_iter forwards with the trained weights; the mean of each output element."""
        p = self.param
        net = self.test_nets[index]
        log.info("Iteration %d, Testing net (#%d)", self.iter, index)
        net.share_trained_layers_with(self.net)
        iterations = p.test_iter[index]
        sums: list[np.float32] = []
        names: list[str] = []
        loss = f32(0)
        with torch.no_grad():
            for i in range(iterations):
                action = self._requested_action()
                if action == "snapshot":
                    self.snapshot()
                elif action == "stop":
                    self.requested_early_exit = True
                if self.requested_early_exit:
                    log.info("Test interrupted.")
                    return
                iter_loss = net.forward()
                loss = f32(loss + f32(iter_loss.item()))
                values = output_values(net)
                if i == 0:
                    sums, names = [f32(v) for _, v in values], [name for name, _ in values]
                else:
                    sums = [f32(s + f32(v)) for s, (_, v) in zip(sums, values)]
        if p.test_compute_loss:
            log.info("Test loss: %s", caffe_float(loss / f32(iterations)))
        weights = dict(net.loss_top_names())
        for k, (name, total) in enumerate(zip(names, sums)):
            mean = f32(total / f32(iterations))
            log.info("    Test net output #%d: %s = %s%s", k, name, caffe_float(mean),
                     loss_suffix(weights.get(name, 0.0), mean))

    # ---- signals ----------------------------------------------------------------------------------
    def _requested_action(self) -> str:
        """The effect of the oldest signal received since the last check ("none" if none)."""
        while self._pending:
            effect = self.effects[self._pending.pop(0)]
            if effect != "none":
                return effect
        return "none"

    # ---- snapshots --------------------------------------------------------------------------------
    def snapshot_name(self, extension: str) -> str:
        return f"{self.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self) -> None:
        """Write the model, then the solver state naming it (both atomically)."""
        if self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            model = self.snapshot_name(".caffemodel.h5")
            log.info("Snapshotting to HDF5 file %s", model)
            write_hdf5_model(self.net, model, self.param.snapshot_diff)
            state_file = self.snapshot_name(".solverstate.h5")
            log.info("Snapshotting solver state to HDF5 file %s", state_file)
            write_hdf5_state(self._state(model), state_file)
            return
        model = self.snapshot_name(".caffemodel")
        log.info("Snapshotting to binary proto file %s", model)
        self.net.save(model, with_diff=self.param.snapshot_diff)
        state_file = self.snapshot_name(".solverstate")
        log.info("Snapshotting solver state to binary proto file %s", state_file)
        write_message_atomic(self._state(model), state_file)

    def _state(self, model: str):
        state = caffe_pb2.SolverState(iter=self.iter, learned_net=model, current_step=self.lr.current_step)
        for h in self.history:
            state.history.append(array_to_blob(h.detach().cpu().numpy()))
        return state

    def restore(self, path: str | Path) -> None:
        """Continue from a .solverstate (or .solverstate.h5): iter, lr step, history and the weights
        of its learned_net (looked up as written, else beside the state file)."""
        found = resolve_input(path, self.anchors)
        state = read_solver_state(str(found))
        if len(state.history) != len(self.history):
            raise WeightsError(f"{found}: {len(state.history)} history blobs for the {len(self.history)} "
                               f"learnable parameters of net '{self.net.name}' (a state of another net?)")
        self.iter = state.iter
        if state.HasField("learned_net"):
            self.net.copy_from(str(_learned_net(state.learned_net, found)))
        self.lr.current_step = state.current_step
        for i, (blob, entry) in enumerate(zip(state.history, self.net.learnable)):
            values = blob_to_array(blob, f"{found}: history {i}")
            if values.size != entry.tensor.numel():
                raise WeightsError(f"{found}: history {i} has shape {blob_shape(blob)}, the parameter "
                                   f"{entry.owner} has shape {tuple(entry.tensor.shape)}")
            self.history[i].copy_(torch.from_numpy(values.reshape(tuple(entry.tensor.shape))))
            self._history_nonzero[i] = bool(np.any(values))


# ---- helpers ------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Caffe's set_random_seed: every generator fillers, data layers and dropout draw from."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def solver_device(param) -> torch.device:
    """solver_mode GPU means CUDA device `device_id`, or the CPU (with a warning) without CUDA."""
    if param.solver_mode == caffe_pb2.SolverParameter.GPU:
        return cuda_or_cpu(param.device_id)
    return torch.device("cpu")


def cuda_or_cpu(index: int) -> torch.device:
    if torch.cuda.is_available():
        if index >= torch.cuda.device_count():
            raise SolverError(f"GPU {index} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device("cuda", index)
    log.warning("GPU mode requested but CUDA is not available: running on the CPU")
    return torch.device("cpu")


def build_net(net_param, phase: int, solver_state, source: str) -> Net:
    """A Net for `phase` with Caffe's state rule: phase, then the file's state, then the solver's."""
    state = caffe_pb2.NetState(phase=phase)
    state.MergeFrom(net_param.state)
    state.MergeFrom(solver_state)
    filtered = filter_net(net_param, state)
    filtered.state.CopyFrom(state)
    return Net(filtered, state.phase, source=source)


def _learned_net(name: str, state_file: Path) -> Path:
    """The model a solver state names: as written (relative to the working directory), else beside
    the state file."""
    candidates = [Path(name), state_file.parent / name, state_file.parent / Path(name).name]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise WeightsError(f"{state_file}: its learned_net '{name}' does not exist (tried {tried})")


def _smooth(losses: list, smoothed: np.float32, loss: np.float32, offset: int, average: int) -> np.float32:
    """Caffe's running mean of the last `average` losses (float arithmetic, as in Caffe)."""
    if len(losses) < average:
        losses.append(loss)
        size = len(losses)
        return f32((smoothed * f32(size - 1) + loss) / f32(size))
    index = offset % average
    smoothed = f32(smoothed + (loss - losses[index]) / f32(average))
    losses[index] = loss
    return smoothed


def output_values(net: Net) -> list[tuple[str, float]]:
    """(blob name, value) for every element of every output blob, in Caffe's output order."""
    return [(name, value) for name in net.outputs
            for value in net.blob_data[name].detach().reshape(-1).cpu().tolist()]


def loss_suffix(weight: float, value: float) -> str:
    """` (* w = w*v loss)` after the value of an output that is part of the objective."""
    if not weight:
        return ""
    return f" (* {caffe_float(weight)} = {caffe_float(f32(weight) * f32(value))} loss)"


class _Progress:
    """The extra display line: iterations done, seconds per iteration, estimated time left."""

    def __init__(self, start_iter: int, max_iter: int):
        self.max_iter = max_iter
        self.last_iter, self.last_time = start_iter, time.perf_counter()

    def report(self, done: int) -> None:
        now = time.perf_counter()
        per_iter = (now - self.last_time) / max(1, done - self.last_iter)
        self.last_iter, self.last_time = done, now
        left = format_duration(per_iter * max(0, self.max_iter - done))
        log.info("    Progress: %d/%d iterations, %.3g s/iter, about %s left", done, self.max_iter, per_iter, left)


class _SignalRequests:
    """While active, SIGINT and SIGHUP are queued in `pending` (the solver acts on them between
    iterations); a second SIGINT before the first is handled aborts at once (KeyboardInterrupt)."""

    def __init__(self, pending: list[str]):
        self.pending = pending
        self.previous: dict[int, Callable | int | None] = {}

    def _handler(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and "SIGINT" in self.pending:
            raise KeyboardInterrupt
        self.pending.append(name)

    def __enter__(self) -> _SignalRequests:
        for name in ("SIGINT", "SIGHUP"):
            number = getattr(signal, name, None)
            if number is None:
                continue
            try:
                self.previous[number] = signal.signal(number, self._handler)
            except ValueError:  # not the main thread: signals stay with their current handlers
                break
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def write_hdf5_model(net: Net, path: str, with_diff: bool) -> None:
    """Caffe's HDF5 model: data/<layer>/<i> for every parameter a layer owns (diff/... if asked)."""
    h5py = _h5py()
    owned: set[int] = set()

    def fill(handle) -> None:
        data = handle.create_group("data")
        diff = handle.create_group("diff") if with_diff else None
        for layer in net.layers:
            group = data.require_group(layer.name)
            diff_group = diff.require_group(layer.name) if diff is not None else None
            for j, blob in enumerate(layer.blobs):
                if id(blob) in owned:
                    continue
                owned.add(id(blob))
                group.create_dataset(str(j), data=blob.detach().cpu().numpy())
                if diff_group is not None:
                    grad = blob.grad if blob.grad is not None else torch.zeros_like(blob)
                    diff_group.create_dataset(str(j), data=grad.detach().cpu().numpy())

    _write_h5_atomic(h5py, path, fill)


def write_hdf5_state(state, path: str) -> None:
    """Caffe's HDF5 solver state: iter, learned_net, current_step and history/<i>."""
    h5py = _h5py()

    def fill(handle) -> None:
        handle.create_dataset("iter", data=np.int32(state.iter))
        handle.create_dataset("learned_net", data=state.learned_net.encode())
        handle.create_dataset("current_step", data=np.int32(state.current_step))
        history = handle.create_group("history")
        for i, blob in enumerate(state.history):
            history.create_dataset(str(i), data=blob_to_array(blob, f"history {i}"))

    _write_h5_atomic(h5py, path, fill)


def _h5py():
    try:
        import h5py
    except ImportError:
        raise SolverError("snapshot_format: HDF5 needs the h5py package (pip install h5py), or use "
                          "the default BINARYPROTO") from None
    return h5py


def _write_h5_atomic(h5py, path: str, fill: Callable) -> None:
    temporary = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    try:
        with h5py.File(temporary, "w") as handle:
            fill(handle)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise SolverError(f"cannot write {path}: {error}") from None


def parse_gpu_flag(flag: str) -> torch.device:
    """caffe.bin's --gpu value (device ids or `all`) as the one device rloss runs on. Several devices
    (Caffe's data parallelism) are refused: iter_size gives the same effective batch."""
    if flag == "all":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 1
        ids = list(range(max(1, count)))
    else:
        try:
            ids = [int(part) for part in flag.split(",") if part.strip()]
        except ValueError:
            raise SolverError(f"--gpu={flag}: expected device ids separated by commas, or 'all'") from None
    if len(ids) != 1:
        raise SolverError(f"--gpu={flag}: {len(ids)} devices requested; rloss trains on one device "
                          "(multiply iter_size by the device count for the same effective batch)")
    return cuda_or_cpu(ids[0])

