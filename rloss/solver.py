"""Caffe's solvers: the same iteration loop, update rules, learning-rate schedule, smoothed loss,
log lines and snapshot files as `caffe.bin train`, on a `rloss.net.Net`.

The update is Caffe's, not torch.optim's: the gradient is regularized as Caffe does (`g / iter_size +
decay * decay_mult * w`), then the solver type's rule (rloss.update_rules: SGD, Nesterov, AdaGrad,
RMSProp, AdaDelta, Adam) turns it into the step, with the learning rate folded in where Caffe folds it
(SGD: `h = momentum * h + lr * lr_mult * g; w -= h`); the histories are what the `.solverstate` stores,
laid out as Caffe's, so snapshots resume Caffe runs and Caffe resumes ours.

Resuming is exact: unlike Caffe's, our solver states also record (in rloss's `resume` extension,
which Caffe skips) each data layer's position as of the batches consumed, not those prefetched, and
torch's generators, so a resumed run equals an uninterrupted one bit for bit on the CPU, with shuffle,
mirror, crops and dropout. A state written by Caffe restores the weights, history, `iter` and lr
schedule, and the data order restarts from the beginning, as in Caffe.
"""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from google.protobuf import text_format

from rloss.caffe_log import caffe_float, loss_suffix
from rloss.data_parallel import Ranked, generators_now, restore_generators
from rloss.device import seed_everything, solver_device
from rloss.distributed import joined_ranks
from rloss.errors import SolverError, WeightsError
from rloss.io import read_solver_state, write_hdf5_state, write_message_atomic
from rloss.lr_policy import LearningRate
from rloss.memory import check_training_memory
from rloss.net import Net
from rloss.paths import resolve_input
from rloss.precision import LossScaler, check_precision
from rloss.progress import Progress
from rloss.proto import caffe_pb2
from rloss.proto.blob import array_to_blob, blob_shape, blob_to_array
from rloss.scoring import output_values, score
from rloss.solver_files import SolverFiles, learned_net
from rloss.update_rules import update_rule

log = logging.getLogger("rloss")
f32 = np.float32
EFFECTS = ("stop", "snapshot", "none")


