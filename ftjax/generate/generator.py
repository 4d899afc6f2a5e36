"""Host side of generation: tokenise, bucket, pad left, run the jitted decoder, detokenise.

Shapes are bucketed (batch to a power of two up to ``max_batch``, prompt and new-token lengths
to powers of two) so a server compiles once per bucket, not per request.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from ftjax.generate.decode import decode
from ftjax.generate.sampling import SamplingArrays, SamplingParams
from ftjax.generate.text import TextStream


@dataclasses.dataclass
class Request:
    """One prompt to continue; ``on_text`` receives the text as it becomes final (streaming).

    Setting ``cancelled`` ends a streaming row at the next step (e.g. its client went away).
    ``adapter`` picks one of the adapters a multi-adapter server holds (0: the base model).
    """
    prompt: Sequence[int]
    params: SamplingParams = SamplingParams()
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    adapter: int = 0


@dataclasses.dataclass
class Generation:
    text: str
    tokens: list[int]  # generated ids (a final stop token excluded)
    finish_reason: str  # "stop" (stop token or string) | "length"
    prompt_tokens: int
    ttft_s: float | None = None  # submission to first token, where the decoder measured it


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


def eos_ids(model: nnx.Module, tokenizer: Any) -> tuple[int, ...]:
    """End-of-sequence ids: the model config's and the tokenizer's."""
    ids = model.model.cfg.eos_token_id
    ids = set(ids if isinstance(ids, tuple) else () if ids is None else (ids,))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


class Generator:
    """Batched KV-cache generation for a causal LM (``heads.CausalLM``) and its tokenizer."""

    def __init__(self, model: nnx.Module, tokenizer: Any, *, max_batch: int = 8,
                 min_prompt_bucket: int = 16, min_new_bucket: int = 16):
        self.tokenizer = tokenizer
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.model.cfg
        self.max_len = model.model.cfg.max_position_embeddings
        self.vocab_size = model.model.cfg.vocab_size
        self.max_batch, self.min_prompt_bucket, self.min_new_bucket = (
            max_batch, min_prompt_bucket, min_new_bucket)
        self.eos_ids = eos_ids(model, tokenizer)
        self.pad_id = next((i for i in (getattr(tokenizer, "pad_token_id", None),
                                        *self.eos_ids) if i is not None), 0)
        self._lock = threading.Lock()  # one batch on the device at a time
        self._rows: list[Row] = []  # the batch on the device, for the step callback

    # -- prompts ---------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt (with the tokenizer's own special tokens)."""
        return list(self.tokenizer(text)["input_ids"])

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template, ready to answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        return list(self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                       tokenize=True, return_dict=True)["input_ids"])

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` when the prompt is empty or it and its new tokens overflow the
        context."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens "
                             f"({params.max_new_tokens}) exceeds the context of {self.max_len}")

    # -- generation ------------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Continue every request, ``max_batch`` rows per jitted call."""
        out: list[Generation] = []
        for i in range(0, len(requests), self.max_batch):
            out += self._generate_batch(requests[i:i + self.max_batch])
        return out

    def complete(self, prompts: Sequence[str], params: SamplingParams = SamplingParams()
                 ) -> list[Generation]:
        """Text in, text out: continue each plain-text prompt."""
        return self.generate([Request(self.encode(p), params) for p in prompts])

    def _shapes(self, requests: Sequence[Request]) -> tuple[int, int, int]:
        """(batch, prompt length, cache length) buckets that fit every request."""
        longest = max(len(r.prompt) for r in requests)
        new = max(r.params.max_new_tokens for r in requests)
        t = bucket(longest, self.min_prompt_bucket)
        cache_len = min(t + bucket(new, self.min_new_bucket), self.max_len)
        if cache_len - t < new:  # the bucketed prompt leaves too little room: pad less
            t = max(longest, cache_len - new)
        return bucket(len(requests), 1), t, cache_len

    def stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
        """The tokens that end a row: its own ``stop_token_ids``, else the EOS ids."""
        return self.eos_ids if params.stop_token_ids is None else params.stop_token_ids

    def _generate_batch(self, requests: Sequence[Request]) -> list[Generation]:
        for r in requests:
            self.check(r.prompt, r.params)
            if r.adapter:
                raise ValueError("per-request adapters need the continuous batcher "
                                 "(ftjax.serve.continuous)")
        b, t, cache_len = self._shapes(requests)
        ids = np.full((b, t), self.pad_id, np.int32)
        mask = np.zeros((b, t), np.int32)
        for row, r in enumerate(requests):
            ids[row, t - len(r.prompt):], mask[row, t - len(r.prompt):] = r.prompt, 1
        params = [r.params for r in requests] + [SamplingParams()] * (b - len(requests))
        max_new = np.array([p.max_new_tokens for p in params], np.int32)
        max_new[len(requests):] = 0  # filler rows are done before they start
        stops = [self.stop_ids(p) for p in params]
        stop_ids = np.full((b, max(1, max(map(len, stops)))), -1, np.int32)
        for row, s in enumerate(stops):
            stop_ids[row, :len(s)] = s
        host = any(r.params.stop or r.on_text for r in requests)
        with self._lock:
            self._rows = [Row(TextStream(self.tokenizer, r.params.stop), r.on_text, set(s),
                               r.cancelled) for r, s in zip(requests, stops)]
            tokens, lengths = jax.device_get(decode(
                self.graphdef, self.state, ids, mask, max_new, SamplingArrays.stack(params),
                stop_ids, cache_len=cache_len, on_step=self._on_step if host else None))
            rows, self._rows = self._rows, []
        return [finish(self.tokenizer, row, tokens[i, :lengths[i]].tolist(), len(r.prompt),
                       streamed=host)
                for i, (r, row) in enumerate(zip(requests, rows))]

    def _on_step(self, step: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Host callback of the decode loop: feed streams and sinks; end rows at stop strings
        and cancelled rows."""
        done = np.zeros(tokens.shape, bool)
        for i, row in enumerate(self._rows):
            tok = int(tokens[i])
            if tok >= 0 and tok not in row.stop_ids:
                row.send(row.stream.push(tok))
            done[i] = row.stream.stopped or row.cancelled.is_set()
        return done


@dataclasses.dataclass
class Row:
    """Per-row host state while a row decodes."""
    stream: TextStream
    sink: Callable[[str], None] | None
    stop_ids: set[int]
    cancelled: threading.Event

    def send(self, text: str) -> None:
        if text and self.sink is not None:
            self.sink(text)


def finish(tokenizer: Any, row: Row, tokens: list[int], prompt_tokens: int,
           streamed: bool) -> Generation:
    """The finished row: text cut at a stop string, stop token dropped, finish reason.

    ``streamed``: the row's tokens went through its ``TextStream`` as they came.
    """
    by_token = bool(tokens) and tokens[-1] in row.stop_ids
    if by_token:
        tokens = tokens[:-1]
    reason = "stop" if by_token else "length"
    if not streamed:  # no stop strings, nobody listening: decode once
        return Generation(tokenizer.decode(tokens, skip_special_tokens=True), tokens, reason,
                          prompt_tokens)
    if row.stream.stopped:
        return Generation(row.stream.text, row.stream.ids, "stop", prompt_tokens)
    row.send(row.stream.finish())
    return Generation(row.stream.text, tokens, reason, prompt_tokens)
