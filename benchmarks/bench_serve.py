"""Load test of ``scripts/serve.py``: static vs continuous batching, 4 LoRA adapters vs 1 model.

Each configuration runs the real server in a subprocess on a free 127.0.0.1 port. At 1, 8 and
32 concurrent clients (``--clients``) each client sends ``--requests`` streamed completions one
after another, with mixed prompt lengths (about 8 to 120 tokens) and output lengths (16 to 128
new tokens, ``ignore_eos`` so every request generates exactly its ``max_tokens``). The whole
workload runs untimed first (compiling the shape buckets it reaches: twice for the static server,
which compiles per batch composition; the continuous one also compiles its buckets at start,
``--warmup_len``), then once timed.
Reported per level: generated tokens/s (all tokens / wall time), p50/p99 request latency and
time to first token (first streamed text), failed requests (any error or a wrong token count).
After each configuration the server must still answer ``/health`` and its ``/metrics`` must
count every request. Traffic goes only to 127.0.0.1; every request has a timeout.

Configurations: ``static`` (``--batching=static``, the server before continuous batching),
``continuous`` (one model), ``adapters`` (continuous, 4 random PEFT LoRA adapters r=8 on
q/v over the one base, requests spread over them round-robin), and, when llama-cpp-python's
server is importable from ``--llamacpp_python``, ``llama.cpp`` on the same GGUF file. All use
``--max_batch`` decode slots / batch rows.

    python benchmarks/bench_serve.py [--tiny] [--clients=1,8,32] [--requests=2] [--max_batch=32]

``--tiny`` uses a tiny random Llama (development); otherwise SmolLM2-135M-Instruct (GGUF).
Writes ``benchmarks/results/serve.{json,md}``.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, machine  # noqa: E402

_CLIENTS = flags.DEFINE_list("clients", ["1", "8", "32"], "Concurrent client counts.")
_REQUESTS = flags.DEFINE_integer("requests", 2, "Requests per client per level.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "Decode slots (continuous) / batch rows (static).")
_TINY = flags.DEFINE_bool("tiny", False, "A tiny random model instead of SmolLM2 (development).")
_CONFIGS = flags.DEFINE_list("configs", ["static", "continuous", "adapters", "llama.cpp"],
                             "Which servers to run.")
_LLAMACPP = flags.DEFINE_string("llamacpp_python", "/work/llamacpp-venv/bin/python",
                                "A Python with llama-cpp-python[server] for the reference.")
_WARMUP = flags.DEFINE_integer("static_warmup_passes", 2, "Untimed passes of the workload before "
                               "timing the static server (it compiles per batch composition); the "
                               "others get one.")
_TIMEOUT = flags.DEFINE_float("request_timeout_s", 600, "Per request.")
_OUT = flags.DEFINE_string("out", str(RESULTS), "Output folder.")

WORDS = ("the sea is blue and a cat sat on the mat while the dog ran far over green hills "
         "as the sun rose and a bird sang its song").split()
OUTPUT_LENGTHS = (16, 128, 32, 64)
NUM_ADAPTERS = 4
WARMUP_LEN = 256  # the longest prompt (~130 tokens) + 128 new tokens: continuous compiles first


def prompts(n: int) -> list[str]:
    """``n`` prompts of mixed lengths (8 to ~120 words), the same every run."""
    lengths = (8, 120, 24, 60, 12, 90, 40)
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(lengths[i % len(lengths)]))
            for i in range(n)]


# -- servers --------------------------------------------------------------------------------------

def start(cmd: list[str], ready: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server; return it and its base URL once it prints ``ready`` (or is up)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if ready in line:
            break
    if proc.poll() is not None:
        raise RuntimeError("server did not start:\n" + "".join(lines[-30:]))
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, lines[-1]


def ftjax_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc, line = start([sys.executable, str(REPO / "scripts" / "serve.py"), f"--model={model}",
                        "--port=0", f"--max_batch={_MAX_BATCH.value}", *extra], "serving ")
    return proc, line.split(" on ")[1].strip().removesuffix("/v1")


def llamacpp_server(gguf: str) -> tuple[subprocess.Popen, str] | None:
    """llama-cpp-python's OpenAI server on a fixed local port, or None where not installed."""
    python = Path(_LLAMACPP.value)
    if not python.exists() or subprocess.run([str(python), "-c", "import llama_cpp.server"],
                                             capture_output=True).returncode:
        return None
    port = 8765
    proc, _ = start([str(python), "-m", "llama_cpp.server", "--model", gguf, "--host",
                     "127.0.0.1", "--port", str(port), "--n_ctx", "4096"], "Uvicorn running")
    return proc, f"http://127.0.0.1:{port}"


