"""examples/train_torchvision.py as a user runs it: on a folder from `data prepare`, two epochs of a
torchvision model at a tiny size, checkpoints that load into the model, one line per epoch; and a
one-line error for a folder that is not a prepared one.

The example needs torchvision. Without a working one these tests skip, saying why, or fail with
RLOSS_REQUIRE_TORCHVISION=1 (for CI, so that a green run cannot hide them)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.shared_data import REPO
from tests.test_own_data import write_raw_folders

EXAMPLE = REPO / "examples" / "train_torchvision.py"
EPOCH_LINE = re.compile(r"^epoch (\d+)/2: loss (\S+) = ce (\S+) \+ densecrf (\S+), val mIoU (\S+) \((.*)\), ", re.M)
# One thread: on a small machine shared with other jobs, OpenMP's waiting threads make the tiny
# convolutions of this test 30 times slower.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)


@pytest.fixture(scope="module")
def torchvision_imports() -> None:
    """Skip (or fail, when required) unless torchvision imports. Tried in a child process, as the
    example imports it: a CUDA build of torchvision beside a CPU torch fails with a RuntimeError
    ('operator torchvision::nms does not exist'), which importorskip would not catch."""
    done = run("-c", "import torchvision")
    if done.returncode == 0:
        return
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
    reason = (f"the example needs torchvision, which does not import here ({last}): install the torchvision "
              f"build that matches torch {torch.__version__}")
    if os.environ.get("RLOSS_REQUIRE_TORCHVISION") == "1":
        pytest.fail(f"{reason}, and RLOSS_REQUIRE_TORCHVISION=1 requires it")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def data_root(torchvision_imports, tmp_path_factory) -> Path:
    """8 images of 40x40 pixels from `data prepare`: 6 to train on, 2 to validate."""
    root = tmp_path_factory.mktemp("own_data")
    raw, data = root / "raw", root / "prepared"
    write_raw_folders(raw, count=8, size=40)
    done = run("-m", "rloss", "data", "prepare", f"--images={raw / 'photos'}", f"--scribbles={raw / 'scribbles'}",
               f"--ground-truth={raw / 'masks'}", f"--classes={raw / 'classes.txt'}", "--val=0.25", f"--out={data}")
    assert done.returncode == 0, done.stderr
    return data


def test_two_epochs_write_loadable_checkpoints(data_root, tmp_path):
    import torchvision

    out = tmp_path / "run"
    done = run(str(EXAMPLE), f"--data={data_root}", f"--out={out}", "--model=lraspp_mobilenet_v3_large",
               "--epochs=2", "--batch=2", "--crop=33", "--sigma-xy=10", "--workers=0", "--device=cpu")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    epochs = EPOCH_LINE.findall(done.stdout)
    assert [int(e[0]) for e in epochs] == [1, 2], done.stdout
    for _, loss, ce, densecrf, miou, per_class in epochs:
        assert all(math.isfinite(float(v)) for v in (loss, ce, densecrf))
        assert float(densecrf) != 0  # the DenseCRF loss took part
        assert 0 <= float(miou) <= 100
        assert [part.split()[0] for part in per_class.split(", ")] == ["background", "red_thing", "green_thing"]

    best, last = (torch.load(out / name) for name in ("best.pt", "last.pt"))  # weights_only, torch's default
    assert last["epoch"] == 2 and best["val_miou"] == pytest.approx(max(float(e[4]) for e in epochs), abs=0.005)
    for state in (best, last):
        model = torchvision.models.get_model(state["model_name"], weights=None, weights_backbone=None,
                                             num_classes=len(state["class_names"]))
        model.load_state_dict(state["model"])  # strict: every tensor there, of its shape
    assert not list(out.glob("*.partial"))


def test_a_folder_that_is_not_prepared_is_one_line(torchvision_imports, tmp_path):
    done = run(str(EXAMPLE), f"--data={tmp_path / 'photos'}", f"--out={tmp_path / 'run'}")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("train_torchvision.py: error: --data ") and "rloss data prepare" in done.stderr
    assert not (tmp_path / "run").exists()
