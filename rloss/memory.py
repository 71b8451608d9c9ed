"""Memory that is planned: what one training iteration of a net needs, measured before it runs.

`MemoryProbe` watches forward+backward passes of a net and counts, through a torch dispatch mode,
the bytes of every tensor storage alive at the same time (each storage once, from the operator that
returns it until it is freed), per layer segment of the passes, and per layer the bytes of its tops
and of the tensors autograd saves for its backward (`torch.autograd.graph.saved_tensors_hooks`).
`python -m rloss time` prints these.

`estimate_training_peak(net)` runs two small trial copies of a train net, at batch 1 and 2 with
its sources (data layers, Input layers, net inputs) replaced by synthetic inputs, so the full batch
is never allocated. The trials run two passes, as training does: the second pass runs while the
blobs the first one left in the net and its parameter diffs still exist (as with iter_size > 1, so
for iter_size 1 the estimate is high by at most one copy of the diffs). Each segment's peak is
extrapolated linearly to the file's batch size; the largest is the iteration's dynamic memory, to
which come the weights, the solver's momentum history, the DenseCRF lattices (C++, kept from the
forward to the backward, one per image) and the batches the data layers read ahead.

`check_training_memory(net, device)` compares that with `available_bytes(device)` and raises
`MemoryPlanError` saying what to change when it does not fit. `RLOSS_SKIP_MEMORY_CHECK=1` skips it.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.random import fork_rng
from torch.utils._python_dispatch import TorchDispatchMode

from rloss.errors import MemoryPlanError
from rloss.host_memory import host_available_bytes
from rloss.net import Net
from rloss.proto import caffe_pb2

log = logging.getLogger("rloss")
SKIP_ENV = "RLOSS_SKIP_MEMORY_CHECK"
TRIAL_PASSES = 2  # the second pass runs beside what the first left behind, as in training
RUN_OPTIONS = ("precision", "checkpoint_activations", "keep_blob_diffs")  # Net attributes a trial takes over
SCENE_MEAN = 117.0  # about the mean of DeepLab's mean_value (104, 117, 123)
# What the ledger cannot see (allocator pages, workspaces inside operators, runtime caches): on the CPU,
# MSc-LargeFOV at crop 321 needs 0.1-0.25 GB more than its estimate (bench/bench_memory.py).
MARGIN = 0.05
MARGIN_BYTES = 256 * 2**20
Segment = tuple[int, str, int]  # (pass, "forward" or "backward", layer index)


# ---- storages ---------------------------------------------------------------------------------------

def tensors_in(value: object) -> Iterator[torch.Tensor]:
    """The tensors in an operator's output (a tensor or nested tuples and lists of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    sizes: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


class StorageLedger(TorchDispatchMode):
    """Bytes of the tensor storages alive at once. Every storage an operator returns (or `add` is
    given) is counted once until it is freed, which a weak reference to it tells; `peaks` keeps the
    largest total seen while each segment (`mark`) was current. Memory inside an operator that it
    frees before returning (workspaces) and memory outside torch tensors is not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.bytes = 0
        self.segment: Segment | None = None
        self.peaks: dict[Segment | None, int] = {}

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=self.bytes)

    def mark(self, segment: Segment) -> None:
        self.segment = segment
        self._sweep()
        self._record()

    def add(self, tensor: torch.Tensor) -> None:
        """Count `tensor`'s storage from now until it is freed (once, however many tensors share it).
        The weak reference keeps the storage's address from being reused while it is counted."""
        storage = tensor.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref.cdata not in self.live:
            self.live[ref.cdata] = (ref, storage.nbytes())
            self.bytes += storage.nbytes()

    def _sweep(self) -> None:
        freed = [key for key, (ref, _) in self.live.items() if ref.expired()]
        for key in freed:
            self.bytes -= self.live.pop(key)[1]

    def _record(self) -> None:
        if self.bytes > self.peaks.get(self.segment, -1):
            self.peaks[self.segment] = self.bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        out = func(*args, **(kwargs or {}))
        for tensor in tensors_in(out):
            self.add(tensor)
        self._record()
        return out


# ---- watching a net ---------------------------------------------------------------------------------