def make_adapters(base: str, out: Path, tiny_folder: Path | None) -> list[str]:
    """``NUM_ADAPTERS`` random PEFT LoRA folders (r=8, q/v) over ``base``; ``--adapter`` flags."""
    import peft
    import torch
    import transformers
    path = Path(base)
    flags_ = []
    for i in range(NUM_ADAPTERS):
        model = (transformers.AutoModelForCausalLM.from_pretrained(str(tiny_folder)) if tiny_folder
                 else transformers.AutoModelForCausalLM.from_pretrained(
                     str(path.parent), gguf_file=path.name, dtype=torch.float32))
        torch.manual_seed(i)
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.01 * torch.randn_like(p))
        model.save_pretrained(out / f"lora{i}")
        flags_.append(f"--adapter=lora{i}={out / f'lora{i}'}")
    return flags_


def tiny_model(out: Path) -> Path:
    """A tiny random Llama with a word-level tokenizer, saved as an HF folder."""
    sys.path.insert(0, str(REPO / "tests"))
    import transformers
    from test_serve import save_tiny
    import test_serve
    test_serve.CONFIG["max_position_embeddings"] = 512
    test_serve.WORDS.extend(w for w in dict.fromkeys(WORDS) if w not in test_serve.WORDS)
    test_serve.CONFIG["vocab_size"] = len(test_serve.WORDS)
    save_tiny(transformers.LlamaForCausalLM, out / "tiny")
    return out / "tiny"


# -- clients --------------------------------------------------------------------------------------

