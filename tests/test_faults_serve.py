"""The real server (scripts/serve.py) under faults: a burst of 64 simultaneous connections, wrong
HTTP methods and a body shorter than its Content-Length; the server must answer each in JSON and
keep serving. Greedy answers are checked against transformers itself."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import transformers

from test_serve import hf_greedy, save_tiny, start_server, word_tokenizer

READ_TIMEOUT_S = 2.0
BURST = 64
PROMPT = "the sea is"
MAX_TOKENS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(host, port, tiny LM) of a server started with a short read timeout."""
    root = tmp_path_factory.mktemp("serve_faults")
    lm = save_tiny(transformers.LlamaForCausalLM, root / "tiny-lm")
    proc, base = start_server(f"--model={root / 'tiny-lm'}", f"--read_timeout_s={READ_TIMEOUT_S}")
    host, port = base.split("http://")[1].split("/")[0].rsplit(":", 1)
    yield host, int(port), lm
    proc.terminate()
    proc.wait(timeout=30)


def request(host: str, port: int, method: str, path: str, body: dict | None = None,
            timeout: float = 60) -> tuple[int, dict[str, str], dict]:
    """(status, headers, JSON body) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read())
    finally:
        conn.close()


def completion(host: str, port: int) -> tuple[int, dict[str, str], dict]:
    return request(host, port, "POST", "/v1/completions",
                   {"model": "tiny-lm", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                    "temperature": 0})


def burst(host: str, port: int, n: int) -> list[tuple[int, str] | Exception]:
    """``n`` completions whose connections all open at once: (status, text) or the exception."""
    results: list = [None] * n
    start = threading.Barrier(n)

    def one(i: int) -> None:
        start.wait()
        try:
            status, _, body = completion(host, port)
            results[i] = (status, body["choices"][0]["text"] if status == 200 else body)
        except Exception as e:  # noqa: BLE001 - counted by the caller
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def assert_serves(host: str, port: int, lm) -> None:
    status, _, body = completion(host, port)
    assert status == 200, body
    assert body["choices"][0]["text"] == hf_greedy(lm, word_tokenizer()(PROMPT)["input_ids"],
                                                   MAX_TOKENS)


def assert_openai_error(body: dict, code: str) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body


def test_a_burst_of_64_connections_is_answered_in_full(server):
    host, port, lm = server
    expected = hf_greedy(lm, word_tokenizer()(PROMPT)["input_ids"], MAX_TOKENS)
    results = burst(host, port, BURST)
    failed = [r for r in results if r != (200, expected)]
    assert not failed, f"{len(failed)} of {BURST} not answered correctly: {failed[:3]}"


@pytest.mark.parametrize("method,path,allow", [("DELETE", "/v1/models", "GET"),
                                               ("PUT", "/v1/completions", "POST"),
                                               ("PATCH", "/v1/chat/completions", "POST")])
def test_wrong_methods_get_a_json_405_with_allow(server, method, path, allow):
    host, port, lm = server
    status, headers, body = request(host, port, method, path, {})
    assert (status, headers.get("Allow")) == (405, allow), (status, headers)
    assert_openai_error(body, "method_not_allowed")
    assert method in body["error"]["message"] and path in body["error"]["message"]
    assert_serves(host, port, lm)


def test_a_body_shorter_than_its_content_length_gets_a_400_after_the_read_timeout(server):
    host, port, lm = server
    sent = b'{"model": "tiny-lm"'
    with socket.create_connection((host, port), timeout=4 * READ_TIMEOUT_S) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 100\r\n\r\n" + sent)
        t0 = time.monotonic()
        reply = b""
        while chunk := sock.recv(65536):  # the server answers, then closes the connection
            reply += chunk
        waited = time.monotonic() - t0
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400", reply
    assert READ_TIMEOUT_S - 0.5 <= waited < 3 * READ_TIMEOUT_S
    body = json.loads(payload)
    assert_openai_error(body, "incomplete_body")
    assert f"after {len(sent)} of its Content-Length 100 bytes" in body["error"]["message"]
    assert_serves(host, port, lm)