class MemoryProbe:
    """Watches `passes` forward+backward passes of a net (each one `step()`): the ledger's peak per
    segment, and per layer (of the last pass) the bytes of its tops and of the tensors autograd saves
    for its backward, each storage counted once over the net (tops: by the layer that first returns
    it; saved: by the first layer that saves it; the parameters are not counted as saved). On CUDA,
    the allocator's peak (`torch.cuda.max_memory_allocated`) of the passes too."""

    def __init__(self, net: Net):
        self.net = net
        self.names = [layer.name for layer in net.layers]
        self.ledger = StorageLedger()
        self.tops = [0] * len(self.names)
        self.cuda_peak: int | None = None
        self._pass = 0
        self._seen_tops: set[int] = set()
        self._saved = _SavedCounter(self.ledger, len(self.names),
                                    {p.untyped_storage().data_ptr() for p in net.parameters()})

    @property
    def saved(self) -> list[int]:
        return self._saved.bytes

    def run(self, step: Callable[[], None], passes: int = TRIAL_PASSES) -> MemoryProbe:
        device = self.net.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        handles = [h for index, layer in enumerate(self.net.layers) for h in self._hook(index, layer)]
        try:
            with self.ledger, torch.autograd.graph.saved_tensors_hooks(self._saved, _unpack):
                for self._pass in range(passes):
                    self.tops, self._seen_tops = [0] * len(self.names), set()
                    self._saved.restart()
                    step()
                    self.ledger.mark((self._pass, "end", -1))
        finally:
            for handle in handles:
                handle.remove()
        if cuda:
            torch.cuda.synchronize(device)
            self.cuda_peak = torch.cuda.max_memory_allocated(device)
        return self

    def _hook(self, index: int, layer: torch.nn.Module) -> list:
        def before(module, bottoms):
            self._saved.layer = index
            for bottom in tensors_in(bottoms):
                self.ledger.add(bottom)
            self.ledger.mark((self._pass, "forward", index))

        def after(module, bottoms, tops):
            for top in tensors_in(tops):
                self.ledger.add(top)
                key = top.untyped_storage().data_ptr()
                if key not in self._seen_tops:
                    self._seen_tops.add(key)
                    self.tops[index] += top.untyped_storage().nbytes()
                if top.requires_grad and torch.is_grad_enabled():
                    top.register_hook(self._backward_mark(self._pass, index))
            self._saved.layer = -1

        return [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]

    def _backward_mark(self, pass_index: int, index: int):
        ledger = self.ledger  # not self: the hook lives on a blob the net keeps, and must not keep the probe

        def hook(grad):
            ledger.mark((pass_index, "backward", index))
        return hook

    @property
    def peak(self) -> int:
        """Bytes of the parameters plus the most the passes held at once (the ledger's count)."""
        return parameter_bytes(self.net) + self.ledger.peak

    @property
    def segment_peaks(self) -> dict[Segment, int]:
        """The ledger's peak in each segment of the passes (not counting what preceded them)."""
        return {key: value for key, value in self.ledger.peaks.items() if key is not None}


class _SavedCounter:
    """saved_tensors_hooks' pack: the bytes autograd saves during each layer's forward, each storage
    once, the parameters left out. It holds no net: a graph kept after the passes holds its hooks,
    and must not keep the net (and its DenseCRF lattices) alive."""

    def __init__(self, ledger: StorageLedger, layers: int, parameters: set[int]):
        self.ledger, self.parameters = ledger, parameters
        self.layer = -1
        self.bytes = [0] * layers
        self.seen: set[int] = set()

    def restart(self) -> None:
        self.bytes, self.seen = [0] * len(self.bytes), set()

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.ledger.add(tensor)
        key = tensor.untyped_storage().data_ptr()
        if self.layer >= 0 and key not in self.parameters and key not in self.seen:
            self.seen.add(key)
            self.bytes[self.layer] += tensor.untyped_storage().nbytes()
        return tensor


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def parameter_bytes(net: Net) -> int:
    return storage_bytes(net.parameters())


def lattice_bytes() -> int:
    """Bytes the DenseCRF lattices (C++) hold in their pool, 0 when the extension is not loaded."""
    module = sys.modules.get("rloss._lattice")
    return int(module.workspace_bytes()) if module is not None else 0


