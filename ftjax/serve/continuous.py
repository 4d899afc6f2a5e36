"""Continuous batching (as JetStream / vLLM do): a fixed number of decode slots, each its own row.

One scheduler thread loops: new requests are prefilled (one jitted call each) into free slots,
then one jitted ``step`` advances every live slot by a token, and a row that finished (stop
token or string, ``max_new_tokens``, a client gone) frees its slot at once for the next request,
instead of waiting for the whole batch. Sampling, seeds, stop strings and results are those of
``Generator`` (a row's ``k``-th draw uses ``fold_in(seed, k)`` whatever else is decoding).
The slot cache grows by shape buckets (slots, length: powers of two) as rows need it; when
idle its rows are released and its length is kept, so a server settles on a few shapes. With
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
    length: int  # cache entries of the slot (its next write index)
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
        self._live: dict[int, _Live] = {}
        self._cache: device.Slots | None = None
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
                self._cache = None  # idle: free the rows; the next burst starts with one
                self._admit(*self._queue.get())
            while len(self._live) < self.slots:
                try:
                    self._admit(*self._queue.get_nowait())
                except queue.Empty:
                    break
            if self._live:
                self._step()

    def _admit(self, request: Request, future: Future, submitted: float) -> None:
        """Prefill ``request`` into the lowest free slot and emit its first token."""
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
            slot = min(set(range(self.slots)) - set(self._live))
            self._fit(slot + 1, t + 1)
            first, kv = device.prefill(gen.graphdef, gen.state, ids, mask,
                                       np.array([request.adapter], np.int32),
                                       SamplingArrays.stack([request.params]))
            self._cache = device.insert(self._cache, kv, np.int32(slot))
            first = int(np.asarray(first)[0])
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            future.set_exception(e)
            return
        row = Row(TextStream(gen.tokenizer, request.params.stop), request.on_text,
                  set(gen.stop_ids(request.params)), request.cancelled)
        self._live[slot] = _Live(request, future, row, submitted, length=t, position=n - 1)
        self._emit(slot, first)

    def _fit(self, slots: int, length: int) -> None:
        """Grow the slot cache (by buckets) to hold at least ``slots`` rows of ``length``."""
        gen = self.generator
        self._length = max(self._length, min(bucket(length, 1), max(gen.max_len, length)))
        want = (min(bucket(slots, 1), self.slots), self._length)
        if self._cache is None:
            self._cache = device.empty(gen.cfg, *want)
            return
        want = (max(want[0], self._cache.shape[0]), want[1])
        if want != self._cache.shape:
            self._cache = device.resize(self._cache, slots=want[0], length=want[1])

    def _warmup(self, tokens: int) -> None:
        """Compile every prefill, insert, resize and step a request of up to ``tokens`` (prompt +
        new tokens) needs, and start the cache at the length they fit in."""
        gen = self.generator
        self._length = length = min(bucket(tokens, self._length), gen.max_len)
        sizes = sorted({min(bucket(n, 1), self.slots) for n in range(1, self.slots + 1)})
        prompts = [t for t in (gen.min_prompt_bucket << i for i in range(32)) if t < length]
        params = SamplingArrays.stack([SamplingParams()])
        for n in sizes:
            cache = device.empty(gen.cfg, n, length)
            for t in prompts:
                ids = np.full((1, t), gen.pad_id, np.int32)
                _, kv = device.prefill(gen.graphdef, gen.state, ids, np.ones_like(ids),
                                       np.zeros(1, np.int32), params)
                cache = device.insert(cache, kv, np.int32(0))
            zeros = np.zeros(n, np.int32)
            _, cache = device.step(gen.graphdef, gen.state, cache, zeros, zeros, zeros, zeros,
                                   zeros, SamplingArrays.stack([SamplingParams()] * n))
            for bigger in sizes[sizes.index(n) + 1:]:
                device.resize(cache, slots=bigger, length=length)

    def _step(self) -> None:
        """One decode step of every live slot."""
        gen = self.generator
        live = self._live
        self._fit(max(live) + 1, max(r.length for r in live.values()) + 1)
        n = self._cache.shape[0]
        tokens, positions, lengths, adapters, steps = (np.zeros(n, np.int32) for _ in range(5))
        params = [SamplingParams()] * n
        for slot, r in live.items():
            tokens[slot], positions[slot], lengths[slot] = r.tokens[-1], r.position + 1, r.length
            adapters[slot], steps[slot], params[slot] = (r.request.adapter, len(r.tokens),
                                                         r.request.params)
        try:
            drawn, self._cache = device.step(gen.graphdef, gen.state, self._cache, tokens,
                                             positions, lengths, adapters, steps,
                                             SamplingArrays.stack(params))
            drawn = np.asarray(drawn)
        except Exception as e:  # noqa: BLE001 - fail the rows on the device, keep serving
            log.exception("decode step failed")
            for r in live.values():
                r.future.set_exception(e)
            live.clear()
            self._cache = None
            return
        for slot, r in list(live.items()):
            r.length, r.position = r.length + 1, r.position + 1
            self._emit(slot, int(drawn[slot]))

    def _emit(self, slot: int, token: int) -> None:
        """Record ``slot``'s new token; finish the row (freeing the slot) when it is done."""
        r = self._live[slot]
        r.tokens.append(token)
        if r.ttft_s is None:
            r.ttft_s = time.perf_counter() - r.submitted
        by_token = token in r.row.stop_ids
        if r.textual and not by_token:
            r.row.send(r.row.stream.push(token))
        if not (by_token or len(r.tokens) >= r.request.params.max_new_tokens
                or r.row.stream.stopped or r.request.cancelled.is_set()):
            return
        del self._live[slot]
        try:
            result = finish(self.generator.tokenizer, r.row, r.tokens, len(r.request.prompt),
                            streamed=r.textual)
        except Exception as e:  # noqa: BLE001 - e.g. a listener that raised
            r.future.set_exception(e)
            return
        r.future.set_result(dataclasses.replace(result, ttft_s=r.ttft_s))
