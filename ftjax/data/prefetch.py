"""Batches built (and put on their devices) in a background thread while the step runs.

``Prefetcher(produce, state, transfer, depth)`` calls ``produce()`` (the next host batch),
records ``state()`` right after it (the source's position once that batch is drawn) and
``transfer`` s it (e.g. ``sharding.shard_batch``), keeping up to ``depth`` batches ready. The
loop's ``next()`` takes the oldest; ``get_state()`` is the position of the batch the loop last
took, not of the ones queued behind it, so a checkpoint resumes exactly where the steps stopped.
An error raised while building a batch is raised again, unchanged, by the ``next()`` that would
have returned it. ``depth=0`` builds each batch in the caller's thread, in ``next()``.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")

_POLL_S = 0.1  # how often a blocked producer checks whether it should stop


class Prefetcher(Generic[T]):
    """See the module docstring. Use as a context manager (or call ``close``) so the thread stops."""

    def __init__(self, produce: Callable[[], Any], state: Callable[[], Any],
                 transfer: Callable[[Any], T], depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth {depth}: must be >= 0 (0 = off)")
        self._produce, self._state, self._transfer = produce, state, transfer
        self._depth = depth
        self._consumed = state()  # nothing taken yet: the source's position now
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> "Prefetcher[T]":
        return self

    def _build(self) -> tuple[T, Any]:
        batch = self._produce()
        return self._transfer(batch), self._state()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item: tuple[str, Any] = ("ok", self._build())
            except BaseException as e:  # handed to the consumer, raised there
                item = ("error", e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if item[0] == "error":
                return

    def __next__(self) -> T:
        if self._failed:
            raise RuntimeError("the batch prefetcher failed earlier; its error was raised then")
        if self._depth == 0:
            batch, self._consumed = self._build()
            return batch
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ftjax-prefetch", daemon=True)
            self._thread.start()
        kind, value = self._queue.get()
        if kind == "error":
            self._failed = True
            self.close()
            raise value
        batch, self._consumed = value
        return batch

    def get_state(self) -> Any:
        """The source's position after the batch ``next()`` last returned (before any, its start)."""
        return self._consumed

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is building) and drop the queued batches."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(_POLL_S)
            self._thread = None
