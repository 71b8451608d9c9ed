"""What the solver does differently on several ranks, behind one interface: `Ranked(ranks, device)`,
where one rank (rloss.distributed.SINGLE) has nothing to share.

Caffe's multi-GPU rules: the ranks start from rank 0's weights and history; each reads its own batches
(`shard`); gradients are averaged after the iter_size passes; the displayed loss is the mean over the
ranks (so the log equals one process's at iter_size I*N); a signal on any rank acts on all at the
same iteration; rank 0 alone tests and writes. Each rank draws its own dropout masks: rank r's torch
generators are seeded from rank 0's state and r, and the snapshots keep every rank's generators, so
a resume on the same number of ranks is exact.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import numpy as np
import torch

from rloss import distributed
from rloss.distributed import Ranks
from rloss.errors import WeightsError
from rloss.net import Net
from rloss.proto import caffe_pb2

log = logging.getLogger("rloss")
ACTIONS = ("none", "snapshot", "stop")  # in increasing precedence


class Ranked:
    """The solver's view of the other ranks (none when `ranks.size == 1`)."""

    def __init__(self, ranks: Ranks, device: torch.device):
        self.ranks = ranks
        self.device = device
        if self.parallel and device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's communicators bind to the current device

    @property
    def parallel(self) -> bool:
        return self.ranks.size > 1

    @property
    def is_root(self) -> bool:
        return self.ranks.is_root

    def common_seed(self, seed: int) -> int:
        """The solver's random_seed, or (without one, on several ranks) one seed drawn by rank 0, so
        that every rank builds the same data order; -1: leave the generators as they are."""
        if not self.parallel or seed >= 0:
            return seed
        return distributed.broadcast_seed(int(torch.randint(0, 2**62, (1,)).item()), self.device)

    def prepare(self, net: Net) -> None:
        """Deal the train net's batches round robin and give this rank its own generators."""
        if not self.parallel:
            return
        for layer in net.data_layers():
            layer.shard(self.ranks.rank, self.ranks.size)
        if self.ranks.rank:
            _seed_rank_generators(torch.get_rng_state().numpy().tobytes(), self.ranks.rank)
        log.info("Data-parallel training on %d ranks (%s): each reads every %s batch; gradients are averaged",
                 self.ranks.size, "NCCL" if self.device.type == "cuda" else "gloo", _ordinal(self.ranks.size))

    def share_root_values(self, tensors: Sequence[torch.Tensor]) -> None:
        """Rank 0's weights and history on every rank (after --weights or --snapshot, which every rank
        reads, this only guards against files that differ between machines)."""
        if self.parallel:
            with torch.no_grad():
                distributed.broadcast_tensors(list(tensors), "sharing rank 0's weights")

    def average_gradients(self, gradients: Sequence[torch.Tensor]) -> None:
        if self.parallel:
            distributed.average_gradients(gradients)

    def mean_loss(self, loss: np.float32) -> np.float32:
        """The loss averaged over the ranks (what one process at iter_size I*N would show)."""
        if not self.parallel:
            return loss
        total, = distributed.sum_values([float(loss)], self.device, "sharing the loss")
        return np.float32(total / self.ranks.size)

    def agreed_action(self, action: str) -> str:
        """The strongest action any rank's signals ask for, so that all ranks act at one iteration."""
        if not self.parallel:
            return action
        requests = distributed.sum_values([float(action == name) for name in ACTIONS], self.device,
                                          "sharing the signals")
        return next(name for name, count in zip(reversed(ACTIONS), reversed(requests)) if count or name == "none")

    def generator_states(self, own: caffe_pb2.TorchRandomState) -> list[caffe_pb2.TorchRandomState]:
        """Every rank's generators, in rank order (a collective: all ranks snapshot together)."""
        if not self.parallel:
            return [own]
        payloads = distributed.gather_bytes(own.SerializeToString())
        return [caffe_pb2.TorchRandomState.FromString(payload) for payload in payloads]

    def own_generator_state(self, resume, where: str) -> caffe_pb2.TorchRandomState | None:
        """This rank's saved generators; None for a rank the state has none for (it then seeds its
        own from rank 0's, as at the start)."""
        if self.ranks.rank == 0:
            return resume.torch_random
        others = resume.other_ranks_torch_random
        if self.ranks.rank <= len(others):
            return others[self.ranks.rank - 1]
        saved = 1 + len(others)
        log.warning("%s holds the generators of %d rank%s; rank %d seeds its own from rank 0's", where, saved,
                    "s" if saved > 1 else "", self.ranks.rank)
        return None

    def seed_missing_generators(self, rank0: caffe_pb2.TorchRandomState) -> None:
        if self.ranks.rank:
            _seed_rank_generators(rank0.cpu, self.ranks.rank)


def restore_generators(saved: caffe_pb2.TorchRandomState, device: torch.device, where: str) -> None:
    """Set torch's generators from a saved state (the CUDA one when training on CUDA)."""
    try:
        torch.set_rng_state(torch.frombuffer(bytearray(saved.cpu), dtype=torch.uint8))
        if device.type == "cuda" and saved.cuda:
            torch.cuda.set_rng_state(torch.frombuffer(bytearray(saved.cuda), dtype=torch.uint8), device)
    except (RuntimeError, ValueError) as error:
        raise WeightsError(f"{where}: its torch generator state cannot be restored ({error})") from None


def generators_now(device: torch.device) -> caffe_pb2.TorchRandomState:
    """torch's generators as a TorchRandomState (the CUDA one when training on CUDA)."""
    state = caffe_pb2.TorchRandomState(cpu=torch.get_rng_state().numpy().tobytes())
    if device.type == "cuda":
        state.cuda = torch.cuda.get_rng_state(device).numpy().tobytes()
    return state


def _seed_rank_generators(rank0_state: bytes, rank: int) -> None:
    """Seed rank `rank`'s torch generators (CPU and CUDA) from rank 0's state and the rank number."""
    digest = hashlib.sha256(bytes(rank0_state) + rank.to_bytes(4, "little")).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _ordinal(n: int) -> str:
    return {2: "second", 3: "third"}.get(n, f"{n}th")
