"""`python -m rloss time` (caffe.bin time: average forward and backward milliseconds per layer, then
rloss's memory lines: per layer the bytes of its tops and of what autograd saves for its backward,
and the peak of a forward-backward) and `device_query`."""

from __future__ import annotations

import argparse
import logging
import time

import torch

from rloss.caffe_log import caffe_float, caffe_number
from rloss.cli.common import load_model
from rloss.memory import MemoryProbe, lattice_bytes
from rloss.net import Net
from rloss.proto import caffe_pb2

log = logging.getLogger("rloss")


class LayerTimer:
    """Per-layer forward and backward wall time through module and tensor hooks.

    Forward: between a layer's forward pre-hook and forward hook. Backward: from the moment autograd
    reaches the first of the layer's outputs to the moment the last of its inputs' (or parameters')
    gradients is ready; autograd runs later layers' nodes first, so these windows do not overlap."""

    def __init__(self, net: Net):
        self.net = net
        self.names = [layer.name for layer in net.layers]
        count = len(self.names)
        self.forward_ms = [0.0] * count
        self.backward_ms = [0.0] * count
        self._start = [0.0] * count
        self._events: list[dict[str, list[float]]] = []
        self._param_stamps: list = []
        self._handles = []
        for index, layer in enumerate(net.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(index)))
            self._handles.append(layer.register_forward_hook(self._post_hook(index)))

    def _pre_hook(self, index: int):
        def hook(module, inputs):
            self._start[index] = time.perf_counter()
        return hook

    def _post_hook(self, index: int):
        def hook(module, inputs, outputs):
            self.forward_ms[index] += (time.perf_counter() - self._start[index]) * 1e3
            if torch.is_grad_enabled():
                self._watch_backward(index, module, inputs, outputs)
        return hook

    def _watch_backward(self, index: int, module, inputs, outputs) -> None:
        events = self._events[index]

        def stamp(kind: str):
            def hook(grad):
                events[kind].append(time.perf_counter())
            return hook

        for tensor in outputs:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(stamp("start"))
        for tensor in inputs:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad and tensor.grad_fn is not None:
                tensor.register_hook(stamp("end"))
        for param in module.blobs:
            if param.requires_grad:
                self._param_stamps.append(param.register_post_accumulate_grad_hook(
                    lambda p, e=events: e["end"].append(time.perf_counter())))

    def begin_iteration(self) -> None:
        self._events = [{"start": [], "end": []} for _ in self.names]
        self._param_stamps = []

    def end_iteration(self) -> None:
        for index, events in enumerate(self._events):
            if events["start"] and events["end"]:
                self.backward_ms[index] += max(0.0, (max(events["end"]) - min(events["start"])) * 1e3)
        for handle in self._param_stamps:
            handle.remove()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def objective(net: Net, loss: torch.Tensor) -> torch.Tensor | None:
    """What to back-propagate: the loss, or for a net without one, zero times its outputs (Caffe's
    time command runs Backward with zero top diffs)."""
    if loss.requires_grad:
        return loss
    outputs = [net.blob_data[name] for name in net.outputs if net.blob_data[name].requires_grad]
    return sum(output.sum() * 0 for output in outputs) if outputs else None


def time_command(args: argparse.Namespace) -> None:
    """caffe.bin time: forward and backward of the TRAIN-phase net, averaged per layer."""
    net = load_model(args, caffe_pb2.TRAIN)
    log.info("Performing Forward")
    loss = net.forward()
    log.info("Initial loss: %s", caffe_float(loss.item()))
    log.info("Performing Backward")
    target = objective(net, loss)
    if target is not None:
        target.backward()
    timer = LayerTimer(net)
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", args.iterations)
    forward_total = backward_total = 0.0
    begin = time.perf_counter()
    for j in range(args.iterations):
        for tensor in net.learnable_tensors():
            tensor.grad = None
        timer.begin_iteration()
        start = time.perf_counter()
        loss = net.forward()
        middle = time.perf_counter()
        target = objective(net, loss)
        if target is not None:
            target.backward()
        end = time.perf_counter()
        timer.end_iteration()
        forward_total += (middle - start) * 1e3
        backward_total += (end - middle) * 1e3
        log.info("Iteration: %d forward-backward time: %s ms.", j + 1, caffe_number((end - start) * 1e3))
    total = (time.perf_counter() - begin) * 1e3
    timer.close()
    count = max(1, args.iterations)
    log.info("Average time per layer: ")
    for index, name in enumerate(timer.names):
        log.info("%10s\tforward: %s ms.", name, caffe_number(timer.forward_ms[index] / count))
        log.info("%10s\tbackward: %s ms.", name, caffe_number(timer.backward_ms[index] / count))
    log.info("Average Forward pass: %s ms.", caffe_number(forward_total / count))
    log.info("Average Backward pass: %s ms.", caffe_number(backward_total / count))
    log.info("Average Forward-Backward: %s ms.", caffe_number(total / count))
    log.info("Total Time: %s ms.", caffe_number(total))
    log.info("*** Benchmark ends ***")
    log_memory(net)


def megabytes(count: int) -> str:
    return caffe_number(count / 2**20)


def log_memory(net: Net) -> None:
    """Memory of a forward-backward as the timed loop runs it (the second of two passes runs beside
    the blobs the first left in the net): per layer the bytes of its tops and of the tensors autograd
    saves for its backward, each storage counted once; the peak, measured as the log line says."""
    for tensor in net.learnable_tensors():
        tensor.grad = None

    def step() -> None:
        target = objective(net, net.forward())
        if target is not None:
            target.backward()

    probe = MemoryProbe(net).run(step)
    log.info("Memory per layer (MB; tops, and tensors saved for backward; each storage counted once): ")
    for index, name in enumerate(probe.names):
        log.info("%10s\tmemory: tops %s MB, saved for backward %s MB.", name, megabytes(probe.tops[index]),
                 megabytes(probe.saved[index]))
    log.info("Total tops: %s MB, saved for backward: %s MB.", megabytes(sum(probe.tops)), megabytes(sum(probe.saved)))
    if probe.cuda_peak is not None:
        log.info("Peak memory of forward-backward: %s MB (torch.cuda.max_memory_allocated on %s).",
                 megabytes(probe.cuda_peak), net.device)
    else:
        log.info("Peak memory of forward-backward: %s MB (the parameters plus the tensor storages alive at once, "
                 "counted as each operator returns them; without allocator overhead, memory an operator frees "
                 "before returning, and the DenseCRF lattices).", megabytes(probe.peak))
    lattices = lattice_bytes()
    if lattices:
        log.info("DenseCRF lattices in their pool (C++, besides the peak above): %s MB.", megabytes(lattices))


def device_query(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        log.info("No CUDA device is available; rloss runs on the CPU")
        return
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        log.info("Device id: %d, name: %s, total memory: %d MB", index, props.name, props.total_memory >> 20)
