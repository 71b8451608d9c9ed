"""Loading batches ahead of the net in background threads, in a timing-independent order.

The consumer plans every batch (which samples, which random seeds) in its own thread, so the data a
run sees depends only on the seed, never on how fast the workers are; the workers only do the work
(decoding releases the GIL, so threads overlap with the net's forward and backward).

For an exact resume the consumer also hands in `capture`, which snapshots its planning state; the
prefetcher keeps, with every batch in flight, the state from before that batch was planned, so
`consumed_state()` is the position after the batches `next()` has returned, whatever has been read
ahead; `restart()` drops the batches in flight and plans again from a restored state.

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
    the oldest batch's results in plan order, re-raising a worker's error. `capture()` (optional,
    consumer thread) returns a snapshot of what `plan` draws from.

    `waited_seconds` adds up the time `next()` spent blocked on unfinished work."""

    def __init__(self, plan: Callable[[], Sequence[Any]], load: Callable[[Any], Any], depth: int = 5,
                 workers: int | None = None, name: str = "rloss-data",
                 capture: Callable[[], Any] | None = None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.plan = plan
        self.load = load
        self.capture = capture
        self.depth = depth
        self.waited_seconds = 0.0
        self.closed = False
        self._closed_state: Any = None  # consumed_state() as of close()
        # per batch in flight: the planning state captured before it was planned, and its futures
        self._pending: collections.deque[tuple[Any, list[Future]]] = collections.deque()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=_work, args=(self._tasks,), name=f"{name}-{i}", daemon=True)
                         for i in range(workers or default_workers())]
        for thread in self._threads:
            thread.start()
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self.depth:
            self._submit_next()

    def _submit_next(self) -> None:
        state = self.capture() if self.capture is not None else None
        futures = []
        for item in self.plan():
            future: Future = Future()
            self._tasks.put((future, self.load, item))
            futures.append(future)
        self._pending.append((state, futures))

    def next(self) -> list[Any]:
        """The next batch's results (blocking until they are ready)."""
        self._check_open()
        _, futures = self._pending.popleft()
        self._submit_next()
        start = time.perf_counter()
        try:
            return [future.result() for future in futures]
        finally:
            self.waited_seconds += time.perf_counter() - start

    def consumed_state(self) -> Any:
        """The planning state right after the last batch `next()` returned (what `capture()` gave
        before the oldest batch still in flight was planned), not the read-ahead position; after
        `close()`, the one at closing."""
        return self._closed_state if self.closed else self._pending[0][0]

    def restart(self) -> None:
        """Drop the batches in flight and plan `depth` new ones from the planner's current state
        (after the consumer restored it); work already running finishes unread."""
        self._check_open()
        self._cancel_pending()
        self._fill()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the prefetcher is closed")

    def _cancel_pending(self) -> None:
        for _, futures in self._pending:
            for future in futures:
                future.cancel()
        self._pending.clear()

    def close(self) -> None:
        """Cancel the work not yet started and wait for the threads to finish the sample each may be
        decoding (idempotent). Joining matters at exit: a daemon thread still inside a decoder when
        the interpreter finalizes is killed there, which can abort the process."""
        if self.closed:
            return
        self._closed_state = self.consumed_state()
        self.closed = True
        self._cancel_pending()
        for _ in self._threads:
            self._tasks.put(_STOP)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
