"""The OpenAI wire format: request validation into ``SamplingParams`` and response bodies.

Every bad request becomes an ``APIError`` carrying the HTTP status and OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``; nothing here touches the model.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from ftjax.generate import Generation, SamplingParams

MAX_STOP_STRINGS = 4


@dataclasses.dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)  # e.g. 405's ``Allow``

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _number(body: dict, name: str, default: float, lo: float, hi: float, *,
            integer: bool = False, lo_open: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value != value:
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, "
                            f"got {value!r}", param=name, code="invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise APIError(400, f"'{name}' must be in {bound}, got {value!r}", param=name,
                       code="invalid_value")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most "
                            f"{MAX_STOP_STRINGS} non-empty strings", param="stop",
                       code="invalid_value")
    return tuple(stops)


UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions")


def reject_unsupported(body: dict) -> None:
    """A 400 for features this server does not implement, rather than silently ignoring them."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0, "", [], {}):
            raise APIError(400, f"'{name}' is not supported by this server", param=name,
                           code="unsupported_parameter")
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise APIError(400, f"only {name}=1 is supported", param=name,
                           code="unsupported_parameter")


def sampling_params(body: dict, *, default_max_tokens: int, max_tokens_key: str = "max_tokens"
                    ) -> SamplingParams:
    """``SamplingParams`` from OpenAI fields (plus vLLM's ``top_k`` and ``ignore_eos``), each
    checked and named on error."""
    reject_unsupported(body)
    key = max_tokens_key if body.get(max_tokens_key) is not None else "max_tokens"
    return SamplingParams(
        max_new_tokens=_number(body, key, default_max_tokens, 1, 1 << 20, integer=True),
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        top_k=_number(body, "top_k", 0, 0, 1 << 20, integer=True),
        seed=_number(body, "seed", 0, 0, (1 << 32) - 1, integer=True),
        stop=_stop(body), stop_token_ids=() if flag(body, "ignore_eos") else None)


def flag(body: dict, name: str) -> bool:
    """An optional boolean field (default False)."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be a boolean", param=name, code="invalid_type")
    return value


def require(body: dict, name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """A required field of the given JSON type."""
    if name not in body:
        raise APIError(400, f"missing required parameter '{name}'", param=name,
                       code="missing_required_parameter")
    if not isinstance(body[name], kind) or isinstance(body[name], bool):
        raise APIError(400, f"'{name}' must be {what}", param=name, code="invalid_type")
    return body[name]


def chat_messages(body: dict) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content"}]`` with string (or text-part) contents."""
    messages = require(body, "messages", list, "a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            content = "".join(parts) if all(isinstance(p, str) for p in parts) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must have a string 'role' and text 'content'",
                           param=f"messages[{i}]", code="invalid_value")
        out.append({"role": m["role"], "content": content})
    if not out:
        raise APIError(400, "'messages' must not be empty", param="messages", code="invalid_value")
    return out


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(gens: list[Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in gens)
    completion = sum(len(g.tokens) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion_body(rid: str, model: str, gens: list[Generation]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": g.text, "logprobs": None,
                         "finish_reason": g.finish_reason} for i, g in enumerate(gens)],
            "usage": usage(gens)}


def chat_body(rid: str, model: str, gen: Generation) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "logprobs": None, "finish_reason": gen.finish_reason}],
            "usage": usage([gen])}


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish_reason: str | None
               ) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]}