# ---- the estimate -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training iteration of a net at `batch_size` on `device`, in bytes.

    `dynamic_lines` are (bytes at batch 0, bytes per sample) of each trial segment's peak: the
    tensors an iteration creates or keeps (blobs, what autograd saves, gradients, parameter diffs,
    transients between operators); the iteration's dynamic memory is their maximum at the batch.
    The lattices and the read-ahead are host memory whatever the device."""

    batch_size: int
    device: torch.device
    weights: int
    history: int
    dynamic_lines: tuple[tuple[float, float], ...]
    lattice_per_image: int
    read_ahead_per_sample: int

    def at(self, batch_size: int) -> MemoryEstimate:
        return replace(self, batch_size=batch_size)

    @property
    def dynamic(self) -> int:
        return int(max((a + b * self.batch_size for a, b in self.dynamic_lines), default=0))

    @property
    def lattice(self) -> int:
        return self.lattice_per_image * self.batch_size

    @property
    def read_ahead(self) -> int:
        return self.read_ahead_per_sample * self.batch_size

    @property
    def host_only(self) -> int:
        return self.lattice + self.read_ahead

    @property
    def total(self) -> int:
        return self.weights + self.history + self.dynamic + self.host_only

    def describe(self) -> str:
        parts = [("weights", self.weights), ("momentum history", self.history),
                 ("activations and gradients", self.dynamic), ("DenseCRF lattices", self.lattice),
                 ("data read-ahead", self.read_ahead)]
        listed = " + ".join(f"{name} {size(value)}" for name, value in parts if value)
        return f"{size(self.total)} = {listed}"


def size(count: float) -> str:
    """Bytes in the largest binary unit that keeps them >= 1 (2 decimals)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f} B"


def estimate_training_peak(net: Net, device: torch.device | str | None = None) -> MemoryEstimate:
    """The peak memory of one training iteration of `net` at its file's batch size, from trials at
    batch 1 and 2 on `device` (default: the net's), with the net's `precision`,
    `checkpoint_activations` and `keep_blob_diffs` (pycaffe's: every diff kept). The trials leave the
    net, its parameters' diffs and torch's generators as they were.

    The DenseCRF lattices are measured by the growth of the lattice pool over the trials (lattices
    return to it when the trial nets are freed; it grows by the most a trial held at once); lattices
    the process already pooled before count as already there."""
    device = torch.device(device) if device is not None else net.device
    trials, lattices = [], [lattice_bytes()]
    with fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in (1, 2):
            peaks, cuda_peak, trial = _trial(net, batch, device)
            trials.append((peaks, cuda_peak))
            if trial() is not None:  # kept by a cycle (as the frames of torch's first lazy imports make)
                gc.collect()
            lattices.append(lattice_bytes())  # the trial net is freed: its lattices are back in the pool
    (first, cuda_first), (second, cuda_second) = trials
    lines = _extrapolated(first, second)
    if cuda_first is not None and cuda_second is not None:
        lines.append(_line(cuda_first, cuda_second))
    batch = source_batch_size(net)
    return MemoryEstimate(
        batch_size=batch, device=device, weights=parameter_bytes(net),
        history=storage_bytes(entry.tensor for entry in net.learnable), dynamic_lines=tuple(lines),
        lattice_per_image=max(b - a for a, b in zip(lattices, lattices[1:])),
        read_ahead_per_sample=read_ahead_per_sample(net, batch))


def _line(at_one: float, at_two: float) -> tuple[float, float]:
    """(bytes at batch 0, bytes per sample) of the line through the trials at batch 1 and 2."""
    slope = at_two - at_one
    return at_one - slope, slope


def _extrapolated(first: dict[Segment, int], second: dict[Segment, int]) -> list[tuple[float, float]]:
    common = [key for key in first if key in second]
    if not common:  # the trials ran differently: the line through their overall peaks
        return [_line(max(first.values(), default=0), max(second.values(), default=0))]
    return [_line(first[key], second[key]) for key in common]


def _trial(net: Net, batch: int, device: torch.device) -> tuple[dict[Segment, int], int | None, weakref.ref]:
    """Two training passes of a copy of `net` at `batch` on synthetic inputs: the ledger's peak per
    segment, on CUDA the allocator's peak above what was allocated before, and a weak reference to
    the copy."""
    trial = trial_net(net, batch, device)
    feeds = synthetic_feeds(trial)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def step() -> None:
        loss = trial.forward({name: value.to(device) for name, value in feeds.items()})
        if loss.requires_grad:
            loss.backward()

    probe = MemoryProbe(trial).run(step)
    cuda_peak = None if probe.cuda_peak is None else probe.cuda_peak - baseline
    return probe.segment_peaks, cuda_peak, weakref.ref(trial)


