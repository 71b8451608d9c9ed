"""The one way tests reach ../shared (golden outputs of the real Caffe fork, the original experiment
files, data): a test skips, saying why, when it is absent; with RLOSS_REQUIRE_SHARED=1 (set by CI)
it fails instead, so that a green run cannot hide skipped golden tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from rloss.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLOSS_SHARED", REPO.parent / "shared"))
REQUIRED = os.environ.get("RLOSS_REQUIRE_SHARED") == "1"


def shared_path(*parts: str) -> Path:
    """A path under ../shared; the calling test skips (or fails, when required) if it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"{path} is absent: ../shared (golden files, reference experiments, data) is not beside this clone"
        if REQUIRED:
            pytest.fail(f"{reason}, and RLOSS_REQUIRE_SHARED=1 requires it")
        pytest.skip(reason)
    return path


@dataclass(frozen=True)
class GoldenCase:
    """One case folder of ../shared/golden: arrays saved as NAME.npy, and the net that made them."""

    folder: Path

    def array(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy")

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Every PREFIXname.npy of the case, by name."""
        return {p.stem[len(prefix):]: np.load(p) for p in sorted(self.folder.glob(f"{prefix}*.npy"))}

    def net_param(self) -> caffe_pb2.NetParameter:
        return text_format.Parse((self.folder / "net.prototxt").read_text(), caffe_pb2.NetParameter())


def golden(*parts: str) -> GoldenCase:
    """The golden case folder ../shared/golden/<parts>."""
    return GoldenCase(shared_path("golden", *parts))
