"""Training curves out of training logs: ours and caffe.bin's, read back from the lines the solvers
print (`Iteration N, loss = X`, `Iteration N, lr = X`, `    Train net output #k: name = v`,
`Iteration N, Testing net (#i)`, `Test loss: X`, `    Test net output #k: name = v`).

A line may carry glog's prefix (with or without the year, after other text such as a launcher's rank
tag) or none, as the solver's own log records do; lines that are none of these (other tools, shell
scripts, the net's description) are skipped. A file may hold several runs appended: a `Solving NET`
line, or an iteration that goes back or repeats one already complete, starts a new run.

Each quantity has a name: `loss` (the smoothed loss as displayed), `lr`, `train/NAME` and
`test#I/NAME` (the outputs of the train net and of test net I; `test#I/total loss` is Caffe's `Test
loss`). A blob of several elements prints one line per element under the same name: the k-th
element after the first is `NAME[k]` (SegAccuracy's `accuracy`, `accuracy[1]`, `accuracy[2]`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Union

from rloss.errors import LogError

LOSS, LR, TESTING, TRAIN_OUTPUT, TEST_OUTPUT, TEST_LOSS, SOLVING = (
    "loss", "lr", "testing", "train output", "test output", "test loss", "solving")
TOTAL_TEST_LOSS = "total loss"

# `I1121 22:53:01.123456 12345 solver.py:123] ` (glog), `I20261121 ...` (newer glog, as caffe.bin's)
_GLOG_PREFIX = re.compile(r"[IWEF]\d{4}(?:\d{4})? \d\d:\d\d:\d\d\.\d+ +\S+ [^\s\]]+:\d+\] ")
_OUTPUT = r"#\d+: (?P<name>.+?) = (?P<value>\S+)(?: \(\* .*\))?"
_PATTERNS = tuple((kind, re.compile(pattern)) for kind, pattern in (
    # newer caffe.bin: `Iteration 20 (3.1 iter/s, 6.4s/20 iters), loss = 2.3`
    (LOSS, r"Iteration (?P<iteration>\d+)(?: \([^)]*\))?, loss = (?P<value>\S+)"),
    (LR, r"Iteration (?P<iteration>\d+), lr = (?P<value>\S+)"),
    (TESTING, r"Iteration (?P<iteration>\d+), Testing net \(#(?P<index>\d+)\)"),
    (TRAIN_OUTPUT, r"Train net output " + _OUTPUT),
    (TEST_OUTPUT, r"Test net output " + _OUTPUT),
    (TEST_LOSS, r"Test loss: (?P<value>\S+)"),
    (SOLVING, r"Solving (?P<name>.+)"),
))
_GROUPS = (LOSS, LR, "train/", "test#")


class Line(NamedTuple):
    """One training line: its kind and what it says (-1, '' and nan where it says nothing)."""

    kind: str
    iteration: int = -1
    index: int = -1  # the test net of a `Testing net` line
    name: str = ""
    value: float = math.nan


class Point(NamedTuple):
    """One value of one quantity at one iteration."""

    iteration: int
    quantity: str
    value: float


def parse_line(line: str) -> Line | None:
    """The training line in `line` (a file's line or a log record's message), or None."""
    prefixes = list(_GLOG_PREFIX.finditer(line))
    message = (line[prefixes[-1].end():] if prefixes else line).strip()
    for kind, pattern in _PATTERNS:
        match = pattern.fullmatch(message)
        if match is None:
            continue
        fields = match.groupdict()
        try:
            value = float(fields.get("value", "nan"))  # C++ prints `nan`, `-nan`, `inf` as float() reads them
        except ValueError:
            return None
        return Line(kind, int(fields.get("iteration", -1)), int(fields.get("index", -1)), fields.get("name", ""),
                    value)
    return None


def train_quantity(name: str) -> str:
    return f"train/{name}"


def test_quantity(index: int, name: str) -> str:
    return f"test#{index}/{name}"


def quantity_order(quantity: str) -> int:
    """Where a quantity goes among others: loss, lr, train outputs, test outputs."""
    return next(rank for rank, group in enumerate(_GROUPS) if quantity.startswith(group))


@dataclass
class Record:
    """What the log says about one iteration of one run."""

    iteration: int
    loss: float | None = None
    lr: float | None = None
    train: dict[str, float] = field(default_factory=dict)
    test: dict[int, dict[str, float]] = field(default_factory=dict)

    def quantities(self) -> dict[str, float]:
        """Every value of the record by quantity name, loss and lr first."""
        values = {name: value for name, value in ((LOSS, self.loss), (LR, self.lr)) if value is not None}
        values.update((train_quantity(name), value) for name, value in self.train.items())
        for index, outputs in self.test.items():
            values.update((test_quantity(index, name), value) for name, value in outputs.items())
        return values


@dataclass
class Run:
    """The records of one solver run, in iteration order."""

    records: list[Record] = field(default_factory=list)

    def series(self) -> dict[str, tuple[list[int], list[float]]]:
        """Each quantity's (iterations, values), in quantity_order."""
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for record in self.records:
            for quantity, value in record.quantities().items():
                iterations, values = curves.setdefault(quantity, ([], []))
                iterations.append(record.iteration)
                values.append(value)
        return {quantity: curves[quantity] for quantity in sorted(curves, key=quantity_order)}