def source_batch_size(net: Net) -> int:
    """The batch size of a net: dim 0 of the first top of its first source (a layer without bottoms,
    or a net input); 1 for a net without sources."""
    for shape in _source_shapes(net):
        return shape[0] if shape else 1
    return 1


def _source_shapes(net: Net) -> Iterator[tuple[int, ...]]:
    yield from net.inputs.values()
    for param, layer in zip(net.net_param.layer, net.layers):
        if not param.bottom:
            yield from layer.top_shapes[:len(param.top)]


def trial_net(net: Net, batch: int, device: torch.device | None = None) -> Net:
    """A copy of `net` on `device` (default: the net's) with its own weights and the same run options,
    whose sources are net inputs of the same shapes except dim 0 (where it is the net's batch size),
    which becomes `batch`."""
    full = source_batch_size(net)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net.net_param)
    for field in ("input", "input_shape", "input_dim", "layer"):
        out.ClearField(field)

    def add_input(name: str, shape: tuple[int, ...]) -> None:
        resized = (batch, *shape[1:]) if shape and shape[0] == full else shape
        out.input.append(name)
        out.input_shape.add().dim.extend(resized)

    for name, shape in net.inputs.items():
        add_input(name, shape)
    for param, layer in zip(net.net_param.layer, net.layers):
        if param.bottom:
            out.layer.add().CopyFrom(param)
            continue
        for name, shape in zip(param.top, layer.top_shapes):
            add_input(name, shape)
    trial = Net(out, net.phase, source=net.source).to(device or net.device)
    for option in RUN_OPTIONS:  # after the move: a precision is checked against the device
        setattr(trial, option, getattr(net, option))
    return trial


def synthetic_feeds(net: Net) -> dict[str, torch.Tensor]:
    """Inputs for a trial. The first input is by Caffe's convention the image: a batch of colour images
    (N, 3, H, W) gets scenes of rloss's synthetic scribble dataset, mean-subtracted, so the DenseCRF
    lattice has about a photo's size (pure noise would make it 6 times larger, a flat image half as
    large); another first input gets random values around 0. The others (labels and the like) get
    zeros, valid for any loss."""
    generator = torch.Generator().manual_seed(0)
    feeds = {}
    for index, (name, shape) in enumerate(net.inputs.items()):
        if index:
            feeds[name] = torch.zeros(shape)
        elif len(shape) == 4 and shape[1] == 3:
            feeds[name] = scenes(shape[0], shape[2], shape[3])
        else:
            feeds[name] = torch.randn(shape, generator=generator) * 50
    return feeds


def scenes(count: int, height: int, width: int) -> torch.Tensor:
    """`count` synthetic scenes (N, 3, H, W), mean-subtracted as a data layer gives them."""
    from rloss.data.synthetic import make_sample

    rng = np.random.default_rng(0)
    images = [make_sample(rng, height, width, 6)[0] for _ in range(count)]
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).astype(np.float32)) - SCENE_MEAN


def read_ahead_per_sample(net: Net, batch: int) -> int:
    """Bytes per sample of the batches the data layers keep prefetched (float32 tops)."""
    total = 0
    for layer in net.layers:
        prefetcher = getattr(layer, "prefetcher", None)
        if prefetcher is not None:
            elements = sum(math.prod(shape) for shape in layer.top_shapes)
            total += prefetcher.depth * elements * 4 // max(1, batch)
    return total


# ---- what is available, and the check ---------------------------------------------------------------

