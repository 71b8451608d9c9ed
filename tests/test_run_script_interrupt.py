"""Ctrl-C in exper/run_pascal_scribble.sh: SIGINT to the script's whole process group (as a terminal
sends it) during a phase. The running rloss command handles it as caffe.bin does (train: a snapshot,
then stop), the phase's log still gets the command's last lines (tee outlives the signal), and the
script then names the interrupted phase and its log, exits 130, and starts no further phase."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "exper" / "run_pascal_scribble.sh"


def script_env(root: Path, **settings: str) -> dict:
    """Tiny settings, as tests/test_run_script.py's; phase 1 runs until it is interrupted."""
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "DATA_ROOT": f"{root}/data/", "MODEL_DIR": str(root / "model"), "LOG_DIR": str(root / "log"),
            "MAX_ITER": "1000000", "STEPSIZE": "1000000", "MAX_ITER2": "2", "STEPSIZE2": "1", "BATCH_SIZE": "2",
            "CROP_SIZE": "33", **settings}


def _default_sigint() -> None:
    """SIGINT's default action in the script, as a terminal gives it: a shell started in the background of
    a non-interactive one inherits SIGINT ignored, and a signal ignored at entry cannot be trapped."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(env: dict, log: Path, started: re.Pattern) -> tuple[subprocess.CompletedProcess, str]:
    """Start the script in its own process group, wait until `log` matches `started`, send SIGINT to
    the group; the script's result and the log as it was when the signal went out."""
    process = subprocess.Popen(["sh", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 60
        while not (log.is_file() and started.search(log.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                out, err = process.communicate()
                pytest.fail(f"the phase did not start (exit {process.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
            time.sleep(0.05)
        before = log.read_text()
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), before


@pytest.fixture(scope="module")
def phase1(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, str]:
    """Data for the two tests, and the script interrupted during phase 1 (its snapshot is the
    model the test phase then scores)."""
    root = tmp_path_factory.mktemp("interrupt")
    env = script_env(root)
    subprocess.run([sys.executable, "-m", "rloss.data.synthetic", f"{root}/data", "--train", "4", "--val", "2",
                    "--size", "33", "--classes", "3"], check=True, env=env, capture_output=True)
    done, before = interrupt(env, root / "log" / "train.log", re.compile(r"\] Iteration 0, loss = "))
    return root, done, before


def test_ctrl_c_in_training_snapshots_stops_and_names_the_phase(phase1):
    root, done, before = phase1
    log_file = root / "log" / "train.log"
    assert done.returncode == 130, done.stdout[-3000:] + done.stderr[-3000:]
    log = log_file.read_text()
    assert log.startswith(before)
    after = log[len(before):]  # written after the signal: the stop's snapshot and the trainer's last lines
    snapshot = re.search(r"Snapshotting to binary proto file (\S+_iter_(\d+)\.caffemodel)", after)
    assert snapshot is not None, after[-3000:]
    assert Path(snapshot.group(1)).is_file() and Path(snapshot.group(1)).with_suffix(".solverstate").is_file()
    assert 0 < int(snapshot.group(2)) < 1000000
    assert "Optimization stopped early." in after
    assert log.rstrip().splitlines()[-1].endswith("Optimization Done."), log[-2000:]
    assert log in done.stdout  # tee: the terminal saw the same lines
    assert done.stderr.rstrip().splitlines()[-1] == (
        f"rloss run script: interrupted during train; its log is {log_file}"), done.stderr[-2000:]
    assert "Interrupted (exit 0): " in done.stderr and "Failed" not in done.stderr
    assert "solverwithdensecrfloss" not in done.stdout and not (root / "log" / "trainwithdensecrfloss.log").exists()
    assert not (root / "log" / ".status").exists()


def test_ctrl_c_in_the_test_phase_ends_its_log_and_names_the_phase(phase1):
    root, _, _ = phase1
    lines = (root / "data" / "list" / "val.txt").read_text()
    (root / "data" / "list" / "val_long.txt").write_text(lines * 20000)  # long enough to be interrupted
    env = script_env(root, RUN_TRAIN="0", RUN_TRAINWITHDENSECRFLOSS="0", TEST_SET="val_long")
    log_file = root / "log" / "test_pce.log"
    done, before = interrupt(env, log_file, re.compile(r"\] Batch 0, "))
    assert done.returncode == 130, done.stdout[-3000:] + done.stderr[-3000:]
    log = log_file.read_text()
    assert log.startswith(before) and log.rstrip().splitlines()[-1] == "rloss: interrupted", log[-2000:]
    assert done.stderr.rstrip().splitlines()[-1] == (
        f"rloss run script: interrupted during test_pce; its log is {log_file}"), done.stderr[-2000:]
    assert "Interrupted (exit 130): " in done.stderr
    assert not (root / "log" / "metrics_pce.json").exists() and "small_fcn on val_long" not in done.stdout


def test_a_failing_phase_is_named_with_its_log_and_exit_status(phase1):
    """The same run() without a signal: the command's exit status is recorded (under set -e too),
    the failed phase and its log are named, and no further phase starts."""
    root, _, _ = phase1
    env = script_env(root, CONFIG_DIR=str(root / "no_such_config"), LOG_DIR=str(root / "log_failed"), RUN_TEST="0")
    done = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    log_file = root / "log_failed" / "train.log"
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert log_file.read_text().rstrip().splitlines()[-1].startswith("rloss: error: ")
    command = next(line for line in done.stdout.splitlines() if line.startswith("Running "))[len("Running "):]
    assert done.stderr.rstrip().splitlines()[-2:] == [
        f"Failed (exit 1): {command}", f"rloss run script: train failed; its log is {log_file}"], done.stderr[-2000:]
    assert "solverwithdensecrfloss" not in done.stdout
