"""Data-parallel training on torch.distributed, with Caffe's multi-GPU semantics.

Every rank runs the net at the file's batch size on its own batches (the data layers deal the batches
of the one-process sequence round robin, `shard_data`); after the iter_size passes the gradients are
averaged over the ranks (one all-reduce per dtype and device), so N ranks at iter_size I make the
updates one process makes at iter_size I*N. Rank 0 alone logs, tests and writes snapshots.

The ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); caffe.bin's
`--gpu=0,1` starts them itself through torch's elastic launcher (`launch`), the engine torchrun uses.
NCCL on CUDA, gloo on the CPU. A rank that fails leaves its message in the job's store; the ranks
that see a collective fail name the ranks that are gone (`_roll_call`) instead of hanging or printing
a transport error.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from rloss.errors import DistributedError

log = logging.getLogger("rloss")
ROLL_CALL_SECONDS = 10.0
_FAILED_KEY = "rloss/failed/"
_PRESENT_KEY = "rloss/present/"


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a data-parallel job."""

    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0


SINGLE = Ranks(0, 1, 0, 1)


def environment_ranks(environ: dict[str, str] | os._Environ = os.environ) -> Ranks:
    """The ranks torchrun (or our launcher) describes in the environment; SINGLE outside a job."""
    if "WORLD_SIZE" not in environ:
        return SINGLE
    try:
        size = int(environ["WORLD_SIZE"])
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
        local_size = int(environ.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers, got "
                               + ", ".join(f"{k}={environ.get(k)!r}" for k in
                                           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))) from None
    if not (0 <= rank < size and 0 <= local_rank < local_size):
        raise DistributedError(f"rank {rank} of {size} (local {local_rank} of {local_size}) is out of range")
    return Ranks(rank, size, local_rank, local_size)


def joined_ranks() -> Ranks:
    """This process's ranks, after joining the job's process group when the environment describes
    one (so that a pycaffe-style script under torchrun trains data-parallel too)."""
    ranks = environment_ranks()
    start(ranks)
    return ranks


def rank_gpu(gpu_ids: Sequence[int], ranks: Ranks) -> int:
    """The `--gpu` id of this rank: one id per rank of this machine, in local rank order."""
    if len(gpu_ids) != ranks.local_size:
        raise DistributedError(f"--gpu names {len(gpu_ids)} device(s) ({','.join(map(str, gpu_ids))}) for "
                               f"{ranks.local_size} ranks on this machine: give one device per local rank")
    return gpu_ids[ranks.local_rank]


def start(ranks: Ranks, timeout_minutes: float = 30.0) -> None:
    """Join the job's process group (collectives of CUDA tensors on NCCL, of CPU tensors on gloo);
    a no-op outside a job. The timeout bounds a wait for a rank that hangs (rank 0 alone runs the
    test nets, so it must exceed a test pass); a rank that exits is noticed at once."""
    if ranks.size == 1 or dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    except (RuntimeError, ValueError) as error:
        raise DistributedError(f"rank {ranks.rank}: cannot join the process group of {ranks.size} ranks "
                               f"({_first_line(error)}); are MASTER_ADDR and MASTER_PORT (or torchrun's "
                               "rendezvous) reachable from every machine?") from None


def finish() -> None:
    """Wait until every rank is done before the group is torn down: a rank that destroys its gloo
    connections while another still works (rank 0 snapshots after the last iteration) can abort at
    exit ("terminate called without an active exception", seen once under torchrun with torch 2.13)."""
    if dist.is_available() and dist.is_initialized():
        _collective("the barrier at the end of training", dist.barrier)


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share_threads(ranks: Ranks, threads: int | None) -> int:
    """Give this rank its share of the machine's cores (torch's and the lattice's threads); `threads`
    overrides it. torchrun's OMP_NUM_THREADS=1 would leave all but one core idle per rank."""
    if threads is None:
        if ranks.local_size == 1:
            return torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // ranks.local_size)
    if threads < 1:
        raise DistributedError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


# ---- collectives -----------------------------------------------------------------------------------

def _collective(what: str, call, *args, **kwargs):
    """Run one collective; when it fails, say which ranks are gone or why they stopped."""
    try:
        return call(*args, **kwargs)
    except (RuntimeError, ValueError) as error:  # gloo/NCCL report a lost peer as RuntimeError
        raise DistributedError(f"rank {dist.get_rank()}: {what} failed: {_roll_call()} "
                               f"(transport: {_first_line(error)})") from None