def available_bytes(device: torch.device | str) -> int | None:
    """Bytes a run can still allocate on `device`: on CUDA the device's free memory plus what torch's
    allocator holds unused; on the CPU the host's (`host_available_bytes`). None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return host_available_bytes()


@dataclass(frozen=True)
class _Pool:
    """One memory a run draws from: what it still needs there and what is free (None: unknown)."""

    name: str
    need: int
    available: int | None

    @property
    def fits(self) -> bool:
        return self.available is None or self.need <= self.available


def free_memory(device: torch.device) -> dict[str, int | None]:
    """What is free where a run on `device` allocates: the host, and a CUDA device."""
    free = {"host": host_available_bytes()}
    if device.type == "cuda":
        free[f"{device} device"] = available_bytes(device)
    return free


def _pools(estimate: MemoryEstimate, ranks_per_host: int, free: dict[str, int | None]) -> list[_Pool]:
    """What the run still needs (the weights exist already), with MARGIN, on the host and on a CUDA
    device; the ranks of one host share its memory (on the CPU, all of it)."""
    rest = (estimate.total - estimate.weights) * (1 + MARGIN) + MARGIN_BYTES
    host = estimate.host_only * (1 + MARGIN)
    if estimate.device.type != "cuda":
        return [_Pool("host", int(rest * ranks_per_host), free["host"])]
    device = f"{estimate.device} device"
    return [_Pool(device, int(rest - host), free[device]), _Pool("host", int(host * ranks_per_host), free["host"])]


def check_training_memory(net: Net, device: torch.device | str | None = None, ranks_per_host: int = 1,
                          where: str | None = None, iter_size: int = 1) -> MemoryEstimate | None:
    """Estimate one training iteration of `net` on `device` (default: the net's) and raise
    MemoryPlanError, before anything allocates the batch, when it needs more than is free there or on
    the host (shared by `ranks_per_host` ranks). `where` names the net in messages (default: its file);
    `iter_size` is the solver's, for the suggested change. Logs the estimate when it fits and returns
    it; returns None when RLOSS_SKIP_MEMORY_CHECK=1."""
    where = where or net.source
    if os.environ.get(SKIP_ENV, "") == "1":
        log.info("%s=1: the memory check of %s is skipped", SKIP_ENV, where)
        return None
    estimate = estimate_training_peak(net, device)
    check_estimate(estimate, where, ranks_per_host, iter_size)
    return estimate


def check_estimate(estimate: MemoryEstimate, where: str, ranks_per_host: int = 1, iter_size: int = 1) -> None:
    """check_training_memory's verdict on an estimate: MemoryPlanError, or the plan logged."""
    free = free_memory(estimate.device)
    pools = _pools(estimate, ranks_per_host, free)
    short = next((pool for pool in pools if not pool.fits), None)
    if short is not None:
        change = _smaller_batch(estimate, ranks_per_host, free, iter_size)
        raise MemoryPlanError(_refusal(estimate, short, ranks_per_host, where, change))
    described = "; ".join(f"{size(p.available)} free on the {p.name}" if p.available is not None
                          else f"the {p.name}'s free memory is unknown" for p in pools)
    log.info("Memory plan of %s: one training iteration at batch_size %d needs about %s; %s",
             where, estimate.batch_size, estimate.describe(), described)


def _refusal(estimate: MemoryEstimate, pool: _Pool, ranks_per_host: int, where: str, change: str) -> str:
    ranks = f" for {ranks_per_host} ranks" if ranks_per_host > 1 and pool.name == "host" else ""
    return (f"{where}: one training iteration at batch_size {estimate.batch_size} needs about {size(pool.need)} "
            f"more on the {pool.name}{ranks}, but {size(pool.available or 0)} are free (estimated "
            f"{estimate.describe()}, plus {MARGIN:.0%} and {size(MARGIN_BYTES)} for what it cannot measure). "
            f"To fit: a smaller batch_size with a proportionally larger iter_size gives the same updates{change}; "
            f"--precision bf16; --checkpoint_activations. ({SKIP_ENV}=1 skips this check.)")


def _smaller_batch(estimate: MemoryEstimate, ranks_per_host: int, free: dict[str, int | None],
                   iter_size: int) -> str:
    """' (e.g. batch_size B/k with iter_size I*k)' for the smallest k dividing B whose batch fits, or
    ' (batch_size N fits)' when no divisor near it does; '' when not even batch 1 fits."""
    def fits(batch: int) -> bool:
        return all(pool.fits for pool in _pools(estimate.at(batch), ranks_per_host, free))

    low, high = 0, estimate.batch_size  # the largest batch that fits, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    if low == 0:
        return ""
    first = -(-estimate.batch_size // low)
    for k in range(first, first + 1000):
        if estimate.batch_size % k == 0:
            return f" (e.g. batch_size {estimate.batch_size // k} with iter_size {iter_size * k})"
    return f" (batch_size {low} fits)"
