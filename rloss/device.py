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

