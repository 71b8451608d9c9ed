"""exper/msrc21 (issue 12): the MSRC-21 experiment's files, and its run script end to end at QUICK=1's tiny
budget (all five conditions, one seed, a few images) on ../shared/data/msrc21 (skipped when it is absent)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.shared_data import shared_path

REPO = Path(__file__).resolve().parents[1]
EXPER = REPO / "exper" / "msrc21"
CONDITIONS = ["pce", "densecrf", "normalized_cut", "control", "full"]


def run_script(out: Path, timeout: int = 600, **settings: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), OUT=str(out), **settings)
    return subprocess.run(["bash", str(EXPER / "run.sh")], env=env, capture_output=True, text=True, timeout=timeout)


def test_net_files_are_the_generators_output() -> None:
    spec = importlib.util.spec_from_file_location("msrc21_make_nets", EXPER / "make_nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0
    assert set(module.files()) == {p.name for p in EXPER.glob("*.prototxt")}


def test_missing_data_is_named(tmp_path: Path) -> None:
    done = run_script(tmp_path / "out", DATA_ROOT=str(tmp_path / "nowhere"), QUICK="1")
    assert done.returncode == 2
    assert f"no MSRC-21 data at {tmp_path / 'nowhere'}/" in done.stderr


def test_quick_runs_the_whole_protocol(tmp_path: Path) -> None:
    data = shared_path("data", "msrc21")
    out = tmp_path / "out"
    done = run_script(out, QUICK="1", DATA_ROOT=str(data))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("summary.json", "summary_train.json"):
        summary = json.loads((out / "results" / name).read_text())
        assert list(summary) == CONDITIONS, name
        for condition, by_seed in summary.items():
            assert list(by_seed) == ["1"], (name, condition)
            assert 0 <= by_seed["1"] <= 100, (name, condition)
    table = (out / "results" / "summary.md").read_text()
    for label in ("partial cross-entropy (phase 1)", "+ DenseCRF loss", "+ normalized cut loss", "(control)",
                  "full supervision"):
        assert label in table
    val = json.loads((out / "results" / "summary.json").read_text())
    difference = val["densecrf"]["1"] - val["control"]["1"]
    assert (f"+ DenseCRF loss (phase 2) minus the control, paired by seed: {difference:+.2f} +- 0.00 "
            f"({difference:+.2f}) (val)") in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "results" / "summary.png").stat().st_size > 0
    test_net = re.search(r"^test net: (\S+)", done.stdout, re.M)
    assert test_net and Path(test_net.group(1)) == EXPER / "test.prototxt"
    models = dict(re.findall(r"^model (\w+) seed 1: (\S+)$", done.stdout, re.M))
    assert list(models) == CONDITIONS
    for condition, model in models.items():
        assert Path(model).is_file() and Path(model).is_relative_to(out / "model" / "seed1" / condition), model
    phase2 = (out / "log" / "seed1" / "densecrf.log").read_text()
    assert "densecrf_loss" in phase2 and str(out / "model" / "seed1" / "pce" / "train_iter_4.caffemodel") in phase2
    assert "normalized_cut_loss" in (out / "log" / "seed1" / "normalized_cut.log").read_text()
    assert "--set TRAIN_SET=train_full" in (out / "log" / "seed1" / "full_phase1.log").read_text()
    assert "--set DENSECRF_LOSS_WEIGHT=0" in (out / "log" / "seed1" / "control.log").read_text()
    # the README's two diagnostics score the same model: after CRF inference, and beside the DenseCRF loss
    score_diagnostic("testwithcrf", models["pce"], out, data)
    assert 0 <= json.loads((out / "testwithcrf.json").read_text())["mean_iou"] <= 1
    scored = score_diagnostic("testwithdensecrfloss", models["pce"], out, data)
    energy = re.search(r"densecrf_loss = (\S+) \(\* 1 = ", scored.stderr)
    assert energy and float(energy.group(1)) < 0, scored.stderr[-3000:]  # -sum S'WS with W, S >= 0
    assert json.loads((out / "testwithdensecrfloss.json").read_text())["mean_iou"] == json.loads(
        (out / "log" / "seed1" / "metrics_pce_val.json").read_text())["mean_iou"]


def score_diagnostic(net: str, model: str, out: Path, data: Path) -> subprocess.CompletedProcess:
    """`rloss test` of exper/msrc21/NET.prototxt on QUICK's val list; its metrics in OUT/NET.json."""
    scored = subprocess.run(
        [sys.executable, "-m", "rloss", "test", f"--model={EXPER / f'{net}.prototxt'}", f"--weights={model}",
         f"--metrics_json={out / f'{net}.json'}", "--set", f"DATA_ROOT={data}/", "--set", f"LIST_DIR={out / 'list'}",
         "--set", "TEST_SET=val", "--set", "TEST_CROP_SIZE=161", "--set", "NUM_LABELS=21", "--set", "BI_XY_STD=30",
         "--set", "BI_RGB_STD=15", "--set", "DENSECRF_LOSS_WEIGHT=1", "--set", "DENSECRF_SCALE=1"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert scored.returncode == 0, scored.stderr[-3000:]
    return scored


def test_a_failed_step_names_itself_and_its_log(tmp_path: Path) -> None:
    """A crop that is not 4k + 1 makes the scores and labels differ in size: phase 1 fails at once."""
    data = shared_path("data", "msrc21")
    out = tmp_path / "out"
    done = run_script(out, QUICK="1", DATA_ROOT=str(data), CROP_SIZE="34", CONDITIONS="pce")
    assert done.returncode != 0
    log = out / "log" / "seed1" / "pce.log"
    assert f"msrc21: pce (seed 1) failed (exit {done.returncode}); its log is {log}" in done.stderr
    assert log.is_file()
