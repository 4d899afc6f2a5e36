"""Static batching: requests that arrive together share one jitted decode call, which runs until
its last row finishes (``ftjax.serve.continuous`` frees each row's slot as soon as it is done)."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

from ftjax.generate import Generation, Generator, Request


class BatchQueue:
    """Collects requests for up to ``wait_s`` (or ``generator.max_batch`` of them) per batch.

    While a batch decodes, newcomers queue up and form the next batch, so load batches itself.
    """

    def __init__(self, generator: Generator, wait_s: float = 0.005):
        self.generator, self.wait_s = generator, wait_s
        self._queue: queue.Queue[tuple[Request, Future]] = queue.Queue()
        self._running = 0  # rows of the batch on the device
        threading.Thread(target=self._run, name="batch-queue", daemon=True).start()

    def submit(self, request: Request) -> "Future[Generation]":
        future: Future[Generation] = Future()
        self._queue.put((request, future))
        return future

    @property
    def capacity(self) -> int:
        return self.generator.max_batch

    def queue_depth(self) -> int:
        """Requests waiting for the next batch."""
        return self._queue.qsize()

    def slots_in_use(self) -> int:
        return self._running

    def _next_batch(self) -> list[tuple[Request, Future]]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.generator.max_batch:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            self._running = len(batch)
            try:
                results = self.generator.generate([request for request, _ in batch])
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for _, future in batch:
                    future.set_exception(e)
                continue
            finally:
                self._running = 0
            for (_, future), result in zip(batch, results):
                future.set_result(result)