def _flat_groups(tensors: Sequence[torch.Tensor], what: str, collective) -> None:
    """Apply `collective` (in place, on one flat tensor) per dtype and device of `tensors`, then copy
    the results back: one call per group instead of one per tensor."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for members in groups.values():
        flat = _flatten_dense_tensors(members)
        _collective(what, collective, flat)
        for tensor, result in zip(members, _unflatten_dense_tensors(flat, members)):
            tensor.copy_(result)


def average_gradients(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor with its mean over the ranks: one flat all-reduce per dtype and device."""
    size = dist.get_world_size()

    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat)
        flat.div_(size)

    _flat_groups(tensors, "averaging the gradients", mean)


def sum_values(values: Sequence[float], device: torch.device, what: str) -> list[float]:
    """Each value summed over the ranks (float64: a loss mean and request flags)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    _collective(what, dist.all_reduce, tensor)
    return tensor.tolist()


def broadcast_tensors(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Rank 0's values of `tensors` on every rank: one flat broadcast per dtype and device."""
    _flat_groups(tensors, what, lambda flat: dist.broadcast(flat, 0))


def broadcast_seed(seed: int, device: torch.device) -> int:
    """Rank 0's seed on every rank (a solver without random_seed must still deal one data order)."""
    tensor = torch.tensor([seed], dtype=torch.int64, device=device)
    _collective("sharing the random seed", dist.broadcast, tensor, 0)
    return int(tensor.item())


def gather_bytes(payload: bytes) -> list[bytes]:
    """Every rank's `payload` (on every rank, in rank order)."""
    gathered: list[object] = [None] * dist.get_world_size()
    _collective("gathering the generator states", dist.all_gather_object, gathered, payload)
    return [bytes(item) for item in gathered]  # type: ignore[arg-type]


# ---- failures ----------------------------------------------------------------------------------------

def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (RuntimeError, ValueError, ImportError):
        return None


def report_failure(message: str) -> None:
    """Leave this rank's error in the job's store, for the others to name it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    store = _store()
    if store is None:
        return
    try:
        store.set(f"{_FAILED_KEY}{dist.get_rank()}", message[:500])
    except (RuntimeError, ValueError):
        pass  # the store is gone too: the launcher names this rank


def _roll_call() -> str:
    """After a failed collective: each surviving rank checks in; the ranks that left an error or did
    not check in within ROLL_CALL_SECONDS are named."""
    store = _store()
    size, rank = dist.get_world_size(), dist.get_rank()
    if store is None:
        return "the job's store is unreachable"
    try:
        store.set(f"{_PRESENT_KEY}{rank}", "1")
        deadline = time.monotonic() + ROLL_CALL_SECONDS
        missing = list(range(size))
        while missing and time.monotonic() < deadline:
            missing = [r for r in range(size) if not store.check([f"{_PRESENT_KEY}{r}"])]
            if missing:
                time.sleep(0.2)
        failed = {r: store.get(f"{_FAILED_KEY}{r}").decode(errors="replace")
                  for r in range(size) if store.check([f"{_FAILED_KEY}{r}"])}
    except (RuntimeError, ValueError):
        return "the job's store is unreachable (the rank that hosts it, usually rank 0, is gone)"
    parts = [f"rank {r} stopped with: {message}" for r, message in sorted(failed.items())]
    gone = [r for r in missing if r not in failed]
    if gone:
        parts.append(f"rank{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))} "
                     f"{'are' if len(gone) > 1 else 'is'} gone (killed, or its machine failed)")
    return "; ".join(parts) or "every rank is alive (a transport failure)"


def _first_line(error: BaseException) -> str:
    """The first sentence of a backend's message (gloo's go on with advice and emoji)."""
    text = str(error).strip().splitlines()
    return text[0].split(". ")[0][:300] if text else type(error).__name__


# ---- launching -------------------------------------------------------------------------------------

def launch(processes: int, module: str, argv: Sequence[str]) -> None:
    """Run `python -m module argv` as `processes` ranks on this machine (torch's elastic launcher, as
    `torchrun --standalone --nproc_per_node=processes` does); a failed rank stops the others and is
    named in the DistributedError raised here."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", module, *argv)
    except ChildFailedError as error:
        failures = ", ".join(f"rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}"
                             for rank, failure in sorted(error.failures.items()))
        raise DistributedError(f"{failures}; the other ranks were stopped (the failing rank's log above "
                               "says why)") from None
