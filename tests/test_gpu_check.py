"""scripts/gpu_check: without CUDA it says so and exits 0; its hidden CPU mode runs every comparison
(CPU against CPU) and passes; every registered layer type has a case; a mismatch fails the check."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import torch

from rloss.layers import layer_types
from tests.shared_data import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_the_check_says_so_and_exits_0():
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device is available" in done.stdout and "nothing to check" in done.stdout


def test_every_registered_layer_type_has_a_case(gpu_check):
    assert set(layer_types()) <= set(gpu_check.CASES)


def test_the_cpu_mode_runs_every_check_and_passes(gpu_check, capsys):
    code = gpu_check.main(["--device", "cpu", "--batch", "1", "--crop", "33", "--iterations", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = dict(re.findall(r"^(layer \w+)(?: \([^)]*\))?\s+(ok|n/a)\s", out, re.MULTILINE))
    assert set(rows) == {f"layer {name}" for name in layer_types()}
    for check in ("solver: 5 SGD iterations", "rloss.DenseCRFLoss module", "autocast step bf16"):
        assert re.search(rf"^{re.escape(check)}\s+ok\s+0\b", out, re.MULTILINE), check
    assert re.search(r"^LargeFOV fwd\+bwd fp32 \(batch 1, crop 33\)\s+[\d.]+ s/it", out, re.MULTILINE)
    assert re.search(r"^2-rank NCCL.*\s+n/a\s", out, re.MULTILINE)
    assert re.search(r"^\d+ of \d+ checks passed or do not apply$", out, re.MULTILINE)


def test_a_device_that_computes_differently_is_a_mismatch(gpu_check, monkeypatch):
    """The device run made off by 1e-3 (ten times the tolerance) must fail, and the check with it."""
    run_net, calls = gpu_check.run_net, []

    def skewed(param, phase, inputs, device):  # the first run is the device's
        results = run_net(param, phase, inputs, device)
        calls.append(device)
        return {key: value + 1e-3 for key, value in results.items()} if len(calls) == 1 else results

    monkeypatch.setattr(gpu_check, "run_net", skewed)
    case = gpu_check.CASES["Convolution"][0]
    row = gpu_check.layer_row("layer Convolution", case, torch.device("cpu"), {})
    assert row.result == "MISMATCH" and row.detail.startswith("0.001")
    assert gpu_check.compare({"a": torch.ones(3)}, {"a": torch.ones(3) + 5e-5}, 1e-4)[0]
    assert not gpu_check.compare({"a": torch.ones(3)}, {"b": torch.ones(3)}, 1e-4)[0]
    monkeypatch.setattr(gpu_check, "all_rows", lambda device, args: [row])
    assert gpu_check.main(["--device", "cpu"]) == 1
