"""How far a long loop has come and how long it still needs, for the log lines of `test` and `infer`
(the same estimate as the training log's Progress line: the mean time per item so far)."""

from __future__ import annotations

import time

from rloss.caffe_log import format_duration


class Progress:
    """Counts items done out of `total`; `advance()` says when a line is due: after `interval`
    seconds since the last one (0: every item) and at the last item."""

    def __init__(self, total: int, unit: str, interval: float):
        self.total, self.unit, self.interval = total, unit, interval
        self.done = 0
        self.start = self.last = time.perf_counter()

    def advance(self) -> str | None:
        """Count one item; the progress text when a line is due, else None."""
        self.done += 1
        now = time.perf_counter()
        if self.done < self.total and now - self.last < self.interval:
            return None
        self.last = now
        each = (now - self.start) / self.done
        left = format_duration(each * (self.total - self.done))
        return f"{self.done}/{self.total} {self.unit}, {each:.3g} s each, about {left} left"
