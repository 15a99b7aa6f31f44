"""Writing measured steps off the training thread: one writer thread per Monitor, one step in flight.

The training thread hands over a MeasureResult (host arrays) and goes on; the writer thread builds the
step's summaries, writes them and waits until they are in the event file. A step is handed over only
once the previous one is written, so a crash loses at most the step being written. Writing competes
with training for the GIL: a thread that keeps it makes the training thread wait a whole switch
interval (5 ms) each time a torch op returns, so the writer works in slices of ~0.1 ms and sleeps
between them, unless someone is waiting for the write.
"""
from __future__ import annotations

import queue
import threading
import time
import warnings

from .result import MeasureResult
from .summary import SummaryEmitter

__all__ = ["BackgroundWriter", "close_at_exit"]


class _Pacer:
    """Called between small pieces of the writer's work: sleeps PAUSE after each WORK seconds of it."""

    WORK = 1e-4
    PAUSE = 3e-4

    def __init__(self, hurry: threading.Event):
        self._hurry = hurry
        self._since = time.perf_counter()

    def __call__(self) -> None:
        if time.perf_counter() - self._since < self.WORK or self._hurry.is_set():
            return
        time.sleep(self.PAUSE)
        self._since = time.perf_counter()


class BackgroundWriter:
    """Writes each handed-over step through ``emitter`` on its own daemon thread, one step at a time.

    A failed write is kept, with its step, until ``failure``, ``wait`` or ``close`` returns it.
    """

    def __init__(self, emitter: SummaryEmitter):
        self._emitter = emitter
        self._jobs: queue.SimpleQueue[tuple[MeasureResult, int] | None] = queue.SimpleQueue()
        self._idle = threading.Event()  # no step in flight
        self._idle.set()
        self._hurry = threading.Event()  # someone waits: stop pausing
        self._failure: tuple[int, Exception] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="tm_tensorboard writer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._write(*job)
            finally:
                del job  # the result is not kept until the next step
                self._idle.set()

    def _write(self, result: MeasureResult, step: int) -> None:
        try:
            self._emitter.write_result(result, step, pace=_Pacer(self._hurry))
        except Exception as error:
            self._failure = (step, error)

    def submit(self, result: MeasureResult, step: int) -> None:
        """Hand ``result`` at ``step`` to the writer thread; waits first for the step in flight, if any."""
        if self._closed:
            raise RuntimeError("this BackgroundWriter is closed")
        self._finish()
        self._hurry.clear()
        self._idle.clear()
        self._jobs.put((result, step))

    def failure(self) -> tuple[int, Exception] | None:
        """(step, error) of a finished write that failed, once; None otherwise. Does not wait."""
        if not self._idle.is_set():
            return None
        failure, self._failure = self._failure, None
        return failure

    def _finish(self) -> None:
        if not self._idle.is_set():
            self._hurry.set()
            self._idle.wait()

    def wait(self) -> tuple[int, Exception] | None:
        """Wait until the step in flight is written (at full speed from now on), then ``failure()``."""
        self._finish()
        return self.failure()

    def close(self) -> tuple[int, Exception] | None:
        """``wait()``, then stop the thread."""
        failure = self.wait()
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
            self._thread.join()
        return failure


def close_at_exit(writer: BackgroundWriter) -> None:
    """Close ``writer`` for a Monitor that was not closed (garbage-collected, or alive at interpreter exit)."""
    failure = writer.close()
    if failure is not None:
        warnings.warn(f"tm_tensorboard: writing step {failure[0]} failed: {failure[1]!r}", RuntimeWarning)
