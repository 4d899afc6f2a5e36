"""An OpenAI-compatible HTTP server on the standard library (``ThreadingHTTPServer``).

Each connection runs on its own thread; generation requests meet in the model's batcher
(continuous: ``ContinuousBatcher``, or static: ``BatchQueue``), so concurrent requests share
jitted decode steps. Streaming responses are server-sent events
fed by the decode loop's host callback. Every failure is an OpenAI-style JSON error (the stdlib's
own rejections included), and the server keeps serving. A deep listen backlog takes bursts of
connections instead of resetting them, and a per-connection socket timeout turns a client that
stops sending (a body shorter than its Content-Length) into a 400 instead of a hung thread.
Every answered request is counted in ``GET /metrics`` (Prometheus) and logged as one JSON line
(logger ``ftjax.serve.requests``); ``GET /health`` reports the models and their decode slots.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

from ftjax.generate import Generation, Request
from ftjax.serve import api
from ftjax.serve.api import APIError
from ftjax.serve.metrics import CONTENT_TYPE, Metrics
from ftjax.serve.models import ServedModel

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
READ_TIMEOUT_S = 5.0  # a client silent this long mid-request gets a 400 (or is dropped)
LISTEN_BACKLOG = 1024  # pending connections the kernel holds (capped by net.core.somaxconn)
ROUTES = {"/v1/models": "GET", "/health": "GET", "/metrics": "GET", "/v1/completions": "POST",
          "/v1/chat/completions": "POST", "/v1/classify": "POST"}
_DONE = object()  # end of a stream
CLIENT_GONE = 499  # the status logged for a client that went away (nginx's convention)


class App:
    """Routes and model ids; independent of the HTTP plumbing."""

    def __init__(self, models: Sequence[ServedModel], api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, default_max_tokens: int = 16):
        self.models = {m.name: m for m in models}
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.metrics = Metrics()
        for m in models:
            if m.queue is not None and m.adapter == 0:  # one batcher per base model
                self.metrics.watch(m.name, m.queue.queue_depth, m.queue.slots_in_use,
                                   m.queue.capacity)

    def model(self, body: dict, kind: str) -> ServedModel:
        """The requested model, which must be able to do ``kind`` ("generate" or "classify")."""
        name = api.require(body, "model", str, "a model id")
        if name not in self.models:
            raise APIError(404, f"the model '{name}' does not exist; available: "
                                f"{sorted(self.models)}", param="model", code="model_not_found")
        served = self.models[name]
        if (served.queue if kind == "generate" else served.classifier) is None:
            raise APIError(400, f"the model '{name}' cannot {kind} (it is a "
                                f"{'classifier' if served.classifier else 'causal LM'})",
                           param="model", code="unsupported_model")
        return served

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": {
            name: {"task": "classification" if m.classifier else "generation",
                   **({} if m.queue is None else {
                       "slots_in_use": m.queue.slots_in_use(), "slots": m.queue.capacity,
                       "queue_depth": m.queue.queue_depth()})}
            for name, m in self.models.items()}}

    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "ftjax",
             "task": "classification" if m.classifier else "generation"}
            for name, m in self.models.items()]}

    def classify(self, body: dict) -> dict[str, Any]:
        served = self.model(body, "classify")
        inputs = api.require(body, "input", (str, list), "a string or a list of strings")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "'input' must be a string or a non-empty list of strings",
                           param="input", code="invalid_value")
        try:
            probs = served.classifier.classify(texts)
        except ValueError as e:
            raise APIError(400, str(e), param="input", code="context_length_exceeded") from e
        return {"object": "list", "model": served.name, "data": [
            {"index": i, "label": max(p, key=p.get), "probabilities": p}
            for i, p in enumerate(probs)]}

    def prepare(self, path: str, body: dict) -> tuple[ServedModel, list[Request], bool]:
        """Validate a (chat) completion request into decoder requests; nothing runs yet."""
        served = self.model(body, "generate")
        gen = served.generator
        chat = path == "/v1/chat/completions"
        if chat:
            try:
                prompts = [gen.chat_prompt(api.chat_messages(body))]
            except ValueError as e:  # no chat template
                raise APIError(400, str(e), param="messages", code="unsupported_model") from e
            # OpenAI's chat default is "the rest of the context"; cap it to keep batches short.
            default = max(1, min(512, gen.max_len - len(prompts[0])))
        else:
            prompts, default = self._prompts(gen, body), self.default_max_tokens
        params = api.sampling_params(body, default_max_tokens=default,
                                     max_tokens_key="max_completion_tokens")
        requests = [Request(p, params, adapter=served.adapter) for p in prompts]
        for r in requests:
            try:
                gen.check(r.prompt, params)
            except ValueError as e:
                raise APIError(400, str(e), param="messages" if chat else "prompt",
                               code="context_length_exceeded") from e
        stream = api.flag(body, "stream")
        if stream and len(requests) != 1:
            raise APIError(400, "streaming takes a single prompt", param="prompt")
        return served, requests, stream

    @staticmethod
    def _prompts(gen, body: dict) -> list[list[int]]:
        """``prompt``: a string, a list of strings, a token list or a list of token lists."""
        prompt = api.require(body, "prompt", (str, list), "a string, a list of strings or tokens")
        items = [prompt] if isinstance(prompt, str) or (
            prompt and all(isinstance(t, int) for t in prompt)) else prompt
        out = []
        for item in items:
            if isinstance(item, str) and item:
                out.append(gen.encode(item))
            elif isinstance(item, list) and item and all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < gen.vocab_size
                    for t in item):
                out.append(item)
            else:
                raise APIError(400, "'prompt' must be a non-empty string, a list of them or a "
                                    "list of token ids in the vocabulary", param="prompt",
                               code="invalid_value")
        if not out:
            raise APIError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
        return out


class Handler(BaseHTTPRequestHandler):
    """HTTP plumbing: auth, body limits, JSON, SSE; the ``App`` does the rest."""

    app: App  # set by ``make_server``
    server_version = "ftjax-serve"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s " + fmt, self.address_string(), *args)

    # -- responses -------------------------------------------------------------------------------

    def _send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        if status >= 400:
            self._record["error"] = body["error"]["code"] or body["error"]["type"]
        self._send(status, json.dumps(body).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self._record["status"] = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, error: APIError) -> None:
        self._send_json(error.status, error.body(), error.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own rejections (bad request line, unknown method, huge headers) as JSON."""
        self.close_connection = True
        self._begin()
        self._send_error(APIError(code, message or explain or HTTPStatus(code).phrase,
                                  type="server_error" if code >= 500 else "invalid_request_error"))
        self._end()

    def _event(self, payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    # -- requests --------------------------------------------------------------------------------

    def _authorize(self) -> None:
        if self.app.api_key is None:
            return
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.app.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise APIError(411, "a Content-Length header is required") from None
        if length > self.app.max_body_bytes:
            self.close_connection = True  # the body is never read
            raise APIError(413, f"request body of {length} bytes exceeds the limit of "
                                f"{self.app.max_body_bytes}", code="request_too_large")
        if length < 0:
            raise APIError(400, f"Content-Length must not be negative, got {length}")
        try:
            body = json.loads(self._read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def _read(self, length: int) -> bytes:
        """Exactly ``length`` body bytes, or a 400 when the client stops short of them."""
        data = bytearray()
        try:
            while len(data) < length and (chunk := self.rfile.read1(length - len(data))):
                data += chunk
        except TimeoutError:
            pass
        if len(data) < length:
            self.close_connection = True
            raise APIError(400, f"the request body ended after {len(data)} of its Content-Length "
                                f"{length} bytes (nothing more came within {self.timeout} s); "
                                f"send exactly Content-Length bytes", code="incomplete_body")
        return bytes(data)

    def _route(self) -> str:
        """The request's path, after a 404 for unknown paths and a 405 for wrong methods."""
        path = self.path.split("?", 1)[0]
        if path not in ROUTES:
            raise APIError(404, f"unknown path {self.path!r}", code="unknown_url")
        if self.command != ROUTES[path]:
            raise APIError(405, f"{self.command} is not allowed on {path}; use {ROUTES[path]}",
                           code="method_not_allowed", headers={"Allow": ROUTES[path]})
        return path

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def _other(self) -> None:
        self.close_connection = True  # any body is left unread
        self._guard(self._route)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = do_HEAD = _other

    def _guard(self, handle: Callable[[], None]) -> None:
        self._begin()
        try:
            self._authorize()
            handle()
        except APIError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            log.info("client went away or stopped reading")
            self.close_connection = True
            self._record.update(status=CLIENT_GONE, error="client_gone")
        except Exception as e:  # noqa: BLE001 - a server error must not kill the server
            log.exception("internal error")
            self._send_error(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                      type="server_error"))
        finally:
            self._end()

    def _begin(self) -> None:
        """Start this request's log record (the path only if it is a route: bounded labels)."""
        path = (self.path or "").split("?", 1)[0]
        self._record = {"event": "request", "method": self.command,
                        "path": path if path in ROUTES else "other", "status": None,
                        "model": None, "_start": time.perf_counter()}

    def _end(self) -> None:
        record = self._record
        record["latency_s"] = round(time.perf_counter() - record.pop("_start"), 6)
        if record["status"] is not None:
            self.app.metrics.observe(record)

    def _get(self) -> None:
        path = self._route()
        if path == "/metrics":
            return self._send(200, self.app.metrics.exposition(), CONTENT_TYPE)
        self._send_json(200, self.app.list_models() if path == "/v1/models" else self.app.health())

    def _post(self) -> None:
        path = self._route()
        body = self._body()
        name = body.get("model")
        self._record["model"] = name if isinstance(name, str) and name in self.app.models else None
        if path == "/v1/classify":
            return self._send_json(200, self.app.classify(body))
        served, requests, stream = self.app.prepare(path, body)
        chat = path == "/v1/chat/completions"
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        self._record.update(id=rid, stream=stream)
        if stream:
            return self._stream(served, requests[0], rid, chat)
        gens = [f.result() for f in [served.queue.submit(r) for r in requests]]
        self._count(gens)
        self._send_json(200, api.chat_body(rid, served.name, gens[0]) if chat
                        else api.completion_body(rid, served.name, gens))

    def _count(self, gens: list[Generation]) -> None:
        self._record.update(prompt_tokens=sum(g.prompt_tokens for g in gens),
                            completion_tokens=sum(len(g.tokens) for g in gens),
                            ttft_s=min((g.ttft_s for g in gens if g.ttft_s is not None),
                                       default=None))

    def _stream(self, served: ServedModel, request: Request, rid: str, chat: bool) -> None:
        """Server-sent events: one chunk per piece of final text, then the finish reason."""
        pieces: queue.Queue = queue.Queue()
        request.on_text = pieces.put
        future = served.queue.submit(request)
        future.add_done_callback(lambda _: pieces.put(_DONE))
        self._record["status"] = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True
        chunk = (lambda text, reason: api.chat_chunk(rid, served.name, text, reason)) if chat else \
            (lambda text, reason: api.completion_chunk(rid, served.name, text, reason))
        if chat:
            self._event(chunk({"role": "assistant", "content": ""}, None))
        try:
            while (piece := pieces.get()) is not _DONE:
                self._event(chunk({"content": piece} if chat else piece, None))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            request.cancelled.set()  # stop decoding for a client that is gone
            raise
        if future.exception() is not None:  # headers are sent: report in-band
            log.error("generation failed", exc_info=future.exception())
            self._record.update(status=500, error="generation_failed")
            self._event(APIError(500, f"generation failed: {future.exception()}",
                                 type="server_error").body())
            return
        gen: Generation = future.result()
        self._count([gen])
        self._event(chunk({} if chat else "", gen.finish_reason))
        self._event("[DONE]")


class Server(ThreadingHTTPServer):
    """One daemon thread per connection, behind a listen backlog deep enough for bursts (the
    stdlib's default of 5 resets connections as soon as a few arrive together)."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000, *,
                read_timeout_s: float = READ_TIMEOUT_S) -> Server:
    """A threading HTTP server for ``app`` (not started: call ``serve_forever``).

    ``read_timeout_s`` bounds every socket read and write of a connection.
    """
    handler = type("BoundHandler", (Handler,), {"app": app, "timeout": read_timeout_s})
    return Server((host, port), handler)
