"""Which device a run uses and how its generators are seeded: the solver file's solver_mode and
device_id, caffe.bin's --gpu flag, and Caffe's random_seed."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from rloss.errors import SolverError
from rloss.proto import caffe_pb2

log = logging.getLogger("rloss")


def seed_everything(seed: int) -> None:
    """Caffe's set_random_seed: every generator fillers, data layers and dropout draw from."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def solver_device(param, local_rank: int = 0) -> torch.device:
    """solver_mode GPU means CUDA device `device_id` (+ the local rank in a data-parallel job, so each
    rank of a machine has its own), or the CPU (with a warning) without CUDA."""
    if param.solver_mode == caffe_pb2.SolverParameter.GPU:
        return cuda_or_cpu(param.device_id + local_rank)
    return torch.device("cpu")


def cuda_or_cpu(index: int) -> torch.device:
    if torch.cuda.is_available():
        if index >= torch.cuda.device_count():
            raise SolverError(f"GPU {index} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device("cuda", index)
    log.warning("GPU mode requested but CUDA is not available: running on the CPU")
    return torch.device("cpu")


def parse_gpu_ids(flag: str) -> list[int]:
    """caffe.bin's --gpu value: device ids separated by commas, or `all`. Several ids need as many
    CUDA devices (one rank each); a single id falls back to the CPU without CUDA, as before."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if flag == "all":
        return list(range(max(1, count)))
    try:
        ids = [int(part) for part in flag.split(",") if part.strip()]
    except ValueError:
        raise SolverError(f"--gpu={flag}: expected device ids separated by commas, or 'all'") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise SolverError(f"--gpu={flag}: expected distinct non-negative device ids, or 'all'")
    if len(ids) > 1:
        absent = [i for i in ids if i >= count]
        if not count:
            raise SolverError(f"--gpu={flag}: CUDA is not available, so {len(ids)} GPUs cannot be used; on the "
                              f"CPU, run the ranks with torchrun --nproc_per_node={len(ids)} -m rloss train ... (gloo)")
        if absent:
            raise SolverError(f"--gpu={flag}: no CUDA device {', '.join(map(str, absent))} (this machine has "
                              f"{count}: {', '.join(map(str, range(count)))})")
    return ids


def parse_gpu_flag(flag: str) -> torch.device:
    """The one device of a command that runs on one (test, time, infer): --gpu's id, or the first of
    `all`."""
    ids = parse_gpu_ids(flag)
    if len(ids) != 1 and flag != "all":
        raise SolverError(f"--gpu={flag}: this command runs on one device; give one id")
    return cuda_or_cpu(ids[0])
