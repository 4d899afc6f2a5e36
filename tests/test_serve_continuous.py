"""Continuous batching, many LoRA adapters on one backbone, /metrics and /health, in process.

One tiny random Llama (saved as an HF folder) and two PEFT adapters made by Hugging Face
``peft`` (LoRA r=4 on q/v, DoRA r=2 on q/k/v/o, random A and B) are served by one
``ContinuousBatcher`` with 4 slots. References are independent: transformers' greedy
``generate`` on the base, and on each adapter merged by ``peft`` (``merge_and_unload``) and run
alone; ``Generator`` (static batching) for seeded sampling and stop strings; prometheus_client's
own parser for /metrics. The HTTP server listens on 127.0.0.1 only and is shut down here.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import peft as hf_peft
import pytest
import torch
import transformers
from prometheus_client.parser import text_string_to_metric_families

from ftjax.generate import Request, SamplingParams
from ftjax.serve import slots
from ftjax.serve.models import load_served
from ftjax.serve.server import App, make_server
from test_serve import save_tiny, word_tokenizer

ADAPTERS = {"ada": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "dora": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         use_dora=True)}
# (prompt, max_new, adapter): mixed lengths (prompt buckets 16 and 32), lengths and adapters.
ROWS = [("the sea is", 9, None), ("a cat sat on the mat and the dog", 3, "ada"),
        ("we go", 12, "dora"), ("the sun rose over the hills and the bird sang a song " * 2, 5, None),
        ("red bird", 7, "ada"), ("the dog ran far", 11, "dora"), ("home now", 2, None),
        ("green hills and the sea", 8, "ada")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous")
    base = save_tiny(transformers.LlamaForCausalLM, root / "tiny-lm")
    refs = {None: base}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        copy = save_tiny(transformers.LlamaForCausalLM, root / "base-copy")
        torch.manual_seed(i + 1)
        model = hf_peft.get_peft_model(copy, hf_peft.LoraConfig(init_lora_weights=False, **cfg))
        with torch.no_grad():  # B = 0 would make every adapter the base
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.3 * torch.randn_like(p))
        model.save_pretrained(root / name)
        refs[name] = model.merge_and_unload().eval()
    models = load_served(str(root / "tiny-lm"), max_batch=4,
                         adapters={n: str(root / n) for n in ADAPTERS})
    return models, refs


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    return tokens[:tokens.index(2)] if 2 in tokens else tokens  # EOS (id 2) dropped


def test_mixed_adapter_batch_equals_each_adapter_merged_alone_and_compiles_per_bucket(served):
    models, refs = served
    assert [m.name for m in models] == ["tiny-lm", "ada", "dora"]
    engine, index = models[0].queue, {m.name: m.adapter for m in models[1:]}
    gen = engine.generator
    requests = [Request(gen.encode(p), SamplingParams(max_new_tokens=n),
                        adapter=index.get(a, 0)) for p, n, a in ROWS]
    before = dict(slots.TRACES)
    first = [f.result(timeout=300) for f in [engine.submit(r) for r in requests]]
    traced = {k: slots.TRACES[k] - before[k] for k in before}
    for (p, n, a), got in zip(ROWS, first):  # 8 rows through 4 slots: rows join as others leave
        assert got.tokens == hf_greedy(refs[a], gen.encode(p), n), (p, a)
    # compiles: one prefill per prompt bucket (16, 32), one step per live-row bucket (1, 2, 4)
    assert traced["prefill"] == 2 and 1 <= traced["step"] <= 3, traced
    again = [f.result(timeout=300) for f in [engine.submit(r) for r in reversed(requests)]]
    assert [g.tokens for g in reversed(again)] == [g.tokens for g in first]
    assert slots.TRACES == {k: before[k] + traced[k] for k in before}  # no recompiles under load


def test_seeds_and_stop_strings_as_the_static_generator(served):
    engine = served[0][0].queue
    gen = engine.generator
    prompts = [gen.encode(p) for p, _, _ in ROWS[:4]]
    sampled = [SamplingParams(max_new_tokens=10, temperature=1.3, top_k=8, top_p=0.9, seed=s)
               for s in (0, 7, 7, 123)]
    free = SamplingParams(max_new_tokens=12, stop_token_ids=())  # no EOS
    greedy = gen.generate([Request(prompts[1], free)])[0].text
    words = greedy.split()
    assert len(words) >= 4, greedy
    word = f" {words[2]}"
    stop = SamplingParams(max_new_tokens=12, stop=(word,), stop_token_ids=())
    requests = [Request(p, s) for p, s in zip(prompts, sampled)] + [Request(prompts[1], stop)]
    static = gen.generate(requests)
    ours = [f.result(timeout=300) for f in [engine.submit(r) for r in requests]]
    for a, b in zip(static, ours):
        assert (a.tokens, a.text, a.finish_reason) == (b.tokens, b.text, b.finish_reason)
    assert ours[-1].text == greedy[:greedy.find(word)] and ours[-1].finish_reason == "stop"
    pieces: list[str] = []
    streamed = engine.submit(Request(prompts[1], sampled[1], on_text=pieces.append)).result(300)
    assert "".join(pieces) == streamed.text == ours[1].text


def test_rows_move_to_the_front_and_the_cache_ring_wraps_and_grows(served, monkeypatch):
    """Two slots on a ring of 32 columns: a finished row's slot takes the last live row (``move``),
    the step runs over 1 or 2 rows, prompts are placed round the end of the ring (``insert``
    wraps), and a 32-token prompt grows the ring (``resize`` unrolls it) while another row
    decodes. Every row equals transformers' greedy ``generate`` on its adapter merged alone."""
    from ftjax.serve.continuous import ContinuousBatcher
    models, refs = served
    gen, index = models[0].queue.generator, {m.name: m.adapter for m in models[1:]}
    calls = []
    for name, arg in (("step", 3), ("insert", 3), ("move", None), ("resize", 1)):
        real = getattr(slots, name)
        monkeypatch.setattr(slots, name, lambda *a, _f=real, _n=name, _i=arg, **k: (
            calls.append((_n, None if _i is None else int(a[_i]), k.get("length"))),
            _f(*a, **k))[1])
    engine = ContinuousBatcher(gen, slots=2, min_length=16)  # a ring of 32 for 16-token prompts
    short = [(p, a) for p, _, a in ROWS if len(gen.encode(p)) <= 16]
    rows = [short[i % len(short)] + (n,) for i, n in enumerate((16, 3, 15, 16, 14, 5, 16, 12))]
    rows.append((ROWS[3][0], None, 6))  # prompt bucket 32: 33 columns needed
    before = dict(slots.TRACES)
    out = [f.result(timeout=300) for f in [engine.submit(Request(
        gen.encode(p), SamplingParams(max_new_tokens=n), adapter=index.get(a, 0)))
        for p, a, n in rows]]
    for (p, a, n), got in zip(rows, out):
        assert got.tokens == hf_greedy(refs[a], gen.encode(p), n), (p, a, n)
    names = [c[0] for c in calls]
    resized = [c for c in calls if c[0] == "resize"]
    assert "move" in names and len(resized) == 1 and resized[0][2] == 64, calls
    assert any(0 < i < 16 for n, i, _ in calls if n == "insert"), calls  # a prompt wrapped round
    traced = {k: slots.TRACES[k] - before[k] for k in before}
    assert traced["prefill"] <= 2 and traced["step"] <= 4, traced  # (1 or 2 rows) x (32, 64)