@dataclass
class _Block:
    """The output lines that follow a loss or a `Testing net` line: where they go and how they are named."""

    kinds: tuple[str, ...]  # the lines it takes
    record: Record
    outputs: dict[str, float]
    quantity: Callable[[str], str]


class TrainingLog:
    """Runs and records built from training lines fed one at a time: a file's lines, or the solver's
    log records as they come (rloss.tensorboard_log)."""

    def __init__(self) -> None:
        self._runs: list[Run] = []
        self._block: _Block | None = None

    @property
    def runs(self) -> list[Run]:
        return [run for run in self._runs if run.records]

    def feed(self, text: str) -> Point | None:
        """Take in one line; the value it adds, if any."""
        line = parse_line(text)
        if line is None:
            return None
        if line.kind == SOLVING:
            self._block = None
            if self._runs and self._runs[-1].records:
                self._runs.append(Run())
            return None
        if line.kind in (TRAIN_OUTPUT, TEST_OUTPUT, TEST_LOSS):
            return self._output(line)
        return self._iteration_line(line)

    def _iteration_line(self, line: Line) -> Point | None:
        self._block = None
        if line.kind == TESTING:
            record = self._record(line.iteration, lambda r: line.index in r.test)
            outputs = record.test.setdefault(line.index, {})
            self._block = _Block((TEST_OUTPUT, TEST_LOSS), record, outputs,
                                 lambda name: test_quantity(line.index, name))
            return None
        if line.kind == LOSS:
            record = self._record(line.iteration, lambda r: r.loss is not None)
            record.loss = line.value
            self._block = _Block((TRAIN_OUTPUT,), record, record.train, train_quantity)
        else:
            record = self._record(line.iteration, lambda r: r.lr is not None)
            record.lr = line.value
        return Point(record.iteration, line.kind, line.value)  # the kinds loss and lr name their quantities

    def _output(self, line: Line) -> Point | None:
        block = self._block
        if block is None or line.kind not in block.kinds:
            return None  # no loss or `Testing net` line of its kind before it: the start of the log is missing
        name = TOTAL_TEST_LOSS if line.kind == TEST_LOSS else _element_name(block.outputs, line.name)
        block.outputs[name] = line.value
        return Point(block.record.iteration, block.quantity(name), line.value)

    def _record(self, iteration: int, taken: Callable[[Record], bool]) -> Record:
        """The record of `iteration` in the current run, or in a new run when the iterations went
        back or `taken` says the current run already has this line for it."""
        if not self._runs:
            self._runs.append(Run())
        records = self._runs[-1].records
        if records and (iteration < records[-1].iteration or (iteration == records[-1].iteration
                                                              and taken(records[-1]))):
            records = []
            self._runs.append(Run(records))
        if not records or records[-1].iteration < iteration:
            records.append(Record(iteration))
        return records[-1]


def _element_name(outputs: dict[str, float], name: str) -> str:
    """`name` for a blob's first element, `name[k]` for the k-th after it."""
    if name not in outputs:
        return name
    k = 1
    while f"{name}[{k}]" in outputs:
        k += 1
    return f"{name}[{k}]"


def read_log(path: Union[str, Path]) -> list[Run]:
    """The runs of a training log file; a LogError when it has no iteration lines."""
    log = TrainingLog()
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            log.feed(line)
    if not log.runs:
        raise LogError(f"{path}: no training lines in it (`Iteration N, loss = X` and the like): "
                       "not a training log of rloss or caffe.bin, or one that stopped before its first iteration")
    return log.runs