def one_request(base: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: latency, time to first text, tokens, or an error."""
    url = urlparse(base)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    start = time.perf_counter()
    ttft, finish, error = None, None, None
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=_TIMEOUT.value)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
        else:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("text") and ttft is None:
                    ttft = time.perf_counter() - start
                finish = choice.get("finish_reason") or finish
            if finish != "length":
                error = f"finish_reason {finish!r}, expected 'length'"
    except Exception as e:  # noqa: BLE001 - counted as a failure
        error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return dict(latency=time.perf_counter() - start, ttft=ttft, tokens=max_tokens, error=error)


def load(base: str, models: list[str], clients: int) -> dict:
    """``clients`` threads, each sending ``--requests`` completions one after another."""
    texts = prompts(clients * _REQUESTS.value)

    def client(c: int) -> list[dict]:
        out = []
        for r in range(_REQUESTS.value):
            i = c * _REQUESTS.value + r
            out.append(one_request(base, models[i % len(models)], texts[i],
                                   OUTPUT_LENGTHS[i % len(OUTPUT_LENGTHS)]))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    pct = lambda xs, q: statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 \
        else (xs[0] if xs else float("nan"))  # noqa: E731
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok if r["ttft"] is not None]
    return dict(clients=clients, requests=len(results), failed=len(results) - len(ok),
                errors=sorted({r["error"] for r in results if r["error"]})[:3], wall_s=wall,
                tokens_per_s=sum(r["tokens"] for r in ok) / wall,
                latency_p50_s=pct(lat, 50), latency_p99_s=pct(lat, 99),
                ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99))


def still_up(base: str, expected: int) -> dict:
    """/health answers and /metrics counted ``expected`` completions (ftjax servers)."""
    from prometheus_client.parser import text_string_to_metric_families
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", "/health")
    health = conn.getresponse().status
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    counted = sum(s.value for f in text_string_to_metric_families(text) if f.name == "ftjax_requests"
                  for s in f.samples if s.name == "ftjax_requests_total"
                  and s.labels["endpoint"] == "/v1/completions" and s.labels["status"] == "200")
    return dict(health_status=health, completions_counted=counted, completions_sent=expected)


def run_config(name: str, base: str, models: list[str], ftjax: bool) -> dict:
    levels = [int(c) for c in _CLIENTS.value]
    passes = _WARMUP.value if name == "static" else 1
    for _ in range(passes):  # untimed: compile the buckets this workload reaches
        for clients in levels:
            load(base, models, clients)
    out = dict(config=name, levels=[load(base, models, c) for c in levels])
    if ftjax:
        out["after"] = still_up(base, (1 + passes) * sum(c * _REQUESTS.value for c in levels))
    print(json.dumps(out), flush=True)
    return out


def main(argv):
    del argv
    from ftjax.models.assets import smollm2_gguf_path
    results, tmp = [], Path(tempfile.mkdtemp(prefix="bench_serve_"))
    tiny = tiny_model(tmp) if _TINY.value else None
    model = str(tiny) if tiny else str(smollm2_gguf_path())
    base_id = Path(model).name if tiny else Path(model).stem
    for name in _CONFIGS.value:
        if name == "llama.cpp":
            server = None if tiny else llamacpp_server(model)
            if server is None:
                results.append(dict(config=name, unavailable=True))
                continue
            proc, base, models = *server, [model]
        else:
            extra = (["--batching=static"] if name == "static" else
                     [f"--warmup_len={WARMUP_LEN}"] + (make_adapters(model, tmp, tiny)
                                                       if name == "adapters" else []))
            (proc, base), models = ftjax_server(model, extra), (
                [f"lora{i}" for i in range(NUM_ADAPTERS)] if name == "adapters" else [base_id])
        try:
            results.append(run_config(name, base, models, ftjax=name != "llama.cpp"))
        except Exception as e:  # noqa: BLE001 - report it and go on with the next server
            results.append(dict(config=name, failed_to_run=f"{type(e).__name__}: {e}"))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    report = dict(machine=machine(), model="tiny random Llama" if tiny else
                  "SmolLM2-135M-Instruct (GGUF; ftjax dequantises to float32)",
                  requests_per_client=_REQUESTS.value, max_batch=_MAX_BATCH.value, results=results)
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(report, indent=2))
    (out / "serve.md").write_text(table(report))
    print(table(report))


def table(report: dict) -> str:
    rows = ["| server | clients | tokens/s | p50 / p99 latency (s) | p50 / p99 TTFT (s) | failed |",
            "|---|---|---|---|---|---|"]
    by = {r["config"]: r for r in report["results"] if "levels" in r}
    for r in report["results"]:
        if r.get("unavailable") or r.get("failed_to_run"):
            rows.append(f"| {r['config']} | - | {r.get('failed_to_run') or 'not available here'} "
                        "| | | |")
            continue
        for lv in r["levels"]:
            rows.append(f"| {r['config']} | {lv['clients']} | {lv['tokens_per_s']:.1f} | "
                        f"{lv['latency_p50_s']:.2f} / {lv['latency_p99_s']:.2f} | "
                        f"{lv['ttft_p50_s']:.2f} / {lv['ttft_p99_s']:.2f} | "
                        f"{lv['failed']}/{lv['requests']} |")
    notes = []
    if "static" in by and "continuous" in by:
        for s, c in zip(by["static"]["levels"], by["continuous"]["levels"]):
            notes.append(f"{c['clients']} clients: continuous/static throughput "
                         f"{c['tokens_per_s'] / s['tokens_per_s']:.2f}x, p99 TTFT "
                         f"{c['ttft_p99_s']:.2f} vs {s['ttft_p99_s']:.2f} s")
    if "adapters" in by and "continuous" in by:
        for a, c in zip(by["adapters"]["levels"], by["continuous"]["levels"]):
            notes.append(f"{c['clients']} clients: 4 adapters / 1 model p50 latency "
                         f"{a['latency_p50_s'] / c['latency_p50_s']:.2f}x")
    if "llama.cpp" in by and "continuous" in by:
        for l, c in zip(by["llama.cpp"]["levels"], by["continuous"]["levels"]):
            notes.append(f"{c['clients']} clients: ftjax continuous / llama.cpp throughput "
                         f"{c['tokens_per_s'] / l['tokens_per_s']:.2f}x")
    return (f"{report['model']}, {report['requests_per_client']} streamed requests per client, "
            f"max_batch={report['max_batch']}\n\n" + "\n".join(rows) + "\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n")


if __name__ == "__main__":
    app.run(main)