class Solver:
    """caffe.bin's solver: build the train (and test) nets from a solver file and train them.

    `solver` is a path or a SolverParameter; `values` are explicit `${VAR}` values (`--set`), taken
    before the environment and the run script's defaults (rloss.paths); `device` overrides
    `solver_mode`/`device_id`; `type_name` overrides the file's solver `type` (pycaffe's `caffe.AdamSolver(file)`
    is an Adam solver whatever the file says); `precision` ("fp32", "bf16", "fp16") is the nets' autocast (weights,
    history and snapshots stay float32) and `checkpoint_activations` recomputes the train net's
    activations in backward instead of keeping them; the signal effects are those of caffe.bin's --sigint_effect (also
    SIGTERM's, as clusters stop jobs with it) and --sighup_effect ("stop", "snapshot" or "none"),
    active during `solve()`. In a torch.distributed job (torchrun, `--gpu=0,1`) the solver is one
    data-parallel rank (rloss.data_parallel): every rank must make the same calls.
    """

    def __init__(
        self,
        solver: str | Path | caffe_pb2.SolverParameter,
        values: Mapping[str, str] | None = None,
        device: str | torch.device | None = None,
        sigint_effect: str = "stop",
        sighup_effect: str = "snapshot",
        environ: Mapping[str, str] | None = None,
        precision: str = "fp32",
        checkpoint_activations: bool = False,
        type_name: str | None = None,
    ):
        for flag, effect in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect)):
            if effect not in EFFECTS:
                raise SolverError(f"--{flag}={effect}: expected one of {', '.join(EFFECTS)}")
        self.effects = {"SIGINT": sigint_effect, "SIGHUP": sighup_effect, "SIGTERM": sigint_effect}
        self.files = SolverFiles(solver, values, environ)
        self.param = self.files.param
        self.rule = update_rule(self.param, self.files.source, type_name)
        log.info("Initializing solver from parameters: \n%s", text_format.MessageToString(self.param))
        ranks = joined_ranks()
        self.device = torch.device(device) if device is not None else solver_device(self.param, ranks.local_rank)
        check_precision(precision, self.device)
        self.ranked = Ranked(ranks, self.device)
        self.snapshot_prefix = self.files.snapshot_prefix() if ranks.is_root else ""
        seed = self.ranked.common_seed(self.param.random_seed)
        if seed >= 0:
            seed_everything(seed)
        self.net = self.files.train_net().to(self.device)
        self.test_nets = [net.to(self.device) for net in self.files.test_nets()] if ranks.is_root else []
        for net in [self.net, *self.test_nets]:
            net.precision = precision
        self.net.checkpoint_activations = checkpoint_activations
        self.scaler = LossScaler.for_precision(precision)
        check_training_memory(self.net, self.device, iter_size=self.param.iter_size,
                              ranks_per_host=ranks.local_size if self.device.type == "cpu" else 1)
        self.ranked.prepare(self.net)
        self.iter = 0
        self.lr = LearningRate(self.param)
        self.history = [torch.zeros_like(p.tensor, memory_format=torch.contiguous_format)
                        for _ in range(self.rule.history_sets) for p in self.net.learnable]
        self._history_nonzero = [False] * len(self.net.learnable)
        self.smoothed_loss = 0.0
        self._start_iter = 0
        self._losses: list[np.float32] = []
        self.requested_early_exit = False
        self._gradients_finite = True
        self._pending: list[str] = []
        self.callbacks: list[tuple[Callable[[], None], Callable[[], None]]] = []  # pycaffe's add_callback
        self.last_snapshot = ""  # the newest model this run wrote or resumed from (all its weights finite)
        log.info("Solver scaffolding done.")

    # ---- weights ----------------------------------------------------------------------------------
    def copy_weights(self, weights: str) -> None:
        """caffe.bin's --weights: each comma-separated model is copied into the train and test nets."""
        for name in filter(None, (w.strip() for w in weights.split(","))):
            path = resolve_input(name, self.files.anchors)
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
            self.last_snapshot = str(resume_file)
        with _SignalRequests(self._pending):
            self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (p.snapshot == 0 or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display > 0 and self.iter % p.display == 0:
            with torch.no_grad():
                loss = self.ranked.mean_loss(f32(float(self.net.forward())))
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
        clock = Progress(p.max_iter, "iterations", done=self.iter)
        self.ranked.share_root_values([*self.net.parameters(), *self.history])
        while self.iter < stop_iter:
            for entry in self.net.learnable:
                entry.tensor.grad = None
            if (p.test_interval > 0 and self.iter % p.test_interval == 0
                    and (self.iter > 0 or p.test_initialization)):
                self.test_all()
                if self.requested_early_exit:
                    break
            for on_start, _ in self.callbacks:
                on_start()
            display = p.display > 0 and self.iter % p.display == 0
            loss = self.ranked.mean_loss(self._forward_backward())
            self._check_loss_finite(loss)
            smoothed = _smooth(self._losses, smoothed, loss, self.iter - start_iter, p.average_loss)
            self.smoothed_loss = float(smoothed)
            if display:
                log.info("Iteration %d, loss = %s", self.iter, caffe_float(smoothed))
                self._log_outputs(self.net, "Train")
            for _, on_gradients_ready in self.callbacks:
                on_gradients_ready()
            if self._gradients_finite:
                self.apply_update(display)
            else:
                scale = self.scaler.value
                log.info("Iteration %d: fp16 gradients overflowed (loss scale %s): update skipped, scale now %s",
                         self.iter, caffe_float(scale), caffe_float(scale * self.scaler.backoff))
            self.scaler.update(self._gradients_finite)
            self._check_weights_finite("the update of iteration", self.iter)
            self.iter += 1
            clock.advance()
            if display:
                log.info("    Progress: %s", clock.status())
            action = self.ranked.agreed_action(self._requested_action())
            if (p.snapshot > 0 and self.iter % p.snapshot == 0) or action == "snapshot":
                self.snapshot()
            if action == "stop":
                self.requested_early_exit = True
                break

    def _forward_backward(self) -> np.float32:
        """iter_size forward/backward passes; the gradients add up (then are averaged over the
        ranks, and unscaled for fp16: `_gradients_finite` says whether they overflowed), the loss
        is their float mean."""
        iter_size = self.param.iter_size
        total = f32(0)
        for _ in range(iter_size):
            loss = self.net.forward()
            if loss.requires_grad:
                self.scaler.scale(loss).backward()
            total = f32(total + f32(loss.item()))
        gradients = [self._gradient(i) for i, entry in enumerate(self.net.learnable) if entry.tensor.requires_grad]
        self.ranked.average_gradients(gradients)
        self._gradients_finite = self.scaler.unscale(gradients)
        return f32(total / f32(iter_size))

    def _check_loss_finite(self, loss: np.float32) -> None:
        if not math.isfinite(float(loss)):
            raise SolverError(f"iteration {self.iter}: the loss is {caffe_float(loss)}; training stopped; "
                              f"{self._kept()}; lower base_lr or check the data")

    def _check_weights_finite(self, what: str, iteration: int) -> None:
        """Stop, before anything is written, when a learnable parameter holds inf or nan."""
        tensors = [entry.tensor.detach() for entry in self.net.learnable]
        if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            return
        bad = next(entry for entry in self.net.learnable if not bool(torch.isfinite(entry.tensor.detach()).all()))
        raise SolverError(f"{what} {iteration} made the parameter {bad.owner} non-finite (inf or nan); "
                          f"training stopped and nothing was written; {self._kept()}; lower base_lr, "
                          "set clip_gradients or check the data")

    def _kept(self) -> str:
        if self.last_snapshot:
            return f"the last snapshot with finite weights is {self.last_snapshot}"
        return "no snapshot with finite weights was written in this run"

    def _log_outputs(self, net: Net, kind: str) -> None:
        """`    Train net output #k: name = v (* w = w*v loss)` for every element of every output."""
        weights = dict(net.loss_top_names())
        for index, (name, value) in enumerate(output_values(net)):
            log.info("    %s net output #%d: %s = %s%s", kind, index, name, caffe_float(value),
                     loss_suffix(weights.get(name, 0.0), value))

    # ---- the update -------------------------------------------------------------------------------
    def apply_update(self, display: bool = False) -> None:
        """Caffe's ApplyUpdate: clip, /iter_size, + weight decay, the type's rule, w -= step."""
        p = self.param
        rate = self.lr(self.iter)
        if display:
            log.info("Iteration %d, lr = %s", self.iter, caffe_float(rate))
        self._clip()
        groups: dict[tuple[float, float], list[int]] = {}
        for i, entry in enumerate(self.net.learnable):
            if entry.lr_mult == 0 and self.rule.idle_at_zero_rate and not self._history_nonzero[i]:
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
        Afterwards each diff holds the step taken, as Caffe's does."""
        p = self.param
        grads = [self._gradient(i) for i in members]
        weights = [self.net.learnable[i].tensor.data for i in members]
        count = len(self.net.learnable)
        history = [[self.history[s * count + i] for i in members] for s in range(self.rule.history_sets)]
        if p.iter_size > 1:
            torch._foreach_mul_(grads, float(f32(1) / f32(p.iter_size)))
        if decay != 0:
            if p.regularization_type == "L2":
                torch._foreach_add_(grads, weights, alpha=decay)
            else:
                torch._foreach_add_(grads, [torch.sign(w) for w in weights], alpha=decay)
        self.rule.step(grads, history, local_rate, self.iter)
        torch._foreach_sub_(weights, grads)
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
        scores = score(net, p.test_iter[index], stop=self._test_interrupted)
        if scores is None:
            log.info("Test interrupted.")
            return
        if p.test_compute_loss:
            log.info("Test loss: %s", caffe_float(scores.mean_loss()))
        weights = dict(net.loss_top_names())
        for k, (name, mean) in enumerate(scores.means()):
            log.info("    Test net output #%d: %s = %s%s", k, name, caffe_float(mean),
                     loss_suffix(weights.get(name, 0.0), mean))

    def _test_interrupted(self) -> bool:
        """Act on a signal between test passes: snapshot, or stop the test and training. On several
        ranks the signal waits for the end of the iteration, where all ranks act on it together."""
        if self.ranked.parallel:
            return False
        action = self._requested_action()
        if action == "snapshot":
            self.snapshot()
        elif action == "stop":
            self.requested_early_exit = True
        return self.requested_early_exit

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
        """Write the model, then the solver state naming it (both atomically); never non-finite weights.
        On several ranks every rank calls it (their generators are gathered) and rank 0 writes."""
        self._check_weights_finite("snapshot at iteration", self.iter)
        generators = self.ranked.generator_states(generators_now(self.device))
        if self.ranked.is_root:
            self.last_snapshot = self._write_snapshot(generators)

    def _write_snapshot(self, generators: list) -> str:
        """The model and solver state files of this iteration; returns the model's name."""
        if self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            model = self.snapshot_name(".caffemodel.h5")
            log.info("Snapshotting to HDF5 file %s", model)
            self.net.save_hdf5(model, with_diff=self.param.snapshot_diff)
            state_file = self.snapshot_name(".solverstate.h5")
            log.info("Snapshotting solver state to HDF5 file %s", state_file)
            write_hdf5_state(self._state(model, generators), state_file)
            return model
        model = self.snapshot_name(".caffemodel")
        log.info("Snapshotting to binary proto file %s", model)
        self.net.save(model, with_diff=self.param.snapshot_diff)
        state_file = self.snapshot_name(".solverstate")
        log.info("Snapshotting solver state to binary proto file %s", state_file)
        write_message_atomic(self._state(model, generators), state_file)
        return model

    def _state(self, model: str, generators: list):
        """Caffe's SolverState plus the `resume` extension: data positions and every rank's torch
        generators."""
        state = caffe_pb2.SolverState(iter=self.iter, learned_net=model, current_step=self.lr.current_step)
        for h in self.history:
            state.history.append(array_to_blob(h.detach().cpu().numpy()))
        resume = state.resume
        resume.torch_random.CopyFrom(generators[0])
        resume.other_ranks_torch_random.extend(generators[1:])
        if self.scaler.enabled:
            scale = self.scaler.state_dict()
            resume.loss_scale, resume.loss_scale_finite_steps = scale["scale"], int(scale["finite_steps"])
        resume.train_data.extend(self.net.data_states())
        for net in self.test_nets:
            resume.test_net.add().data_layer.extend(net.data_states())
        return state

    def restore(self, path: str | Path) -> None:
        """Continue from a .solverstate (or .solverstate.h5): iter, lr step, history and the weights
        of its learned_net (looked up as written, else beside the state file), then the data positions
        and torch's generators when the state has them (the generators last: loading draws nothing)."""
        found = resolve_input(path, self.files.anchors)
        state = read_solver_state(str(found))
        if len(state.history) != len(self.history):
            sets = self.rule.history_sets
            raise WeightsError(f"{found}: {len(state.history)} history blobs; a {self.rule.type_name} solver keeps "
                               f"{sets} per learnable parameter, {len(self.history)} for the "
                               f"{len(self.net.learnable)} of net '{self.net.name}' (a state of another net or "
                               f"solver type?)")
        self.iter = state.iter
        if state.HasField("learned_net"):
            try:
                model = learned_net(state.learned_net, found)
            except OSError as error:  # a name the OS refuses to look up (too long)
                raise WeightsError(f"{found}: its learned_net '{state.learned_net}' cannot be looked up: "
                                   f"{error.strerror or error}") from None
            if model.is_dir():  # an empty or corrupt name: the message must say whose
                raise WeightsError(f"{found}: its learned_net '{state.learned_net}' is a directory ({model}), not a "
                                   "model file")
            self.net.copy_from(str(model))
        self.lr.current_step = state.current_step
        count = len(self.net.learnable)
        self._history_nonzero = [False] * count
        for i, blob in enumerate(state.history):
            entry = self.net.learnable[i % count]
            values = blob_to_array(blob, f"{found}: history {i}")
            if values.size != entry.tensor.numel():
                raise WeightsError(f"{found}: history {i} has shape {blob_shape(blob)}, the parameter "
                                   f"{entry.owner} has shape {tuple(entry.tensor.shape)}")
            self.history[i].copy_(torch.from_numpy(values.reshape(tuple(entry.tensor.shape))))
            self._history_nonzero[i % count] |= bool(np.any(values))
        if not state.HasField("resume"):
            log.info("%s has no data positions or generator states (a Caffe state): the data order restarts "
                     "from the beginning, as in Caffe", found)
            return
        resume = state.resume
        if self.scaler.enabled and resume.HasField("loss_scale"):
            self.scaler.load_state_dict({"scale": resume.loss_scale, "finite_steps": resume.loss_scale_finite_steps})
        self.net.load_data_states(resume.train_data, str(found))
        if len(resume.test_net) != len(self.test_nets):
            log.warning("%s holds data states for %d test nets, the solver has %d: the others start from the "
                        "beginning", found, len(resume.test_net), len(self.test_nets))
        for net, saved in zip(self.test_nets, resume.test_net):
            net.load_data_states(saved.data_layer, str(found))
        own = self.ranked.own_generator_state(resume, str(found))
        restore_generators(own if own is not None else resume.torch_random, self.device, str(found))
        if own is None:
            self.ranked.seed_missing_generators(resume.torch_random)


# ---- helpers ------------------------------------------------------------------------------------------

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
        for name in ("SIGINT", "SIGHUP", "SIGTERM"):
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