@pytest.fixture(scope="module")
def http(served):
    app = App(served[0])
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def call(url: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_adapters_over_http_unknown_adapter_404_metrics_and_health(http, served):
    _, refs = served
    tok = word_tokenizer()
    status, body = call(http, "/v1/completions", {"model": "dora", "prompt": "we go",
                                                   "max_tokens": 12, "temperature": 0})
    assert status == 200
    reference = hf_greedy(refs["dora"], tok("we go")["input_ids"], 12)
    expected = tok.decode(reference, skip_special_tokens=True)
    assert json.loads(body)["choices"][0]["text"] == expected
    status, body = call(http, "/v1/completions", {"model": "nope-adapter", "prompt": "we go"})
    err = json.loads(body)["error"]
    assert status == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    status, body = call(http, "/v1/completions", {"model": "ada", "prompt": "we", "top_p": 9})
    assert status == 400 and json.loads(body)["error"]["param"] == "top_p"

    status, body = call(http, "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["models"]["ada"]["slots"] == 4
    status, body = call(http, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    counts = {(s.labels["endpoint"], s.labels["model"], s.labels["status"]): s.value
              for s in families["ftjax_requests"].samples if s.name == "ftjax_requests_total"}
    assert counts[("/v1/completions", "dora", "200")] == 1
    assert counts[("/v1/completions", "", "404")] == 1
    assert counts[("/v1/completions", "ada", "400")] == 1
    assert counts[("/health", "", "200")] == 1
    tokens = {s.labels["model"]: s.value for s in families["ftjax_generated_tokens"].samples
              if s.name == "ftjax_generated_tokens_total"}
    assert tokens["dora"] == len(reference)
    ttft = {s.labels["model"]: s.value for s in families["ftjax_time_to_first_token_seconds"].samples
            if s.name == "ftjax_time_to_first_token_seconds_count"}
    assert ttft["dora"] == 1
    gauges = {f: {s.labels["model"]: s.value for s in families[f].samples}
              for f in ("ftjax_slots", "ftjax_slots_in_use", "ftjax_queue_depth")}
    assert gauges["ftjax_slots"]["tiny-lm"] == 4 and gauges["ftjax_slots_in_use"]["tiny-lm"] == 0
    errors = {(s.labels["endpoint"], s.labels["code"]) for s in families["ftjax_errors"].samples
              if s.name == "ftjax_errors_total"}
    assert ("/v1/completions", "model_not_found") in errors


def test_adapters_from_a_training_run_found_through_its_sweep(tmp_path):
    """``--sweep=DIR`` / ``--adapter=NAME=RUN_DIR``: a LoRA run that ftjax trained over the tiny HF
    base (a finished arm of a sweep folder) serves as an adapter. Reference: the same run exported
    as a PEFT folder, loaded onto the torch base by HF ``peft``, merged, and greedy-decoded by
    transformers."""
    from ftjax.config import base_config, finalize
    from ftjax.peft import export_peft
    from ftjax.serve.models import sweep_adapters
    from ftjax.train.loop import load_trained, train

    base_dir = tmp_path / "tiny-lm"
    save_tiny(transformers.LlamaForCausalLM, base_dir)
    text = tmp_path / "train.txt"
    text.write_text("\n".join(p.strip() for p, _, _ in ROWS) + "\n")
    c = base_config()
    c.model.source = str(base_dir)
    c.data.update(task="lm", format="text", train_path=str(text), eval_path=str(text), seq_len=16,
                  cache_dir="none")
    c.method.kind = "lora"
    c.method.lora.update(rank=4, alpha=8.0)
    c.train.update(steps=3, batch_size=8, learning_rate=0.05, warmup_steps=0)
    c.checkpoint.every_steps = 3
    c.eval.max_batches = 1
    config = finalize(c)
    run = tmp_path / "sweep" / "arms" / "lora-a"
    train(config, run)
    assert sweep_adapters(str(tmp_path / "sweep")) == {"lora-a": str(run)}

    exp, _ = load_trained(config, run)
    export_peft(exp.model, config.method, tmp_path / "peft")
    reference = hf_peft.PeftModel.from_pretrained(
        save_tiny(transformers.LlamaForCausalLM, tmp_path / "base-copy"), tmp_path / "peft")
    reference = reference.merge_and_unload().eval()
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()

    models = load_served(str(base_dir), max_batch=4, adapters=sweep_adapters(str(tmp_path / "sweep")))
    assert [m.name for m in models] == ["tiny-lm", "lora-a"]
    engine, row = models[0].queue, models[1].adapter
    gen = engine.generator
    rows = [(p, n, a) for p, n, _ in ROWS[:4] for a in (None, row)]
    out = [f.result(timeout=300) for f in [engine.submit(
        Request(gen.encode(p), SamplingParams(max_new_tokens=n), adapter=a or 0)) for p, n, a in rows]]
    moved = 0
    for (p, n, a), got in zip(rows, out):
        want = hf_greedy(reference if a else base, gen.encode(p), n)
        assert got.tokens == want, (p, a)
        moved += a is not None and want != hf_greedy(base, gen.encode(p), n)
    assert moved, "the trained adapter changed no continuation: the test would not see a wrong one"
