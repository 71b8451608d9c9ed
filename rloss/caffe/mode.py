"""pycaffe's process-wide settings: the device nets are built on, and the random seed."""

from __future__ import annotations

import torch

from rloss.device import seed_everything

_device = {"type": "cpu", "index": 0}


def set_mode_cpu() -> None:
    """Run nets built afterwards on the CPU."""
    _device["type"] = "cpu"


def set_mode_gpu() -> None:
    """Run nets built afterwards on CUDA (device from set_device); falls back to the CPU if absent."""
    _device["type"] = "cuda"


def set_device(index: int) -> None:
    _device["index"] = int(index)


def current_device() -> torch.device:
    if _device["type"] == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", _device["index"])
    return torch.device("cpu")


def set_random_seed(seed: int) -> None:
    """Caffe's set_random_seed: seeds every generator rloss's fillers, data layers and Dropout draw from
    (torch's, numpy's and Python's), so nets built and run afterwards repeat."""
    seed_everything(int(seed))
