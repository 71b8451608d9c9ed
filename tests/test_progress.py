"""rloss.progress.Progress, the estimate behind the Progress lines of train, test and infer."""

from __future__ import annotations

import re

import pytest

from rloss import progress


@pytest.fixture
def clock(monkeypatch):
    """A perf_counter that the test moves by hand."""
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    return now


def test_the_estimate_is_the_mean_time_per_item_so_far(clock) -> None:
    counter = progress.Progress(10, "iterations", interval=5.0)
    lines = []
    for seconds in (1.0, 3.0, 2.0):  # uneven items: the mean, 2 s, not the last one's time
        clock[0] += seconds
        lines.append(counter.advance())
    assert lines[:2] == [None, None]  # 1 s and 4 s after the start: no line due before 5 s
    assert lines[2] == "3/10 iterations, 2 s each, about 14s left"
    assert counter.status() == lines[2]


def test_a_resumed_loop_counts_from_where_it_starts(clock) -> None:
    counter = progress.Progress(100, "iterations", done=90)
    clock[0] += 4.0
    line = counter.advance()  # interval 0: every item
    assert line == "91/100 iterations, 4 s each, about 36s left"


def test_the_last_item_always_gets_a_line(clock) -> None:
    counter = progress.Progress(2, "images", interval=3600.0)
    clock[0] += 1.0
    assert counter.advance() is None
    clock[0] += 1.0
    assert re.fullmatch(r"2/2 images, 1 s each, about 0s left", counter.advance())
