"""`python -m rloss plot`: the figure (a PNG of the expected size), the CSV of every value, and bad
input (no training lines, a missing file, an unknown format, no matplotlib) as one error line with
nothing written."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys

import pytest

from rloss.caffe_log import GlogFormatter
from rloss.cli.main import main
from tests.shared_data import REPO

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install rloss[plot])")
Image = pytest.importorskip("PIL.Image")

ITERATIONS, TEST_EVERY = 6, 3
ROWS_PER_RUN = ITERATIONS * 3 + (ITERATIONS // TEST_EVERY) * 2  # loss, train/loss, lr; 2 test outputs


def messages(scale: float):
    """The solver's messages of one run: tests every TEST_EVERY iterations, a display at each."""
    yield "Solving tiny"
    for it in range(ITERATIONS):
        if it % TEST_EVERY == 0:
            yield f"Iteration {it}, Testing net (#0)"
            yield f"    Test net output #0: accuracy = {0.5 + it / 100}"
            yield f"    Test net output #1: loss = {scale * 2} (* 1 = {scale * 2} loss)"
        yield f"Iteration {it}, loss = {scale / (it + 1)}"
        yield f"    Train net output #0: loss = {scale / (it + 2)} (* 1 = {scale / (it + 2)} loss)"
        yield f"Iteration {it}, lr = {0.01 / 2 ** it}"


def write_log(path, *scales: float):
    """A log in our glog format with one run per scale, and a shell script's line between runs."""
    formatter = GlogFormatter()
    lines = []
    for scale in scales:
        lines += [formatter.format(logging.makeLogRecord({"msg": text, "filename": "solver.py", "lineno": 144}))
                  for text in messages(scale)]
        lines.append("phase done")
    path.write_text("\n".join(lines) + "\n")
    return path


def error_only(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rloss: error: "), text
    return lines[0]


def test_figure_and_csv(tmp_path, capsys):
    one, two = write_log(tmp_path / "a.log", 1.0), write_log(tmp_path / "b.log", 2.0, 3.0)
    figure, table = tmp_path / "out" / "curves.png", tmp_path / "curves.csv"
    (tmp_path / "out").mkdir()
    assert main(["plot", str(one), str(two), "-o", str(figure), "--csv", str(table)]) == 0, capsys.readouterr().err
    with Image.open(figure) as image:
        image.load()
        # 5 panels (loss, lr, train/loss, test#0/accuracy, test#0/loss), 2 to a row of 6 x 3 inches, 100 dpi
        assert image.format == "PNG" and image.size == (1200, 900)
    with open(table, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["log", "run", "iteration", "quantity", "value"]
    assert len(rows) == 1 + 3 * ROWS_PER_RUN
    assert [str(one), "1", "0", "loss", "1.0"] in rows
    assert [str(two), "2", "3", "test#0/accuracy", "0.53"] in rows
    assert [str(two), "2", "5", "lr", repr(0.01 / 2 ** 5)] in rows
    assert [str(two), "1", "4", "train/loss", repr(2.0 / 6)] in rows
    assert sorted({(r[0], r[1]) for r in rows[1:]}) == [(str(one), "1"), (str(two), "1"), (str(two), "2")]
    assert not [p.name for p in tmp_path.rglob(".*.tmp")]


def test_other_formats(tmp_path):
    log = write_log(tmp_path / "a.log", 1.0)
    assert main(["plot", str(log), "-o", str(tmp_path / "curves.svg")]) == 0
    assert (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("case", ["no training lines", "missing", "unknown format", "no such folder"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    good = write_log(tmp_path / "good.log", 1.0)
    bad = tmp_path / "bad.log"
    figure = tmp_path / {"unknown format": "curves.xyz", "no such folder": "nowhere/curves.png"}.get(case, "curves.png")
    if case == "no training lines":
        bad.write_text("I1121 22:53:01.123456 1 caffe.cpp:1] Use CPU.\nhello\n")
    logs = [str(good), str(bad)] if case in ("no training lines", "missing") else [str(good)]
    assert main(["plot", *logs, "-o", str(figure), "--csv", str(tmp_path / "t.csv")]) == 1
    line = error_only(capsys.readouterr().err)
    assert {"no training lines": f"{bad}: no training lines", "missing": str(bad),
            "unknown format": "cannot be written as '.xyz'",
            "no such folder": f"cannot write {figure}: No such file or directory"}[case] in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["good.log"] + (["bad.log"] if bad.exists() else []))


def test_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    log = write_log(tmp_path / "a.log", 1.0)
    assert main(["plot", str(log), "-o", str(tmp_path / "curves.png")]) == 1
    line = error_only(capsys.readouterr().err)
    assert "pip install rloss[plot]" in line and "pip install matplotlib" in line
    assert not (tmp_path / "curves.png").exists()


def test_the_command_line(tmp_path):
    log = write_log(tmp_path / "a.log", 1.0)
    result = subprocess.run([sys.executable, "-m", "rloss", "plot", str(log), "-o", str(tmp_path / "c.png")],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert f"Training curves of 1 log written to {tmp_path / 'c.png'}" in result.stderr
    with Image.open(tmp_path / "c.png") as image:
        assert image.size == (1200, 900)
