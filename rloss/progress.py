"""How far a long loop has come and how long it still needs, for the Progress lines of `train`, `test` and
`infer`: the mean time per item so far, times the items left."""

from __future__ import annotations

import time

from rloss.caffe_log import format_duration


class Progress:
    """Counts items done out of `total` (from `done`, for a resumed loop); `advance()` says when a line
    is due: after `interval` seconds since the last one (0: every item) and at the last item."""

    def __init__(self, total: int, unit: str, interval: float = 0.0, done: int = 0):
        self.total, self.unit, self.interval = total, unit, interval
        self.done = self.first = done
        self.start = self.last = time.perf_counter()

    def advance(self) -> str | None:
        """Count one item; the progress text when a line is due, else None."""
        self.done += 1
        now = time.perf_counter()
        if self.done < self.total and now - self.last < self.interval:
            return None
        self.last = now
        return self.status()

    def status(self) -> str:
        """The progress text now: items done, seconds per item so far, the time left at that pace."""
        each = (time.perf_counter() - self.start) / max(1, self.done - self.first)
        left = format_duration(each * max(0, self.total - self.done))
        return f"{self.done}/{self.total} {self.unit}, {each:.3g} s each, about {left} left"
