"""The real server in a subprocess, spoken to with the official ``openai`` client and raw HTTP.

Two tiny random transformers models (a causal LM and a classifier) are saved as HF folders with
a word-level tokenizer and a chat template; greedy answers and class probabilities are checked
against transformers itself, and every bad request must get an OpenAI-style 4xx body while the
server keeps answering.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from test_llama_parity import randomize

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", "system", ":", ".", "the", "sea",
         "is", "blue", "a", "cat", "sat", "on", "mat", "dog", "ran", "far", "and", "sun", "rose",
         "over", "hills", "green", "red", "bird", "sang", "song", "we", "go", "home", "now"]
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant :{% endif %}")
CONFIG = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Every token is an ASCII word, so decoded text is stable as tokens are appended."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                               bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.chat_template = CHAT_TEMPLATE
    return out


def save_tiny(cls, folder: Path, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize(cls(transformers.LlamaConfig(**CONFIG, **extra)))
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return model


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    """scripts/serve.py on a free 127.0.0.1 port: the process and its base URL (http://host:port/v1)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--port=0", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait for the "serving ... on http://host:port/v1" line
        lines.append(line)
        if line.startswith("serving "):
            break
    if proc.poll() is not None or not lines or not lines[-1].startswith("serving "):
        raise RuntimeError("server did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # drain
    return proc, lines[-1].split(" on ")[1].strip()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    lm = save_tiny(transformers.LlamaForCausalLM, root / "tiny-lm")
    clf = save_tiny(transformers.LlamaForSequenceClassification, root / "tiny-clf",
                    num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    proc, base = start_server(f"--model={root / 'tiny-lm'}", f"--model={root / 'tiny-clf'}",
                              f"--api-key={API_KEY}", "--max_body_bytes=4096")
    yield base, lm, clf
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=API_KEY, max_retries=0, timeout=120)


def hf_greedy(model, prompt_ids: list[int], max_new: int) -> str:
    """transformers' greedy continuation, decoded the way the server decodes (EOS dropped)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids)),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return word_tokenizer().decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def raw(base: str, path: str, body: bytes | dict | None = None, key: str | None = API_KEY,
        method: str = "POST") -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(base.removesuffix("/v1") + path, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


PROMPTS = ["the sea is", "a cat sat on the mat and the dog", "we go"]


def test_models_endpoint(client):
    assert sorted(m.id for m in client.models.list().data) == ["tiny-clf", "tiny-lm"]


def test_completions_match_transformers_greedy(server, client):
    _, lm, _ = server
    tok = word_tokenizer()
    out = client.completions.create(model="tiny-lm", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert out.choices[0].text == hf_greedy(lm, tok(PROMPTS[0])["input_ids"], 8)
    assert out.usage.prompt_tokens == 3 and 1 <= out.usage.completion_tokens <= 8
    assert out.choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_are_batched_and_correct(server, client):
    _, lm, _ = server
    tok = word_tokenizer()
    results: dict[int, str] = {}

    def ask(i):
        results[i] = client.completions.create(model="tiny-lm", prompt=PROMPTS[i % 3],
                                               max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):  # left padding among rows of different lengths changes nothing
        assert results[i] == hf_greedy(lm, tok(PROMPTS[i % 3])["input_ids"], 8)


def test_chat_and_streaming(server, client):
    _, lm, _ = server
    messages = [{"role": "user", "content": "the sun rose over the hills"}]
    out = client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=10,
                                         temperature=0)
    prompt = word_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]
    assert out.choices[0].message.content == hf_greedy(lm, prompt, 10)
    assert out.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    stream = client.completions.create(model="tiny-lm", prompt=PROMPTS[1], max_tokens=8,
                                       temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream)
    assert text == client.completions.create(model="tiny-lm", prompt=PROMPTS[1], max_tokens=8,
                                             temperature=0).choices[0].text


def test_stop_strings_and_sampling(client):
    full = client.completions.create(model="tiny-lm", prompt=PROMPTS[1], max_tokens=12,
                                     temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 4
    stop = f" {words[2]}"
    cut = client.completions.create(model="tiny-lm", prompt=PROMPTS[1], max_tokens=12,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    seeded = [client.completions.create(model="tiny-lm", prompt=PROMPTS[0], max_tokens=8,
                                        temperature=1.5, top_p=0.9, seed=3).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_classify_matches_transformers(server):
    base, _, clf = server
    texts = ["the cat sat on the mat", "we go home now"]
    status, body = raw(base, "/v1/classify", {"model": "tiny-clf", "input": texts})
    assert status == 200
    tok = word_tokenizer()
    for row, text in zip(body["data"], texts):
        with torch.no_grad():
            p = torch.softmax(clf(torch.tensor([tok(text)["input_ids"]])).logits, -1)[0].numpy()
        np.testing.assert_allclose([row["probabilities"]["neg"], row["probabilities"]["pos"]], p,
                                   atol=1e-4)
        assert row["label"] == ["neg", "pos"][int(p.argmax())]


BAD = [  # (path, body, key, status, code or param)
    ("/v1/completions", b"{not json", API_KEY, 400, "invalid_json"),
    ("/v1/completions", {"model": "nope", "prompt": "the"}, API_KEY, 404, "model_not_found"),
    ("/v1/completions", {"model": "tiny-lm", "prompt": "the sea " * 40, "max_tokens": 8},
     API_KEY, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny-lm", "prompt": "the", "temperature": -1}, API_KEY, 400,
     "temperature"),
    ("/v1/completions", {"model": "tiny-lm", "prompt": "the", "top_p": 1.5}, API_KEY, 400, "top_p"),
    ("/v1/completions", {"model": "tiny-lm", "prompt": "the", "max_tokens": 0}, API_KEY, 400,
     "max_tokens"),
    ("/v1/completions", {"model": "tiny-lm", "prompt": "the", "temperature": "hot"}, API_KEY, 400,
     "temperature"),
    ("/v1/completions", {"model": "tiny-lm"}, API_KEY, 400, "prompt"),
    ("/v1/chat/completions", {"model": "tiny-lm", "messages": [{"role": "user"}]}, API_KEY, 400,
     "messages[0]"),
    ("/v1/completions", {"model": "tiny-lm", "prompt": "the " * 3000}, API_KEY, 413,
     "request_too_large"),
    ("/v1/completions", {"model": "tiny-lm", "prompt": "the"}, None, 401, "invalid_api_key"),
    ("/v1/completions", {"model": "tiny-lm", "prompt": "the"}, "wrong", 401, "invalid_api_key"),
    ("/v1/classify", {"model": "tiny-lm", "input": "the"}, API_KEY, 400, "unsupported_model"),
    ("/v1/nothing", {}, API_KEY, 404, "unknown_url"),
    ("/v1/completions", {"model": "tiny-lm", "prompt": "the", "logprobs": 2}, API_KEY, 400,
     "logprobs"),
]


@pytest.mark.parametrize("path,body,key,status,what", BAD, ids=[b[-1] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_lives(server, path, body, key, status, what):
    base = server[0]
    got, err = raw(base, path, body, key)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert what in (err["error"]["code"], err["error"]["param"])
    ok, reply = raw(base, "/v1/completions", {"model": "tiny-lm", "prompt": "the", "max_tokens": 2})
    assert ok == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")


def test_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny-lm", prompt="the", top_p=2.0)


def _leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), list(v) if isinstance(v, tuple) else v


def test_workdir_config_round_trips(tmp_path):
    """A workdir's config.json (written by the training loop) rebuilds the run's ConfigDict, and
    a run saved before a key existed gets its default (a served old run keeps working)."""
    import json

    from ftjax.config import load_run_config
    from ftjax.configs.tiny import get_config
    from ftjax.serve.models import is_workdir

    config = get_config("steps=3")
    assert not is_workdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    assert is_workdir(tmp_path)
    rebuilt = load_run_config(tmp_path)
    assert dict(_leaves(rebuilt.to_dict())) == dict(_leaves(config.to_dict()))
    assert rebuilt.train.steps == 3 and rebuilt.model.head == "causal_lm"
    old = json.loads(config.to_json_best_effort())
    del old["train"]["loss_chunk"], old["train"]["prefetch"]  # keys newer than the run
    (tmp_path / "config.json").write_text(json.dumps(old))
    rebuilt = load_run_config(tmp_path)
    assert rebuilt.train.loss_chunk == 0 and rebuilt.train.prefetch == config.train.prefetch
