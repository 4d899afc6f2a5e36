"""Continuous batching (as JetStream / vLLM do): a fixed number of decode slots, each its own row.

One scheduler thread loops: new requests are prefilled (one jitted call each) into free slots,
then one jitted ``step`` advances every live slot by a token, and a row that finished (stop
token or string, ``max_new_tokens``, a client gone) frees its slot at once for the next request,
instead of waiting for the whole batch. Sampling, seeds, stop strings and results are those of
``Generator`` (a row's ``k``-th draw uses ``fold_in(seed, k)`` whatever else is decoding).
The live rows are kept at the front of the slot cache (a finished row's slot takes the last live
row), and the step runs over a power-of-two bucket of them, so its cost follows the load: one
compile per bucket. The cache length grows by buckets (powers of two) as rows need it; when idle
the cache is released and its length is kept, so a server settles on a few shapes. With
``warmup_len`` every shape a request of up to that many tokens needs is compiled up front.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future

import numpy as np

from ftjax.generate import Generation, Generator, Request, SamplingParams
from ftjax.generate.generator import Row, bucket, finish
from ftjax.generate.sampling import SamplingArrays
from ftjax.generate.text import TextStream
from ftjax.serve import slots as device

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Live:
    """A request in a slot."""
    request: Request
    future: Future
    row: Row
    submitted: float
    length: int  # cache columns the row holds (its prompt bucket + the tokens fed since)
    position: int  # position of the last token
    tokens: list[int] = dataclasses.field(default_factory=list)
    ttft_s: float | None = None

    @property
    def textual(self) -> bool:
        """Whether tokens go through the text stream as they come (stop strings or a listener)."""
        return bool(self.request.params.stop or self.request.on_text)


class ContinuousBatcher:
    """Serves ``generator``'s model with ``slots`` decode slots; ``submit`` returns a future."""

    def __init__(self, generator: Generator, slots: int = 8, min_length: int = 64,
                 warmup_len: int = 0):
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        self.generator, self.slots = generator, slots
        self._queue: queue.Queue[tuple[Request, Future, float]] = queue.Queue()
        self._live: list[_Live] = []  # row i of the cache holds _live[i]
        self._cache: device.Slots | None = None
        self._index = 0  # steps taken on the cache's timeline: the next write is at index % length
        self._length = min_length  # the cache length to start from (grows, never shrinks)
        if warmup_len:
            self._warmup(warmup_len)
        threading.Thread(target=self._run, name="continuous-batcher", daemon=True).start()

    def submit(self, request: Request) -> "Future[Generation]":
        future: Future[Generation] = Future()
        self._queue.put((request, future, time.perf_counter()))
        return future

    @property
    def capacity(self) -> int:
        return self.slots

    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return self._queue.qsize()

    def slots_in_use(self) -> int:
        return len(self._live)

    # -- the scheduler ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._live:
                self._cache = None  # idle: free the rows; the next burst starts a new timeline
                self._admit(*self._queue.get())
            while len(self._live) < self.slots:
                try:
                    self._admit(*self._queue.get_nowait())
                except queue.Empty:
                    break
            if self._live:
                self._step()

    def _admit(self, request: Request, future: Future, submitted: float) -> None:
        """Prefill ``request`` into the first free slot and emit its first token."""
        gen = self.generator
        try:
            gen.check(request.prompt, request.params)
            n, max_new = len(request.prompt), request.params.max_new_tokens
            t = bucket(n, gen.min_prompt_bucket)
            if t + max_new > gen.max_len:  # the bucketed prompt leaves too little room: pad less
                t = max(n, gen.max_len - max_new)
            ids = np.full((1, t), gen.pad_id, np.int32)
            mask = np.zeros((1, t), np.int32)
            ids[0, t - n:], mask[0, t - n:] = request.prompt, 1
            self._fit(t + 1)
            first, kv = device.prefill(gen.graphdef, gen.state, ids, mask,
                                       np.array([request.adapter], np.int32),
                                       SamplingArrays.stack([request.params]))
            self._cache = device.insert(self._cache, kv, np.int32(len(self._live)),
                                        np.int32(self._index % self._cache.shape[1]))
            first = int(np.asarray(first)[0])
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            future.set_exception(e)
            return
        row = Row(TextStream(gen.tokenizer, request.params.stop), request.on_text,
                  set(gen.stop_ids(request.params)), request.cancelled)
        live = _Live(request, future, row, submitted, length=t, position=n - 1)
        if not self._emit(live, first):
            self._live.append(live)

    def _fit(self, length: int) -> None:
        """Make the slot cache (all ``slots`` rows) at least ``length`` long, by buckets."""
        gen = self.generator
        self._length = max(self._length, min(bucket(length, 1), max(gen.max_len, length)))
        if self._cache is None:
            self._cache, self._index = device.empty(gen.cfg, self.slots, self._length), 0
        elif self._length > (old := self._cache.shape[1]):
            self._cache = device.resize(self._cache, np.int32(self._index % old),
                                        length=self._length)
            self._index = old

    def _warmup(self, tokens: int) -> None:
        """Compile every prefill, insert, move and step a request of up to ``tokens`` (prompt +
        new tokens) needs, and start the cache at the length they fit in."""
        gen = self.generator
        self._length = length = min(bucket(tokens, self._length), gen.max_len)
        cache = device.empty(gen.cfg, self.slots, length)
        params = SamplingArrays.stack([SamplingParams()])
        for t in (t for t in (gen.min_prompt_bucket << i for i in range(32)) if t < length):
            ids = np.full((1, t), gen.pad_id, np.int32)
            _, kv = device.prefill(gen.graphdef, gen.state, ids, np.ones_like(ids),
                                   np.zeros(1, np.int32), params)
            cache = device.insert(cache, kv, np.int32(0), np.int32(0))
        cache = device.move(cache, np.int32(self.slots - 1), np.int32(0))
        for n in sorted({min(bucket(n, 1), self.slots) for n in range(1, self.slots + 1)}):
            zeros = np.zeros(n, np.int32)
            _, cache = device.step(gen.graphdef, gen.state, cache, np.int32(0), zeros, zeros,
                                   zeros, zeros, SamplingArrays.stack([SamplingParams()] * n))

    def _step(self) -> None:
        """One decode step of every live slot (over a bucket of the first rows)."""
        gen = self.generator
        live = self._live
        self._fit(max(r.length for r in live) + 1)
        n = min(bucket(len(live), 1), self.slots)
        tokens, positions, adapters, steps = (np.zeros(n, np.int32) for _ in range(4))
        params = [SamplingParams()] * n
        for i, r in enumerate(live):
            tokens[i], positions[i], adapters[i], steps[i], params[i] = (
                r.tokens[-1], r.position + 1, r.request.adapter, len(r.tokens), r.request.params)
        try:
            drawn, self._cache = device.step(
                gen.graphdef, gen.state, self._cache, np.int32(self._index % self._cache.shape[1]),
                tokens, positions, adapters, steps, SamplingArrays.stack(params))
            drawn = np.asarray(drawn)
        except Exception as e:  # noqa: BLE001 - fail the rows on the device, keep serving
            log.exception("decode step failed")
            for r in live:
                r.future.set_exception(e)
            live.clear()
            self._cache = None
            return
        self._index += 1
        for r in live:
            r.length, r.position = r.length + 1, r.position + 1
        self._release([i for i, r in enumerate(live) if self._emit(r, int(drawn[i]))])

    def _release(self, done: list[int]) -> None:
        """Free the ``done`` slots: the last live rows move into them, so live rows stay first."""
        live, gone = self._live, set(done)
        source = len(live) - 1
        for dest in sorted(gone):
            while source > dest and source in gone:
                source -= 1
            if source <= dest:
                break
            self._cache = device.move(self._cache, np.int32(source), np.int32(dest))
            live[dest] = live[source]
            source -= 1
        del live[len(live) - len(gone):]

    def _emit(self, r: _Live, token: int) -> bool:
        """Record ``r``'s new token; when the row is done, finish it and return True."""
        r.tokens.append(token)
        if r.ttft_s is None:
            r.ttft_s = time.perf_counter() - r.submitted
        by_token = token in r.row.stop_ids
        if r.textual and not by_token:
            r.row.send(r.row.stream.push(token))
        if not (by_token or len(r.tokens) >= r.request.params.max_new_tokens
                or r.row.stream.stopped or r.request.cancelled.is_set()):
            return False
        try:
            result = finish(self.generator.tokenizer, r.row, r.tokens, len(r.request.prompt),
                            streamed=r.textual)
        except Exception as e:  # noqa: BLE001 - e.g. a listener that raised
            r.future.set_exception(e)
            return True
        r.future.set_result(dataclasses.replace(result, ttft_s=r.ttft_s))
        return True
