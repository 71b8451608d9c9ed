"""Loading batches ahead of the net in background threads, in a timing-independent order.

The consumer plans every batch (which samples, which random seeds) in its own thread, so the data a
run sees depends only on the seed, never on how fast the workers are; the workers only do the work
(decoding releases the GIL, so threads overlap with the net's forward and backward).

The workers are daemon threads of our own rather than a `ThreadPoolExecutor`: at interpreter exit
the executor's threads are joined after running every queued item, which would make a finished run
wait for up to `depth` batches it no longer needs. `close()` cancels what has not started.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence

_STOP = object()


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _work(tasks: queue.SimpleQueue) -> None:
    """A worker: run tasks until told to stop; results and errors go to the task's Future."""
    while True:
        task = tasks.get()
        if task is _STOP:
            return
        future, function, argument = task
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(function(argument))
        except BaseException as error:  # handed to the consumer, who re-raises it
            future.set_exception(error)


class Prefetcher:
    """Keeps `depth` batches in flight. `plan()` (called in the consumer thread) returns the items
    of the next batch; `load(item)` (called in a worker) produces one item's result; `next()` returns
    the oldest batch's results in plan order, re-raising a worker's error.

    `waited_seconds` adds up the time `next()` spent blocked on unfinished work."""

    def __init__(self, plan: Callable[[], Sequence[Any]], load: Callable[[Any], Any], depth: int = 5,
                 workers: int | None = None, name: str = "rloss-data"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.plan = plan
        self.load = load
        self.depth = depth
        self.waited_seconds = 0.0
        self.closed = False
        self._pending: collections.deque[list[Future]] = collections.deque()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=_work, args=(self._tasks,), name=f"{name}-{i}", daemon=True)
                         for i in range(workers or default_workers())]
        for thread in self._threads:
            thread.start()
        while len(self._pending) < depth:
            self._submit_next()

    def _submit_next(self) -> None:
        futures = []
        for item in self.plan():
            future: Future = Future()
            self._tasks.put((future, self.load, item))
            futures.append(future)
        self._pending.append(futures)

    def next(self) -> list[Any]:
        """The next batch's results (blocking until they are ready)."""
        if self.closed:
            raise RuntimeError("the prefetcher is closed")
        futures = self._pending.popleft()
        self._submit_next()
        start = time.perf_counter()
        try:
            return [future.result() for future in futures]
        finally:
            self.waited_seconds += time.perf_counter() - start

    def close(self) -> None:
        """Cancel the work not yet started and let the threads end (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for futures in self._pending:
            for future in futures:
                future.cancel()
        self._pending.clear()
        for _ in self._threads:
            self._tasks.put(_STOP)
