"""Log lines in Caffe's (glog's) format, so tools that parse Caffe training logs read ours unchanged.

Every line starts with `Lmmdd hh:mm:ss.uuuuuu threadid file:line] ` (L = I, W, E or F) and numbers
are written the way C++'s default `ostream << float` writes them (`caffe_number`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import TextIO

import numpy as np

LOGGER_NAME = "rloss"
_LEVEL_LETTERS = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
                  logging.CRITICAL: "F"}


def caffe_number(value: float) -> str:
    """`value` as C++'s default stream formatting prints it: 6 significant digits, `%g` rules
    (`1e-08`, `-1.5e+09`, `0.001`, `100000`, `1e+06`); nan and inf as glibc prints them."""
    value = float(value)
    if math.isnan(value):
        return "-nan" if math.copysign(1.0, value) < 0 else "nan"
    return f"{value:g}"


def caffe_float(value: float) -> str:
    """A float32 quantity (a Caffe `Dtype`) printed as Caffe prints it."""
    return caffe_number(float(np.float32(value)))


def loss_suffix(weight: float, value: float) -> str:
    """` (* w = w*v loss)` after the value of an output that is part of the objective."""
    if not weight:
        return ""
    return f" (* {caffe_float(weight)} = {caffe_float(np.float32(weight) * np.float32(value))} loss)"


class GlogFormatter(logging.Formatter):
    """`I1121 22:53:01.123456 12345 solver.py:123] message` (glog's prefix, month and day only)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        micros = int(round((record.created - seconds) * 1e6))
        if micros >= 1_000_000:
            seconds, micros = seconds + 1, micros - 1_000_000
        stamp = time.strftime("%m%d %H:%M:%S", time.localtime(seconds))
        letter = _LEVEL_LETTERS.get(record.levelno, "I")
        prefix = f"{letter}{stamp}.{micros:06d} {record.process} {record.filename}:{record.lineno}] "
        return prefix + record.getMessage()


def setup_logging(stream: TextIO | None = None, level: int = logging.INFO) -> logging.Handler:
    """Send rloss's log to `stream` (stderr by default, as caffe.bin does) in glog's format.

    Replaces a handler installed by an earlier call, so calling it twice does not double lines."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if getattr(handler, "_rloss_glog", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(GlogFormatter())
    handler._rloss_glog = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def format_duration(seconds: float) -> str:
    """`1h02m03s`, `4m05s` or `6s`: a compact remaining-time estimate."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
